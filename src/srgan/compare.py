"""Compare training runs of an MLflow experiment by adversarial loss and Per-Pix weights.

The seed project's study of objective functions: one row per run with its loss configuration and
validation/evaluation metrics, as markdown and CSV, plus PSNR/SSIM plots.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from . import tracking
from .dataio import write_text_atomic

COLUMNS = ["run_name", "run_id", "adv.loss", "loss.w_mse", "loss.w_vgg", "loss.w_adv", "vgg.layer",
           "steps", "psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y", "psnr_y_gain", "source"]


def collect(experiment: str, include_trials: bool = False) -> list[dict[str, Any]]:
    """One row per finished training run (tuning trials only if asked)."""
    rows = []
    for r in tracking.search_runs(experiment, "attributes.status = 'FINISHED'"):
        tags, p, m = r["tags"], r["params"], r["metrics"]
        if tags.get("kind") == "tune" or tags.get("phase") == "pretrain":  # no adversarial loss to compare
            continue
        is_trial = "optuna.trial" in tags
        if is_trial and not include_trials:
            continue
        # prefer the evaluate stage's whole-image numbers; fall back to training-time validation
        if "eval/valid/psnr_y" in m:
            psnr, ssim, src = m["eval/valid/psnr_y"], m.get("eval/valid/ssim_y"), "evaluate"
            b_psnr, b_ssim = m.get("eval/valid/bicubic_psnr_y"), m.get("eval/valid/bicubic_ssim_y")
        elif "val_psnr_y" in m:
            psnr, ssim, src = m["val_psnr_y"], m.get("val_ssim_y"), "validation"
            b_psnr, b_ssim = m.get("bicubic_psnr_y"), m.get("bicubic_ssim_y")
        else:
            continue
        rows.append({
            "run_name": r["run_name"], "run_id": r["run_id"], "adv.loss": p.get("adv.loss"),
            "loss.w_mse": _num(p.get("loss.w_mse")), "loss.w_vgg": _num(p.get("loss.w_vgg")),
            "loss.w_adv": _num(p.get("loss.w_adv")), "vgg.layer": p.get("vgg.layer"),
            "steps": int(m.get("total_steps", 0)) or None, "psnr_y": psnr, "ssim_y": ssim,
            "bicubic_psnr_y": b_psnr, "bicubic_ssim_y": b_ssim,
            "psnr_y_gain": psnr - b_psnr if b_psnr is not None else None, "source": src,
        })
    rows.sort(key=lambda r: (str(r["adv.loss"]), -(r["psnr_y"] or 0)))
    return rows


def _num(v: str | None) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 else f"{v:.4f}"
    return str(v)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows, plus a per-loss summary (best PSNR-Y per adversarial loss)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    best: dict[str, dict] = {}
    for r in rows:
        if r["adv.loss"] not in best or r["psnr_y"] > best[r["adv.loss"]]["psnr_y"]:
            best[r["adv.loss"]] = r
    lines += ["", "Best run per adversarial loss:", "", "| adv.loss | psnr_y | ssim_y | run |", "|---|---|---|---|"]
    lines += [f"| {k} | {_cell(v['psnr_y'])} | {_cell(v['ssim_y'])} | {v['run_name']} |" for k, v in sorted(best.items())]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Bar charts of PSNR-Y and SSIM-Y per run, coloured by adversarial loss, bicubic as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted({str(r["adv.loss"]) for r in rows})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(losses)}
    labels = [f"{r['run_name']}\n{r['adv.loss']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(rows) + 4), 4))
    for ax, key in zip(axes, ("psnr_y", "ssim_y")):
        vals = [r[key] or 0 for r in rows]
        ax.bar(range(len(rows)), vals, color=[colors[str(r["adv.loss"])] for r in rows])
        base = [r[f"bicubic_{key}"] for r in rows if r[f"bicubic_{key}"] is not None]
        if base:
            ax.axhline(sum(base) / len(base), color="k", ls="--", lw=1, label="bicubic")
            ax.legend()
        lo = min(vals + base) if vals else 0
        ax.set_ylim(lo - (1.0 if key == "psnr_y" else 0.05), None)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(key.replace("_", "-").upper())
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """runs.md, runs.csv and runs.png under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out_dir / "runs.csv", buf.getvalue())
    write_text_atomic(out_dir / "runs.md", to_markdown(rows))
    plot(rows, out_dir / "runs.png")
    return {"md": out_dir / "runs.md", "csv": out_dir / "runs.csv", "png": out_dir / "runs.png"}
