"""Evaluate stage core: every method (bicubic, the SRResNet, the SRGAN) on every evaluation set.

One scoring path for the whole project: :func:`score_pair` (PSNR-Y, SSIM-Y, PSNR-RGB in the
published convention, see ``metrics``) is what training validation, this stage, tuning and the
study report all call. Writes reports/metrics.json (DVC metrics; per set, per method),
reports/per_image.csv, comparison images under reports/eval/, and returns the same numbers so
the caller can log them to each model's MLflow run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import dataio, images, metrics, viz
from .config import EvaluateConfig
from .dataio import Pair

log = logging.getLogger(__name__)

METRIC_KEYS = ("psnr_y", "ssim_y", "psnr_rgb")
HIGHER_IS_BETTER = {"psnr_y": True, "ssim_y": True, "psnr_rgb": True, "niqe": False}
BASELINE = "bicubic"
ENSEMBLE_SUFFIX = "_x8"  # a generator scored with the 8-way self-ensemble
COMPARISONS_PER_SET = 6  # comparison images written per evaluation set (keeps reports light)

Upscaler = Callable[[np.ndarray, int], np.ndarray]  # (lr uint8, scale) -> sr uint8


def score_pair(sr: np.ndarray, hr: np.ndarray, scale: int) -> dict[str, float]:
    """The metrics of one SR/HR uint8 pair (border = ``scale``)."""
    return metrics.evaluate_pair(sr, hr, scale)


def mean_scores(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float]:
    """Mean of every metric over the rows that have it (NIQE is missing for images too small)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def niqe_score(img: np.ndarray, model: Any, scale: int) -> float | None:
    """NIQE (lower is better) with the evaluation's border, or None when the image is too small
    for NIQE's 96-px patches at both scales."""
    from . import niqe

    try:
        return niqe.niqe(img, model, border=scale)
    except niqe.NiqeError as exc:
        log.warning("NIQE skipped: %s", exc)
        return None


def load_niqe(ev: EvaluateConfig, model_dir: Path | None = None) -> Any:
    """The configured NIQE model (None for ``evaluate.niqe: none``); ``model_dir`` holds the MATLAB
    model fetched by the evaluation-sets stage (never downloaded here)."""
    from . import niqe

    if ev.niqe == "none":
        return None
    return niqe.load_model(ev.niqe, cache_dir=model_dir, download=False)


def bicubic_scores(pairs: Iterable[Pair], scale: int) -> list[dict[str, float]]:
    """Per-image metrics of the bicubic baseline."""
    return [score_pair(images.upscale_bicubic(p.lr, scale), p.hr, scale) for p in pairs]


def generator_upscaler(model: Any, ev: EvaluateConfig, self_ensemble: bool = False) -> Upscaler:
    """Whole-image tiled upscaling with a generator, as evaluation runs it."""
    from . import inference

    def run(lr: np.ndarray, scale: int) -> np.ndarray:
        return inference.upscale(model, lr, scale, tile=ev.tile, overlap=ev.tile_overlap, self_ensemble=self_ensemble)

    return run


def evaluate_sets(methods: Mapping[str, Upscaler], sets: Mapping[str, Path], scale: int, out_dir: Path,
                  zoom: int, shown: Sequence[str] | None = None,
                  niqe_model: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score every method on every image of every set.

    ``methods``: name -> upscaler (bicubic included by the caller); ``sets``: name -> folder with
    hr/ and lr/. Writes ``out_dir/<set>/<image>_compare.png`` for the first images of each set,
    showing the methods named in ``shown`` (default: all). Returns (summary, per-image rows): the
    summary holds, per set, ``n_images`` and per method the mean of each metric plus, for every
    method but bicubic, ``<metric>_gain`` over bicubic (for NIQE a negative gain is better); with
    ``niqe_model`` also NIQE of every output and of the HR images themselves (``hr``).
    """
    summary: dict[str, Any] = {"scale": scale}
    rows: list[dict[str, Any]] = []
    shown = list(shown or methods)
    for set_name, folder in sets.items():
        per_method: dict[str, list[dict[str, float | None]]] = {m: [] for m in methods}
        hr_niqe: list[dict[str, float | None]] = []
        for i, p in enumerate(dataio.iter_pairs(folder)):
            outputs = {m: fn(p.lr, scale) for m, fn in methods.items()}
            row: dict[str, Any] = {"set": set_name, "name": p.name}
            for m, sr in outputs.items():
                s: dict[str, float | None] = dict(score_pair(sr, p.hr, scale))
                if niqe_model is not None:
                    s["niqe"] = niqe_score(sr, niqe_model, scale)
                per_method[m].append(s)
                row.update({f"{m}_{k}": v for k, v in s.items()})
            if niqe_model is not None:
                hr_niqe.append({"niqe": niqe_score(p.hr, niqe_model, scale)})
                row["hr_niqe"] = hr_niqe[-1]["niqe"]
            rows.append(row)
            if i < COMPARISONS_PER_SET:
                panels = [outputs[m] for m in shown if m in outputs]
                images.save_png(Path(out_dir) / set_name / f"{p.name}_compare.png",
                                viz.comparison_panels(p.lr, panels, p.hr, zoom))
            log.info("%s/%s: %s", set_name, p.name, ", ".join(
                f"{m} {row[f'{m}_psnr_y']:.2f} dB" for m in methods))
        block: dict[str, Any] = {"n_images": len(per_method[next(iter(methods))])}
        base = mean_scores(per_method[BASELINE]) if BASELINE in per_method else {}
        for m, scores in per_method.items():
            means = mean_scores(scores)
            if m != BASELINE and base:
                means.update({f"{k}_gain": means[k] - base[k] for k in list(means) if k in base})
            block[m] = means
        if niqe_model is not None:
            block["hr"] = mean_scores(hr_niqe)
            block["niqe_model"] = getattr(niqe_model, "name", str(niqe_model))
        summary[set_name] = block
    return summary, rows


def evaluate(ev: EvaluateConfig, scale: int, generators: Mapping[str, Path], sets: Mapping[str, Path],
             reports_dir: Path, niqe_dir: Path | None = None) -> dict[str, Any]:
    """The evaluate stage: bicubic and each generator file (name -> .keras) on every set.

    Writes reports/metrics.json, reports/per_image.csv and reports/eval/; returns the summary.
    ``niqe_dir``: where the evaluation-sets stage put NIQE's MATLAB model (``evaluate.niqe: matlab``).
    """
    from . import models

    methods: dict[str, Upscaler] = {BASELINE: images.upscale_bicubic}
    for name, path in generators.items():
        model = models.load_generator(path)
        methods[name] = generator_upscaler(model, ev)
        if ev.self_ensemble:
            # reported next to, never instead of, the single pass: it costs 8 passes
            methods[name + ENSEMBLE_SUFFIX] = generator_upscaler(model, ev, self_ensemble=True)
    shown = [m for m in methods if not m.endswith(ENSEMBLE_SUFFIX)]
    reports_dir = Path(reports_dir)
    summary, rows = evaluate_sets(methods, sets, scale, reports_dir / "eval", ev.zoom, shown,
                                  niqe_model=load_niqe(ev, niqe_dir))
    dataio.write_csv_atomic(reports_dir / "per_image.csv", rows, float_format=".6f")
    dataio.write_json_atomic(reports_dir / "metrics.json", summary)
    return summary


def run_metrics(summary: Mapping[str, Any], method: str) -> dict[str, float]:
    """The flat MLflow metrics of one method: ``eval/<set>/<metric>`` (+ the bicubic baseline's)."""
    out: dict[str, float] = {}
    for set_name, block in summary.items():
        if not isinstance(block, dict):
            continue
        for m, prefix in ((method, ""), (method + ENSEMBLE_SUFFIX, "x8_"), (BASELINE, "bicubic_"), ("hr", "hr_")):
            for k, v in block.get(m, {}).items():
                if m in (BASELINE, "hr") and k.endswith("_gain"):
                    continue
                out[f"eval/{set_name}/{prefix}{k}"] = v
    return out
