"""The loss study: which adversarial objective (x which generator) makes the better SRGAN.

``run_study`` queues one DVC experiment per (objective, seed[, architecture]) with ``dvc exp run
--queue -S adv.loss=... -S gan.seed=...``, runs the queue (``--run-all --jobs N``), and every
experiment starts from the one pretrained generator of its architecture: the pretrain stage's
params do not change, so DVC's run cache hands it over instead of training it again. The study
then finds each experiment's MLflow run (by the params digest its config has), nests it under one
study parent run, and ``write_report`` renders reports/compare/: per evaluation set a table per
objective (mean and spread over seeds) with SRResNet and bicubic rows, the same crops from every
objective side by side, and a perception-distortion scatter (PSNR-Y against NIQE).
"""

from __future__ import annotations

import html
import io
import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import dataio, tracking
from .config import ROOT, TRAINING_SECTIONS, Config, replace

log = logging.getLogger(__name__)

METRICS = ("psnr_y", "ssim_y", "niqe")
LABELS = {"psnr_y": "PSNR-Y (dB)", "ssim_y": "SSIM-Y", "niqe": "NIQE (lower is better)"}


@dataclass(frozen=True)
class Experiment:
    """One cell of the study: a name for DVC and the params it sets."""

    name: str
    loss: str
    seed: int
    arch: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self, base: Config) -> Config:
        return replace(base, self.overrides)


def plan(cfg: Config, study_id: str) -> list[Experiment]:
    """Every (architecture, objective, seed) of ``study.*`` as a DVC experiment."""
    st = cfg.study
    out = []
    for arch in st.archs:
        for loss in st.losses:
            for seed in st.seeds:
                over: dict[str, Any] = {"adv.loss": loss, "gan.seed": seed}
                if arch != cfg.model.generator.arch:
                    over["model.generator.arch"] = arch
                out.append(Experiment(f"{study_id}-{arch}-{loss}-s{seed}", loss, seed, arch, over))
    return out


def _dvc(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)


def run_experiments(exps: Sequence[Experiment], jobs: int, cwd: Path = ROOT) -> bool:
    """Queue ``exps`` and run the queue (blocking); False if DVC reported a failed experiment
    (the study then reports the cells that have a finished run and names the others)."""
    for e in exps:
        sets = [a for k, v in e.overrides.items() for a in ("-S", f"{k}={v}")]
        out = _dvc(["exp", "run", "--queue", "-n", e.name, *sets], cwd)
        if out.returncode:
            raise RuntimeError(f"dvc exp run --queue {e.name} failed:\n{out.stderr[-2000:]}")
    log.info("running %d queued experiments with %d job(s)", len(exps), jobs)
    out = _dvc(["exp", "run", "--run-all", "--jobs", str(jobs)], cwd)
    if out.returncode:
        log.warning("dvc exp run --run-all reported failures:\n%s", (out.stdout + out.stderr)[-3000:])
    return out.returncode == 0


def find_run(cfg: Config, experiment: str) -> dict[str, Any] | None:
    """The newest finished adversarial run trained under exactly ``cfg`` (by its params digest)."""
    digest = cfg.digest(TRAINING_SECTIONS)
    runs = tracking.search_runs(experiment, f"tags.`params.training_digest` = '{digest}' and "
                                           "tags.phase = 'gan' and attributes.status = 'FINISHED'")
    return max(runs, key=lambda r: r["start_time"]) if runs else None


def collect(cfg: Config, exps: Sequence[Experiment], parent_run_id: str | None = None,
            study_id: str = "") -> list[dict[str, Any]]:
    """One row per experiment that has a finished run: its eval metrics, run ids and config.

    With ``parent_run_id`` each run is nested under the study's parent run (a tag on the finished
    run: MLflow's UI then lists and compares them together).
    """
    rows = []
    for e in exps:
        run = find_run(e.config(cfg), cfg.tracking.experiment)
        if run is None:
            log.warning("%s: no finished run found (failed or not run)", e.name)
            continue
        if parent_run_id:
            tracking.Run(run["run_id"]).set_tags({"mlflow.parentRunId": parent_run_id, "study": study_id,
                                                  "study.experiment": e.name})
        rows.append({"experiment": e.name, "loss": e.loss, "seed": e.seed, "arch": e.arch,
                     "run_id": run["run_id"], "srresnet_run_id": run["tags"].get("srresnet.run_id"),
                     "metrics": run["metrics"]})
    return rows


def _metric(row: Mapping[str, Any], set_name: str, key: str, prefix: str = "") -> float | None:
    return row["metrics"].get(f"eval/{set_name}/{prefix}{key}")


def summarize(rows: Sequence[Mapping[str, Any]], sets: Sequence[str]) -> dict[str, Any]:
    """Per set: per (arch, objective) mean and std over seeds of each metric; SRResNet, bicubic."""
    out: dict[str, Any] = {}
    for s in sets:
        groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for r in rows:
            groups.setdefault((r["arch"], r["loss"]), []).append(r)
        table = []
        for (arch, loss), rs in sorted(groups.items()):
            entry: dict[str, Any] = {"arch": arch, "method": loss, "seeds": len(rs)}
            for k in METRICS:
                vals = [v for r in rs if (v := _metric(r, s, k)) is not None]
                if vals:
                    entry[k] = float(np.mean(vals))
                    entry[f"{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
            table.append(entry)
        refs = []
        for prefix, label in (("bicubic_", "bicubic"), ("hr_", "HR")):
            ref = {"arch": "-", "method": label, "seeds": 0}
            for k in METRICS:
                vals = [v for r in rows if (v := _metric(r, s, k, prefix)) is not None]
                if vals:
                    ref[k] = float(np.mean(vals))
            refs.append(ref)
        out[s] = {"objectives": table, "references": refs}
    return out


def srresnet_rows(rows: Sequence[Mapping[str, Any]], sets: Sequence[str], experiment: str) -> dict[str, Any]:
    """Each architecture's pretrained (PSNR-oriented) generator, from the run the study started from."""
    out: dict[str, Any] = {}
    for arch in sorted({r["arch"] for r in rows}):
        ids = {r["srresnet_run_id"] for r in rows if r["arch"] == arch and r["srresnet_run_id"]}
        for run_id in ids:
            runs = tracking.search_runs(experiment, f"attributes.run_id = '{run_id}'")
            if runs:
                m = runs[0]["metrics"]
                out[arch] = {s: {k: m.get(f"eval/{s}/{k}") for k in METRICS} for s in sets}
    return out


# --------------------------------------------------------------------------- report
def scatter_png(rows: Sequence[Mapping[str, Any]], set_name: str, refs: Mapping[str, Any]) -> bytes | None:
    """PSNR-Y (x) against NIQE (y, lower is better) of every run, coloured by objective."""
    pts = [(r, _metric(r, set_name, "psnr_y"), _metric(r, set_name, "niqe")) for r in rows]
    pts = [(r, x, y) for r, x, y in pts if x is not None and y is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted({f"{r['loss']}" + (f" ({r['arch']})" if len({q['arch'] for q in rows}) > 1 else "")
                     for r, _, _ in pts})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(losses)}
    markers = {a: m for a, m in zip(sorted({r["arch"] for r in rows}), "os^Dv")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, x, y in pts:
        key = f"{r['loss']}" + (f" ({r['arch']})" if len(markers) > 1 else "")
        ax.scatter(x, y, color=colors[key], marker=markers[r["arch"]], s=40, label=key)
    for name, ref in refs.items():
        if ref.get("psnr_y") is not None and ref.get("niqe") is not None:
            ax.scatter(ref["psnr_y"], ref["niqe"], color="k", marker="x", s=60)
            ax.annotate(name, (ref["psnr_y"], ref["niqe"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="best")
    ax.set_xlabel("PSNR-Y (dB): distortion, higher is better")
    ax.set_ylabel("NIQE: perception, lower is better")
    ax.set_title(f"perception-distortion plane, {set_name}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def crops(rows: Sequence[Mapping[str, Any]], valid_dir: Path, srresnet: Path | None, out_dir: Path,
          scale: int, ev: Any, n_images: int, size: int) -> list[Path]:
    """The same detail of ``n_images`` validation images from every objective (its first seed),
    the SRResNet and HR side by side, written to ``out_dir/crops/<image>.png``."""
    from . import evaluate, images, models, viz

    first = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        first.setdefault((r["arch"], r["loss"]), r)
    upscalers = {}
    for (arch, loss), r in sorted(first.items()):
        model = models.load_generator(tracking.download_model(r["run_id"]))
        upscalers[f"{loss}" + (f"/{arch}" if len({a for a, _ in first}) > 1 else "")] = \
            evaluate.generator_upscaler(model, ev)
    if srresnet is not None and srresnet.is_file():
        upscalers = {"SRResNet": evaluate.generator_upscaler(models.load_generator(srresnet), ev), **upscalers}
    paths = []
    for pair in dataio.load_pairs(valid_dir, limit=n_images):
        r, c = viz.detail_box(pair.hr, size)
        z = min(size, pair.hr.shape[0], pair.hr.shape[1])
        outs = {name: fn(pair.lr, scale) for name, fn in upscalers.items()}
        row = viz.crop_row([images.upscale_bicubic(pair.lr, scale), *outs.values(), pair.hr], (r, c, z), factor=2)
        path = out_dir / "crops" / f"{pair.name}.png"
        images.save_png(path, row)
        paths.append(path)
    dataio.write_json_atomic(out_dir / "crops" / "order.json", ["bicubic", *upscalers, "HR"])
    return paths


def _fmt(entry: Mapping[str, Any], k: str) -> str:
    v = entry.get(k)
    if v is None:
        return ""
    digits = 4 if k == "ssim_y" else 2 if k == "psnr_y" else 2
    std = entry.get(f"{k}_std")
    return f"{v:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None and entry.get("seeds", 0) > 1 else "")


def write_report(cfg: Config, rows: Sequence[Mapping[str, Any]], out_dir: Path, valid_dir: Path,
                 srresnet: Path | None, study_id: str, seconds: float | None = None) -> Path:
    """reports/compare/{index.html, study.json, runs.csv, crops/}: the study's result page."""
    from . import report

    out_dir = Path(out_dir)
    sets = list(cfg.evaluate.sets)
    summary = summarize(rows, sets)
    pre = srresnet_rows(rows, sets, cfg.tracking.experiment)
    crop_paths = crops(rows, valid_dir, srresnet, out_dir, cfg.preprocess.scale, cfg.evaluate,
                       cfg.study.crop_images, cfg.study.crop_size) if rows else []
    flat = [{"experiment": r["experiment"], "arch": r["arch"], "loss": r["loss"], "seed": r["seed"],
             "run_id": r["run_id"], **{f"{s}_{k}": _metric(r, s, k) for s in sets for k in METRICS}} for r in rows]
    dataio.write_csv_atomic(out_dir / "runs.csv", flat)
    dataio.write_json_atomic(out_dir / "study.json", {"study": study_id, "seconds": seconds, "summary": summary,
                                                      "srresnet": pre, "runs": flat})
    parts = [report.page_head(f"Loss study {study_id}"),
             f"<h1>Which adversarial objective makes the better SRGAN?</h1>"
             f"<p class=muted>Study <code>{html.escape(study_id)}</code>: {len(rows)} runs "
             f"({', '.join(cfg.study.losses)} x seeds {cfg.study.seeds} x {', '.join(cfg.study.archs)}), "
             f"{cfg.gan.steps} adversarial steps each from one pretrained generator per architecture"
             + (f", {seconds / 60:.1f} min" if seconds else "") + ". Mean ± standard deviation over seeds.</p>"]
    for s in sets:
        head = "".join(f"<th>{html.escape(LABELS[k])}</th>" for k in METRICS)
        body = []
        for e in summary[s]["objectives"]:
            body.append(f"<tr><td>{html.escape(e['method'])}</td><td>{html.escape(e['arch'])}</td>"
                        f"<td>{e['seeds']}</td>" + "".join(f"<td>{_fmt(e, k)}</td>" for k in METRICS) + "</tr>")
        for arch, per_set in pre.items():
            body.append(f"<tr class=ref><td>pretrained (pixel loss, no GAN)</td><td>{html.escape(arch)}</td><td>-</td>"
                        + "".join(f"<td>{_fmt(per_set[s], k)}</td>" for k in METRICS) + "</tr>")
        for ref in summary[s]["references"]:
            body.append(f"<tr class=ref><td>{ref['method']}</td><td>-</td><td>-</td>"
                        + "".join(f"<td>{_fmt(ref, k)}</td>" for k in METRICS) + "</tr>")
        parts.append(f"<h2 id='set-{html.escape(s)}'>{html.escape(s)}</h2><table><thead><tr><th>objective</th>"
                     f"<th>generator</th><th>seeds</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        refs = {"bicubic": summary[s]["references"][0], **{f"pretrained {a}": pre[a][s] for a in pre}}
        png = scatter_png(rows, s, refs)
        if png:
            dataio.write_bytes_atomic(out_dir / f"scatter_{s}.png", png)
            parts.append(f"<figure><img alt='perception-distortion {html.escape(s)}' "
                         f"src='{report.data_uri(out_dir / f'scatter_{s}.png')}'><figcaption>one point per run; "
                         "x: bicubic and SRResNet</figcaption></figure>")
    if crop_paths:
        order = dataio.read_json(out_dir / "crops" / "order.json", [])
        parts.append("<h2 id=crops>The same detail from every objective</h2>"
                     f"<p class=muted>left to right: {html.escape(' | '.join(order))} (first seed, 2x enlarged)</p>")
        parts += [f"<figure><img alt='{html.escape(p.stem)}' src='{report.data_uri(p)}'>"
                  f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in crop_paths]
    parts.append("<h2>Runs</h2>" + report.table(flat) + "</body></html>")
    page = out_dir / "index.html"
    dataio.write_text_atomic(page, "\n".join(parts))
    return page


def new_study_id() -> str:
    return time.strftime("study-%Y%m%d-%H%M%S")
