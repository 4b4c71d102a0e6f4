"""The loss study: which adversarial objective makes the better SRGAN, against a control arm.

An *arm* is an adversarial objective (``adv.loss``) or the control ``none`` (the same phase with no
adversarial term); each arm runs over seeds (``gan.seed``) from the one pretrained generator of
its architecture. ``run_study`` queues every (arch, arm, seed) as a DVC experiment (``dvc exp run
--queue -S adv.loss=... -S gan.seed=...``, then ``--run-all``), nests each finished run under the
study's MLflow parent run, and adds seeds to the arms whose interval still overlaps a neighbour's
(``study.decide_by``) until they separate, reach ``study.max_seeds`` or the time budget ends.

A study is a record: its report is rebuilt from the runs nested under its parent run (never from
today's params), from each run's per-image scores (the evaluate stage's per_image.csv artifact).
``analyse`` gives, per evaluation set and headline metric of the registry, each arm's mean with a
95% interval, each objective's effect against the control and against the SRResNet, and groups of
objectives that Holm-corrected tests cannot tell apart (``srgan.stats``); ``write_report`` renders
them with a generated verdict, the training dynamics of every arm, crops, the
perception-distortion plane and, once rated, mean opinion scores.
"""

from __future__ import annotations

import csv
import html
import io
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import dataio, distribute, metrics, stats, tracking
from .config import NO_ADVERSARIAL, ROOT, STUDY_SETS, TRAINING_SECTIONS, Config, replace

log = logging.getLogger(__name__)

PER_IMAGE_ARTIFACT = "eval/per_image.csv"  # what the evaluate stage logs to every SRGAN run
GAN_METHOD, SRRESNET, BICUBIC, HR = "srgan", "srresnet", "bicubic", "hr"
KIND = "study"  # the parent run's `kind` tag
# Curves of every arm in the report (MLflow keys the training phase logs), and their labels.
D_HEALTH_CURVES = (metrics.val_key("d_acc"), metrics.val_key("d_auc"))
DYNAMICS = {D_HEALTH_CURVES[0]: "D accuracy (held-out)", D_HEALTH_CURVES[1]: "D AUC (held-out)", "d_loss": "D loss",
            "g_adv": "G adversarial loss", metrics.val_key("niqe"): "validation NIQE",
            metrics.val_key("psnr_y"): "validation PSNR-Y (dB)"}
STOP_SEPARATED = "its interval no longer overlaps a neighbour's"
STOP_MAX_SEEDS = "reached study.max_seeds"
STOP_BUDGET = "the time budget (study.budget_minutes) would be exceeded by another round"


class StudyError(RuntimeError):
    """The study cannot run or be rebuilt (no pretrained generator, no such study, ...)."""


@dataclass(frozen=True)
class Experiment:
    """One run of the study: a name for DVC and the params it sets."""

    name: str
    loss: str
    seed: int
    arch: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self, base: Config) -> Config:
        return replace(base, self.overrides)


def arm_name(loss: str, arch: str, archs: Sequence[str]) -> str:
    """An arm's label: the objective, and the generator when the study has several."""
    return loss if len(archs) == 1 else f"{loss}/{arch}"


def plan(cfg: Config, study_id: str, seeds: Mapping[str, Sequence[int]] | None = None,
         tuned: Mapping[str, Mapping[str, Any]] | None = None) -> list[Experiment]:
    """Every (architecture, arm, seed) as a DVC experiment; ``seeds``: arm -> seeds (default:
    study.seeds); each objective's ``study.arm_params``, then ``tuned``: arm -> the params its tuning
    chose (study.tune_trials)."""
    st = cfg.study
    loss_key, seed_key, arch_key = STUDY_SETS
    out = []
    for arch in st.archs:
        for loss in st.losses:
            arm = arm_name(loss, arch, st.archs)
            for seed in (seeds or {}).get(arm, st.seeds):
                over: dict[str, Any] = {**st.arm_params.get(loss, {}), **(tuned or {}).get(arm, {}),
                                        loss_key: loss, seed_key: seed}
                if arch != cfg.model.generator.arch:
                    over[arch_key] = arch
                out.append(Experiment(f"{study_id}-{arch}-{loss}-s{seed}", loss, seed, arch, over))
    return out


def _dvc(args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True, env=env)


QUEUE_POLL_S = 30  # seconds between looks at DVC's queue while its workers run
QUEUE_STUCK_S = 120  # a finished queue whose workers are still up this long after is stopped (below)
TASK_DONE = ("Success", "Failed")  # `dvc queue status` states of a task that will not run again


def queue_statuses(cwd: Path) -> dict[str, str]:
    """Experiment name -> its task's state in `dvc queue status` (Queued, Running, Success, Failed)."""
    out = _dvc(["queue", "status"], cwd)
    rows = [line.split() for line in out.stdout.splitlines()]
    # rows: task id, name, creation time (one or more words), state; then a "Worker status" line
    return {r[1]: r[-1] for r in rows if len(r) >= 4 and r[0] not in ("Task", "Worker")}


def run_experiments(exps: Sequence[Experiment], jobs: int, cwd: Path = ROOT,
                    poll_s: float = QUEUE_POLL_S, stuck_s: float = QUEUE_STUCK_S) -> bool:
    """Queue ``exps`` and run the queue (blocking); False if an experiment failed (the study then
    reports the runs that finished and names the others)."""
    for e in exps:
        sets = [a for k, v in e.overrides.items() for a in ("-S", f"{k}={v}")]
        out = _dvc(["exp", "run", "--queue", "-n", e.name, *sets], cwd)
        if out.returncode:
            raise StudyError(f"dvc exp run --queue {e.name} failed:\n{out.stderr[-2000:]}")
    log.info("running %d queued experiments with %d job(s)", len(exps), jobs)
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], cwd=cwd, text=True,
                                stdout=output, stderr=subprocess.STDOUT, env=distribute.threads_env(jobs))
        try:
            wait_for_queue(proc, cwd, [e.name for e in exps], poll_s, stuck_s)
        except BaseException:  # e.g. SIGTERM of the study: its DVC run goes with it, as with subprocess.run
            proc.kill()
            proc.wait()
            raise
        output.seek(0)
        text = output.read()
    failed = [e.name for e in exps if queue_statuses(cwd).get(e.name) != "Success"]
    if failed or proc.returncode:
        log.warning("dvc exp run --run-all: %s did not succeed:\n%s", ", ".join(failed) or "not every experiment",
                    text[-3000:])
    return not failed


def wait_for_queue(proc: subprocess.Popen, cwd: Path, names: Sequence[str], poll_s: float, stuck_s: float) -> bool:
    """Wait for ``proc`` (`dvc exp run --run-all`) to end; True if it had to be stopped.

    DVC's queue workers stop themselves when the queue is empty, but the thread that decides so can
    die (seen here: a JSONDecodeError reading the celery file broker as the other worker shut down),
    leaving an idle worker and `--run-all` waiting forever. So once every one of ``names`` is done
    and the workers are still up ``stuck_s`` later, `dvc queue stop` ends them (and a kill after
    another ``stuck_s``)."""
    done_since = None
    while True:
        try:
            proc.wait(timeout=poll_s)
            return False
        except subprocess.TimeoutExpired:
            pass
        status = queue_statuses(cwd)
        if not all(status.get(n) in TASK_DONE for n in names):
            done_since = None
            continue
        done_since = done_since or time.monotonic()
        if time.monotonic() - done_since < stuck_s:
            continue
        log.warning("DVC's queue ran all %d experiments but its workers did not stop: stopping them", len(names))
        _dvc(["queue", "stop"], cwd)
        try:
            proc.wait(timeout=stuck_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return True


def find_run(cfg: Config, experiment: str) -> dict[str, Any] | None:
    """The newest finished adversarial run trained under exactly ``cfg`` (by its params digest):
    how a just-run experiment's run is found, once, to be nested under the study."""
    digest = cfg.digest(TRAINING_SECTIONS)
    runs = tracking.search_runs(experiment, f"tags.`params.training_digest` = '{digest}' and "
                                           "tags.phase = 'gan' and attributes.status = 'FINISHED'")
    return max(runs, key=lambda r: r["start_time"]) if runs else None


def adopt(cfg: Config, exps: Sequence[Experiment], parent_run_id: str, study_id: str) -> list[str]:
    """Nest the finished run of each experiment under the study's parent run; the names of the
    experiments without one (failed or not run)."""
    missing = []
    for e in exps:
        run = find_run(e.config(cfg), cfg.tracking.experiment)
        if run is None:
            log.warning("%s: no finished run found (failed or not run)", e.name)
            missing.append(e.name)
            continue
        tracking.Run(run["run_id"]).set_tags({"mlflow.parentRunId": parent_run_id, "study": study_id,
                                              "study.experiment": e.name, "study.arch": e.arch})
    return missing


def _per_image(run_id: str) -> dict[str, dict[str, dict[str, float]]]:
    """set -> image -> column -> value from a run's per-image scores (empty when it has none)."""
    path = tracking.download_artifact(run_id, PER_IMAGE_ARTIFACT)
    out: dict[str, dict[str, dict[str, float]]] = {}
    if path is None:
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if k not in ("set", "name") and v not in ("", None)}
            out.setdefault(row["set"], {})[row["name"]] = values
    return out


def rows_of(experiment: str, parent_run_id: str, with_images: bool = True) -> list[dict[str, Any]]:
    """The study's runs: every finished adversarial run nested under its parent, with its config
    (arm, seed, arch from the run's own params), metrics and per-image scores."""
    rows = []
    for run in tracking.child_runs(experiment, parent_run_id):
        if "study.experiment" not in run["tags"] or run["status"] != "FINISHED":
            continue  # tuning trials are nested under the parent too, but are not the study's runs
        p = run["params"]
        rows.append({
            "experiment": run["tags"]["study.experiment"],
            "loss": p.get("adv.loss", run["tags"].get("adv.loss", "?")),
            "seed": int(p.get("gan.seed", -1)),
            "arch": run["tags"].get("study.arch", p.get("model.generator.arch", "?")),
            "steps": int(float(p.get("gan.steps", 0))),
            "run_id": run["run_id"], "srresnet_run_id": run["tags"].get("srresnet.run_id"), "params": p,
            "metrics": run["metrics"], "per_image": _per_image(run["run_id"]) if with_images else {},
        })
    return sorted(rows, key=lambda r: (r["arch"], r["loss"], r["seed"]))


def find_parent(experiment: str, study_id: str) -> dict[str, Any]:
    """The study's parent run by its id."""
    runs = tracking.search_runs(experiment, f"tags.study = '{study_id}' and tags.kind = '{KIND}'")
    if not runs:
        raise StudyError(f"no study {study_id!r} in MLflow experiment {experiment!r}")
    return max(runs, key=lambda r: r["start_time"])


def close_dead_parents(experiment: str) -> list[str]:
    """End KILLED the parent runs of studies whose process died (SIGKILL leaves them RUNNING)."""
    closed = []
    for run in tracking.search_runs(experiment, f"tags.kind = '{KIND}' and attributes.status = 'RUNNING'"):
        worker = run["tags"].get("study.worker", "")
        if tracking.process_is_dead(worker) and tracking.end_if_running(run["run_id"], "KILLED"):
            log.warning("study %s was left running by a dead process (%s): its parent run is ended KILLED",
                        run["tags"].get("study"), worker)
            closed.append(run["run_id"])
    return closed


# --------------------------------------------------------------------------- analysis
def _matrix(rows: Sequence[Mapping[str, Any]], set_name: str, column: str, images: Sequence[str]) -> np.ndarray:
    return np.array([[r["per_image"][set_name][i][column] for i in images] for r in rows], dtype=np.float64)


def common_images(rows: Sequence[Mapping[str, Any]], set_name: str, column: str) -> list[str]:
    """Images every run scored ``column`` on (NIQE skips images too small for it)."""
    sets = [{i for i, v in r["per_image"].get(set_name, {}).items() if column in v} for r in rows]
    return sorted(set.intersection(*sets)) if sets else []


def analyse(cfg: Config, rows: Sequence[Mapping[str, Any]], sets: Sequence[str] | None = None,
            names: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, stats.Comparison]]]:
    """arch -> set -> metric -> the arms compared (stats.compare), per headline registry metric."""
    out: dict[str, dict[str, dict[str, stats.Comparison]]] = {}
    archs = sorted({r["arch"] for r in rows})
    for arch in archs:
        mine = [r for r in rows if r["arch"] == arch]
        for set_name in sets or cfg.evaluate.sets:
            for m in metrics.image_metrics(headline_only=True):
                if names is not None and m.name not in names:
                    continue
                column = f"{GAN_METHOD}_{m.name}"
                images = common_images(mine, set_name, column)
                if not images:
                    continue
                arms = {}
                for loss in dict.fromkeys(r["loss"] for r in mine):
                    arms[loss] = _matrix([r for r in mine if r["loss"] == loss], set_name, column, images)
                ref_col = f"{SRRESNET}_{m.name}"
                ref = None
                if all(ref_col in mine[0]["per_image"][set_name][i] for i in images):
                    ref = ("SRResNet", _matrix(mine[:1], set_name, ref_col, images))
                control = NO_ADVERSARIAL if NO_ADVERSARIAL in arms else None
                out.setdefault(arch, {}).setdefault(set_name, {})[m.name] = stats.compare(
                    m.name, arms, m.higher_is_better, control=control, reference=ref, seed=cfg.seed)
    return out


def references(rows: Sequence[Mapping[str, Any]], set_name: str) -> dict[str, dict[str, float]]:
    """Mean bicubic / SRResNet / HR values per metric on a set (from the first run's per-image scores)."""
    if not rows or set_name not in rows[0]["per_image"]:
        return {}
    per = rows[0]["per_image"][set_name].values()
    out: dict[str, dict[str, float]] = {}
    for method, label in ((BICUBIC, "bicubic"), (SRRESNET, "SRResNet"), (HR, "HR")):
        for m in metrics.image_metrics(headline_only=True):
            vals = [v[f"{method}_{m.name}"] for v in per if f"{method}_{m.name}" in v]
            if vals:
                out.setdefault(label, {})[m.name] = float(np.mean(vals))
    return out


CRITERION_DISTORTION = "psnr_y"  # what an objective may lose at most study.max_psnr_drop of (dB)


def criterion(cfg: Config, rows: Sequence[Mapping[str, Any]], set_name: str) -> dict[str, dict[str, Any]]:
    """Does each objective work? Per objective arm on ``set_name``: its D separates (mean held-out D
    accuracy over seeds >= metrics.D_SEPARATES), it beats the control on ``study.decide_by`` by more
    than ``study.min_gain_sds`` standard deviations of its own seeds, and it loses at most
    ``study.max_psnr_drop`` dB PSNR-Y to the SRResNet. arm -> the figures, ``fails`` and ``met``."""
    st = cfg.study
    decide = metrics.get(st.decide_by)
    archs = sorted({r["arch"] for r in rows})
    sign = 1.0 if decide.higher_is_better else -1.0
    out: dict[str, dict[str, Any]] = {}

    def per_run(runs: Sequence[Mapping[str, Any]], name: str) -> np.ndarray:
        values = [r["metrics"].get(f"eval/{set_name}/{name}") for r in runs]
        return np.array([v for v in values if v is not None], dtype=np.float64)

    for arch in archs:
        mine = [r for r in rows if r["arch"] == arch]
        control = per_run([r for r in mine if r["loss"] == NO_ADVERSARIAL], decide.name)
        srresnet = references(mine, set_name).get("SRResNet", {}).get(CRITERION_DISTORTION)
        for loss in dict.fromkeys(r["loss"] for r in mine if r["loss"] != NO_ADVERSARIAL):
            runs = [r for r in mine if r["loss"] == loss]
            d_acc, score = per_run(runs, "d_acc"), per_run(runs, decide.name)
            distortion = per_run(runs, CRITERION_DISTORTION)
            gain = sign * (score.mean() - control.mean()) if len(score) and len(control) else float("nan")
            sd = float(score.std(ddof=1)) if len(score) > 1 else float("nan")
            drop = srresnet - distortion.mean() if srresnet is not None and len(distortion) else float("nan")
            fails = []
            if not (len(d_acc) and d_acc.mean() >= metrics.D_SEPARATES):
                fails.append(f"D accuracy below {metrics.D_SEPARATES}")
            if not gain > st.min_gain_sds * sd:  # NaN (one seed, no control) fails too
                fails.append(f"{decide.label} gain not above {st.min_gain_sds:g} SD")
            if not drop <= st.max_psnr_drop:
                fails.append(f"loses more than {st.max_psnr_drop:g} dB {CRITERION_DISTORTION} to the SRResNet")
            out[arm_name(loss, arch, archs)] = {  # the runs' architectures: a rebuilt report's, not today's
                "seeds": len(runs), "d_acc": [round(float(v), 3) for v in d_acc], "gain": float(gain),
                "sd": sd, "psnr_drop": float(drop), "fails": fails, "met": not fails}
    return out


def _settings_text(params: Mapping[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in params.items()) or "shared"


def arm_settings(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """arm -> the params its runs ran with that differ between arms (its own weights, say), from the
    runs' logged params; the ones the study sets per experiment are left out."""
    varying = {k for r in rows for k in r.get("params", {}) if k not in STUDY_SETS
               and len({q.get("params", {}).get(k) for q in rows}) > 1}
    archs = sorted({q["arch"] for q in rows})
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        arm = arm_name(r["loss"], r["arch"], archs)
        out.setdefault(arm, {}).update({k: r["params"][k] for k in sorted(varying) if k in r["params"]})
    return out


def criterion_table(crit: Mapping[str, Mapping[str, Any]], cfg: Config,
                    settings: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The criterion as an HTML table, one row per objective."""
    st, decide = cfg.study, metrics.get(cfg.study.decide_by)
    body = "".join(
        f"<tr><td>{html.escape(arm)}</td><td>{html.escape(_settings_text((settings or {}).get(arm, {})))}</td>"
        f"<td>{c['seeds']}</td><td>{' '.join(f'{v:.2f}' for v in c['d_acc'])}</td>"
        f"<td>{c['gain']:+.{decide.digits}f}</td><td>{st.min_gain_sds * c['sd']:.{decide.digits}f}</td>"
        f"<td>{c['psnr_drop']:.2f}</td><td class={'better' if c['met'] else 'worse'}>"
        f"{'met' if c['met'] else html.escape('; '.join(c['fails']))}</td></tr>" for arm, c in crit.items())
    return ("<h2 id=criterion>Does each objective work?</h2><p class=muted>An objective works when its D separates "
            f"(mean held-out accuracy >= {metrics.D_SEPARATES}), it beats the control on {html.escape(decide.label)} "
            f"by more than {st.min_gain_sds:g} of its seeds' standard deviations, and it loses at most "
            f"{st.max_psnr_drop:g} dB PSNR-Y to the SRResNet (study.min_gain_sds, study.max_psnr_drop).</p>"
            f"<table><thead><tr><th>arm</th><th>its params</th><th>seeds</th><th>D accuracy per seed</th>"
            f"<th>gain vs control</th>"
            f"<th>{st.min_gain_sds:g} SD</th><th>PSNR-Y drop (dB)</th><th>criterion</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


def next_seeds(cfg: Config, rows: Sequence[Mapping[str, Any]], started: float, seconds_per_run: float,
               stopped: dict[str, str]) -> dict[str, list[int]]:
    """Arm -> the one seed to add next (adaptive seeding on ``study.decide_by``); records in
    ``stopped`` why every other arm stops."""
    st = cfg.study
    analysis = analyse(cfg, rows, [cfg.evaluate.sets[0]], [st.decide_by])
    used = {r["seed"] for r in rows}
    add: dict[str, list[int]] = {}
    for arch, per_set in analysis.items():
        comp = per_set[cfg.evaluate.sets[0]].get(st.decide_by)
        if comp is None:
            continue
        need = stats.seeds_needed(comp)
        for loss, overlapping in need.items():
            arm = arm_name(loss, arch, st.archs)
            if arm in stopped:
                continue
            if not overlapping:
                stopped[arm] = STOP_SEPARATED
            elif comp.seeds[loss] >= st.max_seeds:
                stopped[arm] = STOP_MAX_SEEDS
            else:
                add[arm] = [max(used) + 1]
    budget = st.budget_minutes * 60.0
    if add and time.time() - started + seconds_per_run * len(add) / max(1, _jobs(cfg)) > budget:
        for arm in add:
            stopped[arm] = STOP_BUDGET
        return {}
    return add


def check_config(cfg: Config) -> None:
    """What the schema cannot check: ``study.decide_by`` names a registered metric with a direction;
    every ``study.arm_params`` entry is a valid override of the config."""
    from .config import ConfigError

    allowed = [m.name for m in metrics.image_metrics(headline_only=True) if m.higher_is_better is not None]
    if cfg.study.decide_by not in allowed:
        raise ConfigError(f"study.decide_by: {cfg.study.decide_by!r} is not a metric the study compares; "
                          f"allowed: {', '.join(allowed)}")
    for loss, over in cfg.study.arm_params.items():
        try:
            replace(cfg, {**over, "adv.loss": loss})
        except (ConfigError, KeyError, TypeError) as exc:
            raise ConfigError(f"study.arm_params.{loss}: {exc}") from None


def _jobs(cfg: Config) -> int:
    # auto: one experiment per core. Measured on 2 vCPUs (AVX2 EPYC, docs/MEASUREMENTS.md): two
    # 300-step GAN runs at once took 161 s, one after the other 193 s (1.2x), and one run's process
    # start, evaluation and DVC bookkeeping overlap the other's training.
    return cfg.study.jobs or max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- equal tuning effort
TUNED_RANGES = ("w_adv", "d_lr")  # what each objective's tuning searches (tune.<name> ranges)


def tuning_config(cfg: Config, loss: str) -> Config:
    """The tune section of one objective's tuning: only ``loss``, only ``TUNED_RANGES`` searched
    (tune.* ranges, the same for every objective), ``study.decide_by`` as the one objective."""
    from .config import TUNE_RANGES

    over: dict[str, Any] = {"tune.losses": [loss], "tune.objectives": [cfg.study.decide_by]}
    over.update({f"tune.{name}": [] for name in TUNE_RANGES if name not in TUNED_RANGES})
    for name in TUNED_RANGES:
        if not getattr(cfg.tune, name):
            raise StudyError(f"study.tune_trials needs a range in tune.{name} to search (it is [])")
    return replace(cfg, over)


def tune_arms(cfg: Config, study_id: str, parent_run_id: str, data: Any, srresnet: Path,
              data_offset: int) -> dict[str, dict[str, Any]]:
    """``study.tune_trials`` Optuna trials per objective (the control has nothing to tune), each
    trial a run nested under the study's parent; returns arm -> the best trial's params."""
    from . import tune

    best: dict[str, dict[str, Any]] = {}
    for arch in cfg.study.archs:
        for loss in cfg.study.losses:
            if loss == NO_ADVERSARIAL:
                continue
            arm = arm_name(loss, arch, cfg.study.archs)
            tcfg = tuning_config(cfg if arch == cfg.model.generator.arch else
                                 replace(cfg, {"model.generator.arch": arch}), loss)
            name = f"{study_id}-tune-{arm.replace('/', '-')}"
            st = tune.run_study(tcfg, data, name, None, cfg.study.tune_trials, None, parent_run_id, srresnet,
                                data_offset)
            best[arm] = tune.best_overrides(st, tcfg)
            log.info("tuning %s: best %s", arm, best[arm])
    return best


# --------------------------------------------------------------------------- the run
def run_study(cfg: Config, study_id: str, jobs: int | None = None) -> tuple[str, dict[str, str]]:
    """Run the study as queued DVC experiments under one MLflow parent run; returns (parent run id,
    arm -> why it stopped adding seeds). The pretrained generator must exist (dvc repro pretrain)."""
    tracking.ensure_store()
    close_dead_parents(cfg.tracking.experiment)
    parent = tracking.start_run(cfg.tracking.experiment, run_name=study_id,
                                tags={"kind": KIND, "study": study_id, "study.worker": tracking.process_id()})
    parent.log_params(cfg.flat(("study",)))
    started, stopped = time.time(), {}
    jobs = jobs or _jobs(cfg)
    with tracking.run_context(parent):
        tuned: dict[str, dict[str, Any]] = {}
        if cfg.study.tune_trials:
            tuned = _tune_from_pretrained(cfg, study_id, parent.run_id)
            parent.log_dict(tuned, "tuned.json")
            parent.set_tags({f"study.tuned.{arm}": str(v) for arm, v in tuned.items()})
        exps = plan(cfg, study_id, tuned=tuned)
        seeds: dict[str, list[int]] = {}
        n_run = 0
        while exps:
            t0 = time.time()
            run_experiments(exps, jobs)
            adopt(cfg, exps, parent.run_id, study_id)
            n_run += len(exps)
            per_run = (time.time() - t0) * jobs / len(exps)
            rows = rows_of(cfg.tracking.experiment, parent.run_id)
            add = next_seeds(cfg, rows, started, per_run, stopped)
            for arm, s in add.items():
                seeds[arm] = s
            exps = [e for e in plan(cfg, study_id, seeds, tuned) if arm_name(e.loss, e.arch, cfg.study.archs) in add]
            if exps:
                log.info("adding a seed to %s (intervals still overlap)", ", ".join(add))
        parent.log_metrics({"study_seconds": time.time() - started, "runs": n_run})
        parent.set_tags({f"study.stop.{arm}": why for arm, why in stopped.items()})
    return parent.run_id, stopped


def _tune_from_pretrained(cfg: Config, study_id: str, parent_run_id: str) -> dict[str, dict[str, Any]]:
    """Equal tuning effort from the pretrain stage's outputs in this workspace (one arch: several
    architectures would need each one's pretrained generator, which DVC keeps in its run cache)."""
    from .dataio import SUMMARY_NAME
    from .trainer import TrainData

    if len(cfg.study.archs) > 1:
        raise StudyError("study.tune_trials works with one generator architecture (study.archs)")
    pre = dataio.read_json(ROOT / "reports" / "pretrain" / SUMMARY_NAME, {})
    data = TrainData.load(ROOT / "data" / "processed", cfg.train.val_images)
    return tune_arms(cfg, study_id, parent_run_id, data, ROOT / "models" / "srresnet.keras",
                     int(pre.get("total_steps", 0)))


# --------------------------------------------------------------------------- report
def _fig_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dynamics_png(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Every arm's training curves, mean over seeds with the seeds' range as a band: a D that never
    learns or a collapse shows in the D panels."""
    curves: dict[str, dict[str, list[list[tuple[int, float]]]]] = {}
    for r in rows:
        for key in DYNAMICS:
            hist = tracking.metric_history(r["run_id"], key)
            if hist:
                curves.setdefault(key, {}).setdefault(r["loss"], []).append(hist)
    if not curves:
        return None
    plt = _plt()
    keys = [k for k in DYNAMICS if k in curves]
    cols = 3
    fig, axes = plt.subplots((len(keys) + cols - 1) // cols, cols, figsize=(15, 3.4 * ((len(keys) + cols - 1) // cols)),
                             squeeze=False)
    arms = sorted({r["loss"] for r in rows})
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}
    for ax, key in zip(axes.flat, keys):
        for arm, runs in sorted(curves[key].items()):
            steps = sorted(set.intersection(*[{s for s, _ in h} for h in runs]))
            if not steps:
                continue
            vals = np.array([[dict(h)[s] for s in steps] for h in runs])
            style = "o-" if key.startswith(metrics.VALIDATION_PREFIX) else "-"
            ax.plot(steps, vals.mean(axis=0), style, ms=3, color=colors[arm], label=f"{arm} ({len(runs)})")
            if len(runs) > 1:
                ax.fill_between(steps, vals.min(axis=0), vals.max(axis=0), color=colors[arm], alpha=0.15)
        if key in D_HEALTH_CURVES:
            ax.axhline(0.5, color="k", ls=":", lw=1)
            ax.axhline(metrics.D_SEPARATES, color="g", ls="--", lw=1)
        ax.set_title(DYNAMICS[key])
        ax.set_xlabel("adversarial step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, title="arm (seeds)")
    fig.tight_layout()
    return _fig_png(fig)


def scatter_png(rows: Sequence[Mapping[str, Any]], set_name: str, refs: Mapping[str, Mapping[str, float]],
                x: str = "psnr_y", y: str | None = None) -> bytes | None:
    """The perception-distortion plane: every run, coloured by arm; the references as crosses.
    ``y`` defaults to the first no-reference metric the runs have (NIQE, or the artifact score when
    the study ran without a NIQE model)."""
    def value(r: Mapping[str, Any], name: str) -> float | None:
        return r["metrics"].get(f"eval/{set_name}/{name}")

    if y is None:
        y = next((m.name for m in metrics.image_metrics() if m.kind == metrics.NO_REFERENCE
                  and any(value(r, m.name) is not None for r in rows)), None)
        if y is None:
            return None
    pts = [(r, value(r, x), value(r, y)) for r in rows]
    pts = [(r, a, b) for r, a, b in pts if a is not None and b is not None]
    if not pts:
        return None
    plt = _plt()
    arms = sorted({r["loss"] for r, _, _ in pts})
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, a, b in pts:
        ax.scatter(a, b, color=colors[r["loss"]], s=40, label=r["loss"])
    for name, ref in refs.items():
        if ref.get(x) is not None and ref.get(y) is not None:
            ax.scatter(ref[x], ref[y], color="k", marker="x", s=60)
            ax.annotate(name, (ref[x], ref[y]), textcoords="offset points", xytext=(5, 3), fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="best")
    ax.set_xlabel(f"{metrics.get(x).label}: distortion")
    ax.set_ylabel(f"{metrics.get(y).label}: perception")
    ax.set_title(f"perception-distortion plane, {set_name}")
    fig.tight_layout()
    return _fig_png(fig)


def median_runs(rows: Sequence[Mapping[str, Any]], set_name: str, metric: str = "niqe") -> dict[str, dict[str, Any]]:
    """Per arm (and arch) the run with the median ``metric``: the seed shown in crops and rated."""
    out: dict[str, dict[str, Any]] = {}
    archs = sorted({r["arch"] for r in rows})
    for key in dict.fromkeys((r["arch"], r["loss"]) for r in rows):
        mine = [r for r in rows if (r["arch"], r["loss"]) == key]
        mine.sort(key=lambda r: (r["metrics"].get(f"eval/{set_name}/{metric}", 0.0), r["seed"]))
        out[arm_name(key[1], key[0], archs)] = mine[(len(mine) - 1) // 2]
    return out


def crops(rows: Sequence[Mapping[str, Any]], valid_dir: Path, srresnet: Path | None, out_dir: Path,
          scale: int, ev: Any, n_images: int, size: int) -> list[Path]:
    """The same detail of ``n_images`` validation images from every arm (its median-NIQE seed),
    the SRResNet and HR side by side, written to ``out_dir/crops/<image>.png``."""
    from . import evaluate, images, models, viz

    upscalers = {}
    for arm, r in median_runs(rows, "valid").items():
        upscalers[arm] = evaluate.generator_upscaler(models.load_generator(tracking.download_model(r["run_id"])), ev)
    if srresnet is not None and srresnet.is_file():
        upscalers = {"SRResNet": evaluate.generator_upscaler(models.load_generator(srresnet), ev), **upscalers}
    paths = []
    for pair in images.load_pairs(valid_dir, limit=n_images):
        r, c = viz.detail_box(pair.hr, size)
        z = min(size, pair.hr.shape[0], pair.hr.shape[1])
        outs = {name: fn(pair.lr, scale) for name, fn in upscalers.items()}
        row = viz.crop_row([images.upscale_bicubic(pair.lr, scale), *outs.values(), pair.hr], (r, c, z), factor=2)
        path = out_dir / "crops" / f"{pair.name}.png"
        images.save_png(path, row)
        paths.append(path)
    dataio.write_json_atomic(out_dir / "crops" / "order.json", ["bicubic", *upscalers, "HR"])
    return paths


def _ci(e: stats.Estimate | None, digits: int) -> str:
    if e is None:
        return ""
    return f"{e.value:.{digits}f} <span class=muted>[{e.lo:.{digits}f}, {e.hi:.{digits}f}]</span>"


def _effect(e: stats.Estimate | None, digits: int, p: float | None = None, better: bool | None = None) -> str:
    if e is None:
        return ""
    cls = "" if better is None else (" class=better" if better else " class=worse")
    ptxt = "" if p is None else f" <span class=muted>p={p:.3g}</span>"
    return (f"<span{cls}>{e.value:+.{digits}f}</span> <span class=muted>[{e.lo:+.{digits}f}, {e.hi:+.{digits}f}]"
            f"</span>{ptxt}")


def comparison_table(c: stats.Comparison, refs: Mapping[str, Mapping[str, float]]) -> str:
    """One metric on one set: each arm's mean [CI], its effect against the control and the SRResNet."""
    m = metrics.get(c.metric)
    d = m.digits
    order = sorted(c.means, key=lambda a: (a != c.control, c.means[a].value * (-1 if m.higher_is_better else 1)))
    body = []
    for arm in order:
        label = f"{arm} (control)" if arm == c.control else arm
        body.append(f"<tr><td>{html.escape(label)}</td><td>{c.seeds[arm]}</td><td>{_ci(c.means[arm], d)}</td>"
                    f"<td>{_effect(c.vs_control.get(arm), d, c.p_control.get(arm), c.better_than_control(arm))}</td>"
                    f"<td>{_effect(c.vs_reference.get(arm), d)}</td></tr>")
    for name, vals in refs.items():
        if c.metric in vals:
            body.append(f"<tr class=ref><td>{html.escape(name)}</td><td>-</td><td>{m.format(vals[c.metric])}</td>"
                        "<td></td><td></td></tr>")
    groups = " | ".join("{" + ", ".join(html.escape(a) for a in sorted(g)) + "}" for g in c.groups)
    direction = "" if m.higher_is_better is None else (" (higher is better)" if m.higher_is_better else
                                                      " (lower is better)")
    return (f"<h3>{html.escape(m.label)}{direction}</h3><table><thead><tr><th>arm</th><th>seeds</th>"
            "<th>mean [95% CI]</th><th>vs control [95% CI], Holm p</th><th>vs SRResNet [95% CI]</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table><p class=muted>groups that cannot be told apart "
            f"(best first, unranked inside): {groups or '-'}</p>")


def write_report(cfg: Config, rows: Sequence[Mapping[str, Any]], out_dir: Path, valid_dir: Path,
                 srresnet: Path | None, study_id: str, seconds: float | None = None,
                 stopped: Mapping[str, str] | None = None, mos: Mapping[str, Any] | None = None,
                 force: bool = False) -> Path:
    """reports/compare/{index.html, study.json, runs.csv, crops/}: the study's result page.

    Refuses (StudyError) to replace a report of the same study that had more runs, unless ``force``.
    """
    from . import report

    out_dir = Path(out_dir)
    old = dataio.read_json(out_dir / "study.json", {})
    if not force and old.get("study") == study_id and len(old.get("runs", [])) > len(rows):
        raise StudyError(f"{out_dir / 'index.html'} shows study {study_id} with {len(old['runs'])} runs; MLflow "
                         f"has {len(rows)} of them now: not overwritten (pass --force to)")
    sets = list(cfg.evaluate.sets)
    analysis = analyse(cfg, rows, sets)
    steps = sorted({r["steps"] for r in rows})
    seeds = {}
    for r in rows:
        seeds.setdefault(arm_name(r["loss"], r["arch"], sorted({q["arch"] for q in rows})), set()).add(r["seed"])
    budget = (f"{len(rows)} runs: {', '.join(f'{a} x {len(s)}' for a, s in seeds.items())} seeds, "
              f"{'/'.join(map(str, steps))} adversarial steps each from one pretrained generator, "
              f"{cfg.data.source} data, evaluation sets {', '.join(sets)}")
    verdict_parts = []
    for arch, per_set in analysis.items():
        for set_name, per_metric in per_set.items():
            for name, comp in per_metric.items():
                verdict_parts.append((set_name + (f" ({arch})" if len(analysis) > 1 else ""),
                                      metrics.get(name).label, metrics.get(name).digits, comp))
    text = stats.verdict(verdict_parts, budget) if rows else "No finished runs."
    flat = [{"experiment": r["experiment"], "arch": r["arch"], "arm": r["loss"], "seed": r["seed"],
             "run_id": r["run_id"], **{f"{s}_{m.name}": r["metrics"].get(f"eval/{s}/{m.name}")
                                       for s in sets for m in metrics.image_metrics(headline_only=True)}}
            for r in rows]
    crop_paths = crops(rows, valid_dir, srresnet, out_dir, cfg.preprocess.scale, cfg.evaluate,
                       cfg.study.crop_images, cfg.study.crop_size) if rows else []
    crit = criterion(cfg, rows, sets[0]) if rows else {}
    record = {"study": study_id, "seconds": seconds, "verdict": text, "budget": budget, "stopped": dict(stopped or {}),
              "criterion": crit, "arm_params": arm_settings(rows),
              "analysis": {a: {s: {m: c.as_dict() for m, c in pm.items()} for s, pm in ps.items()}
                           for a, ps in analysis.items()},
              "runs": flat, "mos": mos}
    dataio.write_csv_atomic(out_dir / "runs.csv", flat)
    dataio.write_json_atomic(out_dir / "study.json", record)
    parts = [report.page_head(f"Loss study {study_id}"),
             "<h1>Which adversarial objective makes the better SRGAN?</h1>",
             f"<p class=muted>Study <code>{html.escape(study_id)}</code>: {html.escape(budget)}"
             + (f"; {seconds / 60:.1f} min" if seconds else "") + ".</p>",
             f"<h2 id=verdict>Verdict</h2><p id=verdict-text>{html.escape(text)}</p>"]
    if crit:
        parts.append(criterion_table(crit, cfg, arm_settings(rows)))
    if stopped:
        parts.append("<details><summary>Why each arm stopped adding seeds</summary><ul>" + "".join(
            f"<li>{html.escape(a)}: {html.escape(w)}</li>" for a, w in sorted(stopped.items())) + "</ul></details>")
    for arch, per_set in analysis.items():
        for set_name, per_metric in per_set.items():
            title = set_name + (f" ({arch})" if len(analysis) > 1 else "")
            refs = references([r for r in rows if r["arch"] == arch], set_name)
            parts.append(f"<h2 id='set-{html.escape(set_name)}'>{html.escape(title)}</h2>")
            parts += [comparison_table(c, refs) for c in per_metric.values()]
            png = scatter_png([r for r in rows if r["arch"] == arch], set_name, refs)
            if png:
                dataio.write_bytes_atomic(out_dir / f"scatter_{set_name}.png", png)
                parts.append(f"<figure><img alt='perception-distortion {html.escape(set_name)}' "
                             f"src='{report.data_uri(out_dir / f'scatter_{set_name}.png')}'><figcaption>one point "
                             "per run; crosses: bicubic, SRResNet, HR</figcaption></figure>")
    png = dynamics_png(rows) if rows else None
    if png:
        dataio.write_bytes_atomic(out_dir / "dynamics.png", png)
        parts.append("<h2 id=dynamics>Training dynamics of every arm</h2><p class=muted>mean over seeds, band: the "
                     f"seeds' range; D panels: dotted = chance, dashed = separating ({metrics.D_SEPARATES})</p>"
                     f"<img alt='training dynamics' src='{report.data_uri(out_dir / 'dynamics.png')}'>")
    if mos:
        parts.append(mos_section(mos))
    if crop_paths:
        order = dataio.read_json(out_dir / "crops" / "order.json", [])
        parts.append("<h2 id=crops>The same detail from every arm</h2>"
                     f"<p class=muted>left to right: {html.escape(' | '.join(order))} (each arm's median-NIQE seed, "
                     "2x enlarged)</p>")
        parts += [f"<figure><img alt='{html.escape(p.stem)}' src='{report.data_uri(p)}'>"
                  f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in crop_paths]
    parts.append("<h2>Runs</h2>" + report.table(flat) + "</body></html>")
    page = out_dir / "index.html"
    dataio.write_text_atomic(page, "\n".join(parts))
    return page


def log_to_parent(parent_run_id: str, out_dir: Path) -> None:
    """The study's numbers onto its MLflow parent run: every arm's mean and interval, effects and
    Holm p-values per set and metric, the verdict, and the report."""
    record = dataio.read_json(Path(out_dir) / "study.json", {})
    flat: dict[str, float] = {}
    for arch, per_set in record.get("analysis", {}).items():
        for set_name, per_metric in per_set.items():
            for name, c in per_metric.items():
                for arm, e in c["means"].items():
                    key = f"study/{set_name}/{name}/{arm}".replace("/none", "/control")
                    flat.update({f"{key}/mean": e["value"], f"{key}/lo": e["lo"], f"{key}/hi": e["hi"]})
                for arm, e in c["vs_control"].items():
                    key = f"study/{set_name}/{name}/{arm}/vs_control"
                    flat.update({key: e["value"], f"{key}/lo": e["lo"], f"{key}/hi": e["hi"]})
                    if e.get("p_holm") is not None:
                        flat[f"{key}/p_holm"] = e["p_holm"]
    for name, m in (record.get("mos") or {}).get("methods", {}).items():
        if m.get("mos") is not None:
            flat[f"study/mos/{name}"] = m["mos"]
    run = tracking.Run(parent_run_id)
    run.log_metrics({k.replace("relativistic_average", "ragan"): v for k, v in flat.items()})
    run.set_tags({"study.verdict": record.get("verdict", "")[:4000],
                  **{f"study.criterion.{arm}": "met" if c["met"] else "; ".join(c["fails"])
                     for arm, c in record.get("criterion", {}).items()}})
    run.log_artifacts(Path(out_dir), "compare")


# --------------------------------------------------------------------------- mean opinion scores
def mos_section(mos: Mapping[str, Any]) -> str:
    """MOS per method with its interval and the rating app's Holm-corrected pairwise tests."""
    rows = []
    for name, m in mos.get("methods", {}).items():
        ci = m.get("ci95")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{m.get('n', 0)}</td><td>"
                    + ("" if m.get("mos") is None else f"{m['mos']:.2f}")
                    + ("" if not ci else f" <span class=muted>[{ci[0]:.2f}, {ci[1]:.2f}]</span>") + "</td></tr>")
    sig = [p for p in mos.get("pairwise", []) if p.get("significant")]
    tests = ("; ".join(f"{html.escape(p['a'])} vs {html.escape(p['b'])}: p={p['p_holm']:.3g}" for p in sig)
             or "no pair differs after Holm's correction")
    return (f"<h2 id=mos>Mean opinion score</h2><p class=muted>{mos.get('n_ratings', 0)} ratings from "
            f"{mos.get('n_raters', 0)} raters, 1 (bad) to 5 (excellent); each arm's median-NIQE seed, blind</p>"
            "<table><thead><tr><th>method</th><th>ratings</th><th>MOS [95% CI]</th></tr></thead><tbody>"
            f"{''.join(rows)}</tbody></table><p class=muted>{tests}</p>")


def prepare_mos(cfg: Config, rows: Sequence[Mapping[str, Any]], valid_dir: Path, srresnet: Path, mos_dir: Path,
                study_id: str, crop: int, force: bool = False) -> Any:
    """A blind rating session of the study: per arm its median-NIQE seed, the SRResNet and the
    paper's calibration methods (nearest, bicubic, HR); the study id is recorded with it."""
    from .mos import study as mos_study

    ev = cfg.evaluate
    models = [mos_study.model_method(f"{arm.replace('/', '-')}=runs:/{r['run_id']}", ev.tile, ev.tile_overlap)
              for arm, r in median_runs(rows, cfg.evaluate.sets[0]).items()]
    models.insert(0, mos_study.model_method(f"srresnet={srresnet}", ev.tile, ev.tile_overlap))
    st = mos_study.prepare_study(valid_dir, mos_dir, models, crop=crop, seed=cfg.seed, force=force,
                                 context=max(mos_study.CONTEXT_LR, ev.tile_overlap))
    dataio.write_json_atomic(Path(mos_dir) / "loss_study.json", {"study": study_id, "mos_study": st.study_id})
    return st


def mos_results(mos_dir: Path, study_id: str) -> dict[str, Any] | None:
    """The rating results of the study's rating session, once anyone rated it (else None)."""
    from .mos import db as mos_db
    from .mos import results as mos_results_mod
    from .mos import study as mos_study
    from .mos.app import default_db

    link = dataio.read_json(Path(mos_dir) / "loss_study.json", {})
    if link.get("study") != study_id:
        return None
    st = mos_study.load_study(Path(mos_dir))
    db = default_db(Path(mos_dir))
    if not db.exists():
        return None
    res = mos_results_mod.compute(st, mos_db.load_ratings(db, st.study_id))
    return res if res["n_ratings"] else None


def new_study_id() -> str:
    return time.strftime("study-%Y%m%d-%H%M%S")
