"""Evaluate stage core: every method (bicubic, the SRResNet, the SRGAN) on every evaluation set.

Scoring goes through ``metrics.Scorer``, the registry's one scoring path, which training-time
validation uses too. Writes reports/metrics.json (DVC metrics; per set, per method),
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
from .images import Pair

log = logging.getLogger(__name__)

BASELINE = "bicubic"
REFERENCE = "hr"  # the HR images' own no-reference scores (NIQE, artifact level)
VALID_SET = "valid"  # the validation set: the images training validates on
ENSEMBLE_SUFFIX = "_x8"  # a generator scored with the 8-way self-ensemble
COMPARISONS_PER_SET = 6  # comparison images written per evaluation set (keeps reports light)

Upscaler = Callable[[np.ndarray, int], np.ndarray]  # (lr uint8, scale) -> sr uint8


def bicubic_scores(pairs: Iterable[Pair], scorer: metrics.Scorer) -> list[dict[str, float | None]]:
    """Per-image metrics of the bicubic baseline."""
    return [scorer.score(images.upscale_bicubic(p.lr, scorer.scale), p) for p in pairs]


def generator_upscaler(model: Any, ev: EvaluateConfig, self_ensemble: bool = False) -> Upscaler:
    """Whole-image tiled upscaling with a generator, as evaluation runs it."""
    from . import inference

    def run(lr: np.ndarray, scale: int) -> np.ndarray:
        return inference.upscale(model, lr, scale, tile=ev.tile, overlap=ev.tile_overlap, self_ensemble=self_ensemble)

    return run


def evaluate_sets(methods: Mapping[str, Upscaler], sets: Mapping[str, Path], scorer: metrics.Scorer,
                  out_dir: Path, zoom: int, shown: Sequence[str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score every method on every image of every set with every metric of ``scorer``.

    ``methods``: name -> upscaler (bicubic included by the caller); ``sets``: name -> folder with
    hr/ and lr/. Writes ``out_dir/<set>/<image>_compare.png`` for the first images of each set,
    showing the methods named in ``shown`` (default: all). Returns (summary, per-image rows): the
    summary holds, per set, ``n_images`` and per method the mean of each metric plus, for every
    method but bicubic, ``<metric>_gain`` over bicubic (for lower-is-better metrics a negative
    gain is better), and the HR images' own no-reference scores (``hr``).
    """
    scale = scorer.scale
    summary: dict[str, Any] = {"scale": scale}
    rows: list[dict[str, Any]] = []
    shown = list(shown or methods)
    for set_name, folder in sets.items():
        per_method: dict[str, list[dict[str, float | None]]] = {m: [] for m in methods}
        hr_scores: list[dict[str, float | None]] = []
        for i, p in enumerate(images.iter_pairs(folder)):
            outputs = {m: fn(p.lr, scale) for m, fn in methods.items()}
            row: dict[str, Any] = {"set": set_name, "name": p.name}
            for m, sr in outputs.items():
                s = scorer.score(sr, p)
                per_method[m].append(s)
                row.update({f"{m}_{k}": v for k, v in s.items()})
            hr_scores.append(scorer.score_hr(p))
            row.update({f"{REFERENCE}_{k}": v for k, v in hr_scores[-1].items()})
            rows.append(row)
            if i < COMPARISONS_PER_SET:
                panels = [outputs[m] for m in shown if m in outputs]
                images.save_png(Path(out_dir) / set_name / f"{p.name}_compare.png",
                                viz.comparison_panels(p.lr, panels, p.hr, zoom))
            log.info("%s/%s: %s", set_name, p.name, ", ".join(
                f"{m} {row[f'{m}_psnr_y']:.2f} dB" for m in methods))
        block: dict[str, Any] = {"n_images": len(per_method[next(iter(methods))])}
        base = metrics.mean_scores(per_method[BASELINE]) if BASELINE in per_method else {}
        for m, scores in per_method.items():
            means = metrics.mean_scores(scores)
            if m != BASELINE and base:
                means.update({f"{k}_gain": means[k] - base[k] for k in list(means) if k in base})
            block[m] = means
        if any(hr_scores):
            block[REFERENCE] = metrics.mean_scores(hr_scores)
        if scorer.niqe_model is not None:
            block["niqe_model"] = scorer.niqe_model.name
        summary[set_name] = block
    return summary, rows


def evaluate(ev: EvaluateConfig, scale: int, generators: Mapping[str, Path], sets: Mapping[str, Path],
             reports_dir: Path, niqe_dir: Path | None = None,
             trained_on_valid: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """The evaluate stage: bicubic and each generator file (name -> .keras) on every set.

    Writes reports/metrics.json, reports/per_image.csv and reports/eval/; returns the summary.
    ``niqe_dir``: where the evaluation-sets stage put NIQE's MATLAB model (``evaluate.niqe: matlab``).
    ``trained_on_valid``: per generator, figures its training measured on the validation set (the
    discriminator's health), added to that generator's ``valid`` entry.
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
    scorer = metrics.Scorer.from_config(ev, scale, niqe_dir)
    summary, rows = evaluate_sets(methods, sets, scorer, reports_dir / "eval", ev.zoom, shown)
    for name, values in (trained_on_valid or {}).items():
        if VALID_SET in summary and name in summary[VALID_SET]:
            summary[VALID_SET][name].update(values)
    dataio.write_csv_atomic(reports_dir / "per_image.csv", rows, float_format=".6f")
    dataio.write_json_atomic(reports_dir / "metrics.json", summary)
    return summary


def run_metrics(summary: Mapping[str, Any], method: str) -> dict[str, float]:
    """The flat MLflow metrics of one method: ``eval/<set>/<metric>`` (+ the bicubic baseline's)."""
    out: dict[str, float] = {}
    for set_name, block in summary.items():
        if not isinstance(block, dict):
            continue
        for m, prefix in ((method, ""), (method + ENSEMBLE_SUFFIX, "x8_"), (BASELINE, "bicubic_"),
                          (REFERENCE, "hr_")):
            for k, v in block.get(m, {}).items():
                if m in (BASELINE, REFERENCE) and k.endswith("_gain"):
                    continue
                out[f"eval/{set_name}/{prefix}{k}"] = v
    return out
