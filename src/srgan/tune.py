"""Optuna search over the Per-Pix loss weights and the adversarial loss.

Every trial trains the adversarial phase through ``experiment.run_training`` (the train stage's
code path), initialised from the pretrain stage's SRResNet as the train stage is, as a nested
MLflow run under one parent run per tune session. The study lives in persistent storage (a journal
file under the project by default, or an RDB URL such as PostgreSQL for several machines), so that
killing ``tune.py`` and starting it again continues the same study.
"""

from __future__ import annotations

import logging
import os
import re
from statistics import fmean
from pathlib import Path
from typing import Any, Sequence

from . import metrics, tracking
from .config import ROOT, TUNE_RANGES, Config, ConfigError, edit_params, replace
from .dataio import write_text_atomic
from .trainer import Callback, NonFiniteLossError, TrainData

log = logging.getLogger(__name__)

DEFAULT_STORAGE = ROOT / "optuna" / "journal.log"


def objective_key(name: str) -> str:
    """The validation metric a tuning objective reads (a registered metric, as training logs it)."""
    return metrics.val_key(metrics.get(name).name)


def check_objectives(cfg: Config) -> None:
    """``tune.objectives`` must name registered image metrics that have a direction and that this
    config scores (NIQE needs ``evaluate.niqe``)."""
    scored = metrics.Scorer.from_config(cfg.evaluate, cfg.preprocess.scale).names
    allowed = [m.name for m in metrics.image_metrics() if m.higher_is_better is not None and m.name in scored]
    for name in cfg.tune.objectives:
        if name not in allowed:
            raise ConfigError(f"tune.objectives: {name!r} is not a metric tuning can optimise with this "
                              f"config (evaluate.niqe: {cfg.evaluate.niqe}); allowed: {', '.join(allowed)}")


def make_storage(url: str | None):
    """Optuna storage from a URL: RDB (postgresql://, sqlite:///, mysql://) or a journal file path.

    SQLite is for one process only; the journal file supports several processes on one machine;
    PostgreSQL supports workers on several machines (with heartbeats to fail dead workers' trials).
    """
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    if url and re.match(r"^[a-z0-9+]+://", url):
        import random
        import time

        import sqlalchemy.exc

        if url.startswith("postgresql://"):  # SQLAlchemy 2.1 maps it to psycopg 3; we pin psycopg2
            url = "postgresql+psycopg2://" + url[len("postgresql://"):]
        for attempt in range(5):
            try:
                return RDBStorage(url, heartbeat_interval=30, grace_period=120,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # several workers creating Optuna's tables at once: one wins, the others retry
                if attempt == 4:
                    raise
                time.sleep(0.2 + random.random())
    path = Path(url.removeprefix("journal:")) if url else DEFAULT_STORAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return JournalStorage(JournalFileBackend(str(path)))


def directions(cfg: Config) -> list[str]:
    """Optuna's direction per objective: PSNR/SSIM up, NIQE down."""
    return ["maximize" if metrics.higher_is_better(o) else "minimize" for o in cfg.tune.objectives]


def make_sampler(cfg: Config, seed: int | None):
    """``tune.sampler``. TPE models one or several objectives (MOTPE) after ``tune.startup_trials``
    random ones; NSGA-II's first generation (``population_size`` 50) is random, so it only searches
    at budgets of hundreds of trials, not the tens a CPU affords here."""
    import optuna

    t = cfg.tune
    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if t.sampler == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=t.startup_trials)


def trial_steps(cfg: Config) -> int:
    """Adversarial steps per trial: ``tune.gan_steps``, or with 0 the phase being tuned (``gan.steps``)."""
    return cfg.tune.gan_steps or cfg.gan.steps


def trial_seeds(cfg: Config) -> list[int]:
    """``gan.seed`` of each of a trial's runs: ``tune.seeds``, or with [] ``gan.seed`` alone. Every
    trial (the baseline too) runs the same seeds, so trials are compared seed for seed."""
    return list(cfg.tune.seeds) or [cfg.gan.seed]


def make_pruner(cfg: Config):
    import optuna

    t = cfg.tune
    if t.pruner == "none" or len(t.objectives) > 1:  # Optuna cannot prune multi-objective trials
        return optuna.pruners.NopPruner()
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=t.report_every, max_resource=trial_steps(cfg))
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=t.report_every)


def open_study(cfg: Config, study_name: str, storage_url: str | None, seed: int | None = None):
    """Create or load the study (same name and storage -> the same study, resumed); a new study's
    first trial is the baseline (:func:`baseline_params`)."""
    import optuna

    check_objectives(cfg)
    kw = dict(study_name=study_name, storage=make_storage(storage_url), directions=directions(cfg),
              sampler=make_sampler(cfg, seed), pruner=make_pruner(cfg))
    try:  # only the one call that creates the study (the storage decides) enqueues the baseline
        study = optuna.create_study(load_if_exists=False, **kw)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.create_study(load_if_exists=True, **kw)
    study.enqueue_trial(baseline_params(cfg), user_attrs={BASELINE_ATTR: True})
    return study


def suggest(trial, cfg: Config) -> Config:
    """The trial's config: the sampled params of the search space, the tune section's step budget."""
    t = cfg.tune
    over: dict[str, Any] = {
        "gan.steps": trial_steps(cfg),
        "train.val_every": t.report_every,
        "train.log_every": min(cfg.train.log_every, t.report_every),
    }
    for name, key in TUNE_RANGES.items():
        if getattr(t, name):
            over[key] = trial.suggest_float(name, *getattr(t, name), log=True)
    if len(t.losses) > 1:
        over["adv.loss"] = trial.suggest_categorical("adv_loss", list(t.losses))
    else:
        over["adv.loss"] = t.losses[0]
    return replace(cfg, over)


PARAM_KEYS = {**TUNE_RANGES, "adv_loss": "adv.loss"}


class PruningCallback(Callback):
    """Reports the (single) objective's validation value to the trial; raises TrialPruned when the
    pruner says so. Optuna cannot prune multi-objective trials: then it only lets them run."""

    def __init__(self, trial, objectives: list[str]):
        self.trial, self.objectives = trial, objectives

    def on_validation(self, step: int, metrics: dict[str, float], grid) -> None:
        import optuna

        if len(self.objectives) != 1:
            return
        key = objective_key(self.objectives[0])
        self.trial.report(metrics[key], step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({key} {metrics[key]:.3f})")


def recover_dead_trials(study) -> int:
    """Fail RUNNING trials left by a killed process on this host and queue their params again;
    their MLflow child runs (and the killed session's parent run) are ended KILLED.

    A journal file has no heartbeats, so a killed tune.py leaves its trial RUNNING forever; the
    trial never finished, so re-running it loses and repeats nothing.
    """
    from optuna.trial import TrialState

    n = 0
    for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = tr.user_attrs.get("worker", "")
        if not tracking.process_is_dead(worker):
            continue
        study.tell(tr.number, state=TrialState.FAIL)
        study.enqueue_trial(tr.params, user_attrs={"retry_of": tr.number})
        log.warning("trial %d was left running by a dead process (%s): failed and queued again", tr.number, worker)
        for run_id in tracking.search_runs_by_tags({"optuna.study": study.study_name, "optuna.trial": str(tr.number)}):
            tracking.end_if_running(run_id, "KILLED")
        n += 1
    for run_id, tags in tracking.running_runs_with_tag("optuna.worker"):
        if tags.get("optuna.study") == study.study_name and tracking.process_is_dead(tags["optuna.worker"]):
            tracking.end_if_running(run_id, "KILLED")
    return n


def make_objective(cfg: Config, data: TrainData, parent_run_id: str | None, srresnet: Path, data_offset: int):
    """The objective: train the trial's config from the SRResNet once per seed of :func:`trial_seeds`,
    return the mean over seeds of each of ``tune.objectives`` on validation."""
    import optuna

    single = len(cfg.tune.objectives) == 1
    seeds = trial_seeds(cfg)

    def objective(trial: optuna.Trial):
        import keras

        trial.set_user_attr("worker", tracking.process_id())
        tcfg = suggest(trial, cfg)
        from .experiment import run_training

        runs: list[str] = []
        vals: list[dict[str, float]] = []
        for i, seed in enumerate(seeds):
            keras.backend.clear_session()  # free the previous run's graphs
            name = f"trial-{trial.number}" + (f"-seed-{seed}" if len(seeds) > 1 else "")
            # the first seed's curve is the one the pruner compares (the same seed in every trial)
            cbs = [PruningCallback(trial, list(cfg.tune.objectives))] if i == 0 else []
            try:
                run_id, result = run_training(
                    replace(tcfg, {"gan.seed": seed}), "gan", data, callbacks=cbs,
                    parent_run_id=parent_run_id, run_name=name,
                    extra_tags={"optuna.study": trial.study.study_name, "optuna.trial": trial.number,
                                "optuna.worker": tracking.process_id()},
                    exception_status={optuna.TrialPruned: "KILLED"}, init_generator=srresnet, data_offset=data_offset,
                )
            except optuna.TrialPruned:
                raise
            except NonFiniteLossError as exc:
                trial.set_user_attr("fail_reason", f"seed {seed}: {exc}")
                raise
            runs.append(run_id)
            vals.append(result.val)
            trial.set_user_attr("mlflow_run_ids", runs)
        trial.set_user_attr("mlflow_run_id", runs[0])
        # whether D learned in this trial's budget (trials.csv, the report): a trial whose D stayed
        # at chance tuned weights of an adversarial term that taught nothing
        health = {name: round(fmean(v[metrics.val_key(name)] for v in vals), 4) for name in ("d_acc", "d_auc")
                  if all(metrics.val_key(name) in v for v in vals)}
        if "d_acc" in health:
            health["d_separates"] = bool(health["d_acc"] >= metrics.D_SEPARATES)
        for name, value in health.items():
            trial.set_user_attr(name, value)
        per_seed = [[v[objective_key(o)] for o in cfg.tune.objectives] for v in vals]
        if len(seeds) > 1:  # the spread behind each mean, in trials.csv
            for j, o in enumerate(cfg.tune.objectives):
                trial.set_user_attr(f"{o}_by_seed", {str(s): round(p[j], 4) for s, p in zip(seeds, per_seed)})
        values = [fmean(p[j] for p in per_seed) for j in range(len(cfg.tune.objectives))]
        return values[0] if single else values

    return objective


def tag_trial_run(study, trial) -> None:
    """Study callback: record the trial's final state on its MLflow child runs (one per seed)."""
    runs = trial.user_attrs.get("mlflow_run_ids") or tracking.search_runs_by_tags(
        {"optuna.study": study.study_name, "optuna.trial": str(trial.number)})
    for run_id in runs:
        tracking.Run(run_id).set_tags({"optuna.state": trial.state.name.lower()})


BASELINE_ATTR = "baseline"  # user attribute of the trial that runs params.yaml's own values


def baseline_params(cfg: Config) -> dict[str, Any]:
    """params.yaml's values of the searched params (Optuna names), where they lie in the search space:
    the first trial of a new study, so every later trial is judged against the config as it is."""
    t, flat, out = cfg.tune, cfg.flat(), {}
    for name, key in TUNE_RANGES.items():
        lo_hi, value = getattr(t, name), flat[key]
        if lo_hi and lo_hi[0] <= value <= lo_hi[1]:
            out[name] = value
    if len(t.losses) > 1 and cfg.adv.loss in t.losses:
        out["adv_loss"] = cfg.adv.loss
    return out


def run_study(cfg: Config, data: TrainData, study_name: str, storage_url: str | None,
              n_trials: int | None, timeout: float | None, parent_run_id: str | None,
              srresnet: Path, data_offset: int = 0) -> Any:
    """Add ``n_trials`` trials to the study in this process; returns the study."""
    study = open_study(cfg, study_name, storage_url, seed=None)
    recover_dead_trials(study)
    study.optimize(
        make_objective(cfg, data, parent_run_id, srresnet, data_offset), n_trials=n_trials, timeout=timeout,
        catch=(NonFiniteLossError,), callbacks=[tag_trial_run], gc_after_trial=True,
    )
    return study


def best_trial(study, cfg: Config):
    """The best trial (single objective); with several, the Pareto-front trial best on the first
    objective among those that beat the baseline on every objective (what ``--apply`` can take
    without giving anything up); when none does, the baseline itself (``--apply`` then keeps
    params.yaml); without a baseline, the front's best on the first objective."""
    if len(cfg.tune.objectives) == 1:
        return study.best_trial
    sign = 1.0 if metrics.higher_is_better(cfg.tune.objectives[0]) else -1.0
    base = baseline_trial(study)
    front = study.best_trials
    if base is None:
        return max(front, key=lambda t: sign * t.values[0])
    better = [t for t in front if dominates(t.values, base.values, cfg.tune.objectives)]
    return max(better, key=lambda t: sign * t.values[0]) if better else base


def best_overrides(study, cfg: Config) -> dict[str, Any]:
    """Dotted params.yaml keys of :func:`best_trial`."""
    return {PARAM_KEYS[k]: v for k, v in best_trial(study, cfg).params.items()}


def dominates(a: Sequence[float], b: Sequence[float], objectives: Sequence[str]) -> bool:
    """Values ``a`` are at least as good as ``b`` on every objective and better on one."""
    ms = [metrics.get(o) for o in objectives]
    return not any(m.better(y, x) for m, x, y in zip(ms, a, b)) and any(m.better(x, y) for m, x, y in zip(ms, a, b))


def baseline_trial(study):
    """The complete trial that ran params.yaml's own values, if there is one."""
    from optuna.trial import TrialState

    return next((t for t in study.trials if t.state == TrialState.COMPLETE and t.user_attrs.get(BASELINE_ATTR)), None)


def baseline_outcome(study, cfg: Config) -> dict[str, Any] | None:
    """The baseline trial's values and the complete trials that beat it on every objective."""
    from optuna.trial import TrialState

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    base = baseline_trial(study)
    if base is None:
        return None
    objectives = cfg.tune.objectives
    return {"trial": base.number, "objective": dict(zip(objectives, base.values)),
            "dominated_by": [t.number for t in complete if dominates(t.values, base.values, objectives)]}


def write_outputs(study, cfg: Config, out_dir: Path) -> dict[str, Path]:
    """best_params.yaml, trials.csv and plots (history, importances, Pareto front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import yaml
    from optuna.trial import TrialState

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    write_text_atomic(out_dir / "trials.csv", study.trials_dataframe().to_csv(index=False))
    paths["trials"] = out_dir / "trials.csv"
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        return paths
    best = best_overrides(study, cfg)
    values = dict(zip(cfg.tune.objectives, best_trial(study, cfg).values))
    text = ("# Best trial of study '%s' (%d complete trials). Apply with: python src/tune.py --apply\n"
            % (study.study_name, len(complete)))
    text += yaml.safe_dump({"objective": values, "params": best, "baseline": baseline_outcome(study, cfg)},
                           sort_keys=True)
    write_text_atomic(out_dir / "best_params.yaml", text)
    paths["best"] = out_dir / "best_params.yaml"
    vis = optuna.visualization.matplotlib
    plots = {"history": lambda: vis.plot_optimization_history(
        study, target=(lambda t: t.values[0]) if len(cfg.tune.objectives) > 1 else None,
        target_name=cfg.tune.objectives[0])}
    if len(complete) >= 2:
        plots["importances"] = lambda: vis.plot_param_importances(
            study, target=(lambda t: t.values[0]) if len(cfg.tune.objectives) > 1 else None)
    if len(cfg.tune.objectives) > 1:
        plots["pareto"] = lambda: vis.plot_pareto_front(study, target_names=cfg.tune.objectives)
    import warnings

    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
                ax = fn()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(7, 4)
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}.png", dpi=90)
            plt.close(fig)
            paths[name] = out_dir / f"{name}.png"
        except (ValueError, RuntimeError) as exc:  # e.g. importances of a constant objective
            log.warning("plot %s skipped: %s", name, exc)
    return paths


def apply_to_params(best: dict[str, Any], params_path: Path) -> list[str]:
    """Write the best trial's dotted-key values into params.yaml, keeping its comments and layout."""
    return edit_params(params_path, best)
