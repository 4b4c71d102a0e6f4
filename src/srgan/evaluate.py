"""Evaluate stage core: the generator on every whole validation image, against bicubic.

Writes reports/metrics.json (DVC metrics), reports/per_image.csv, comparison images under
reports/eval/, and returns the metrics so the caller can log them to the model's MLflow run.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from . import images, inference, metrics
from .config import Config
from .fsutil import write_json_atomic

log = logging.getLogger(__name__)

METRIC_KEYS = ("psnr_y", "ssim_y", "psnr_rgb")


def iter_valid(processed_dir: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, lr, hr) of every validation image, one at a time (bounded memory)."""
    hr_dir = Path(processed_dir) / "valid" / "hr"
    lr_dir = Path(processed_dir) / "valid" / "lr"
    files = sorted(hr_dir.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no validation images in {hr_dir}: run the preprocess stage first")
    for hr_path in files:
        yield hr_path.stem, images.load_rgb(lr_dir / hr_path.name), images.load_rgb(hr_path)


def detail_box(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left of the ``size`` square with the most gradient energy: where SR methods differ most."""
    y = hr.astype(np.float32).mean(axis=2)
    energy = np.abs(np.diff(y, axis=0))[:, :-1] + np.abs(np.diff(y, axis=1))[:-1, :]
    size = min(size, energy.shape[0], energy.shape[1])
    # integral image: the energy of every window in O(HW)
    ii = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    win = ii[size:, size:] - ii[:-size, size:] - ii[size:, :-size] + ii[:-size, :-size]
    r, c = np.unravel_index(np.argmax(win), win.shape)
    return int(r), int(c)


def comparison_image(lr: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray,
                     zoom: int) -> np.ndarray:
    """Top row LR (nearest) | bicubic | SR | HR; bottom row the same zoomed detail, enlarged."""
    from .trainer import image_grid

    top = image_grid(lr, bicubic, sr, hr)
    r, c = detail_box(hr, zoom)
    z = min(zoom, hr.shape[0], hr.shape[1])
    s = hr.shape[0] // lr.shape[0]
    crops = [np.repeat(np.repeat(lr, s, 0), s, 1), bicubic, sr, hr]
    crops = [im[r:r + z, c:c + z] for im in crops]
    # enlarge the detail so it spans the width of one panel (nearest: show pixels as they are)
    f = max(1, hr.shape[1] // z)
    crops = [np.repeat(np.repeat(x, f, 0), f, 1) for x in crops]
    sep = np.full((crops[0].shape[0], 4, 3), 255, np.uint8)
    bottom = np.concatenate([crops[0], sep, crops[1], sep, crops[2], sep, crops[3]], axis=1)
    pad = top.shape[1] - bottom.shape[1]
    bottom = np.pad(bottom, ((0, 0), (0, max(pad, 0)), (0, 0)), constant_values=255)[:, : top.shape[1]]
    # mark the detail box on the HR panel of the top row
    top = top.copy()
    x0 = 3 * (hr.shape[1] + 4) + c
    color = np.array([255, 0, 0], np.uint8)
    top[r, x0:x0 + z] = top[min(r + z - 1, hr.shape[0] - 1), x0:x0 + z] = color
    top[r:r + z, x0] = top[r:r + z, min(x0 + z - 1, top.shape[1] - 1)] = color
    band = np.full((6, top.shape[1], 3), 255, np.uint8)
    return np.concatenate([top, band, bottom], axis=0)


def evaluate(cfg: Config, model_path: Path, processed_dir: Path, reports_dir: Path) -> dict:
    """Run the generator over all validation images; write the metric files; return the summary."""
    from . import models

    scale, ev = cfg.preprocess.scale, cfg.evaluate
    reports_dir = Path(reports_dir)
    eval_dir = reports_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    model = models.load_generator(model_path)
    rows = []
    for name, lr, hr in iter_valid(processed_dir):
        sr = inference.upscale(model, lr, scale, tile=ev.tile, overlap=ev.tile_overlap)
        bic = images.upscale_bicubic(lr, scale)
        m_sr = metrics.evaluate_pair(sr, hr, scale)
        m_bic = metrics.evaluate_pair(bic, hr, scale)
        row = {"name": name, **m_sr, **{f"bicubic_{k}": v for k, v in m_bic.items()}}
        if ev.self_ensemble:
            # reported next to, never instead of, the single-pass figures: it costs 8 passes
            sr8 = inference.upscale(model, lr, scale, tile=ev.tile, overlap=ev.tile_overlap,
                                    self_ensemble=True)
            row.update({f"x8_{k}": v for k, v in metrics.evaluate_pair(sr8, hr, scale).items()})
        rows.append(row)
        images.save_png(eval_dir / f"{name}_compare.png", comparison_image(lr, bic, sr, hr, ev.zoom))
        images.save_png(eval_dir / f"{name}_sr.png", sr)
        log.info("%s: PSNR-Y %.2f dB (bicubic %.2f), SSIM-Y %.4f (bicubic %.4f)", name,
                 m_sr["psnr_y"], m_bic["psnr_y"], m_sr["ssim_y"], m_bic["ssim_y"])
    summary: dict = {"n_images": len(rows), "scale": scale}
    for k in METRIC_KEYS:
        for prefix in ("", "bicubic_", "x8_"):
            if f"{prefix}{k}" in rows[0]:
                summary[f"{prefix}{k}"] = float(np.mean([r[f"{prefix}{k}"] for r in rows]))
    summary["psnr_y_gain"] = summary["psnr_y"] - summary["bicubic_psnr_y"]
    if "x8_psnr_y" in summary:
        summary["x8_psnr_y_gain"] = summary["x8_psnr_y"] - summary["bicubic_psnr_y"]
    summary["ssim_y_gain"] = summary["ssim_y"] - summary["bicubic_ssim_y"]
    write_per_image(reports_dir / "per_image.csv", rows)
    write_json_atomic(reports_dir / "metrics.json", summary)
    return {"summary": summary, "rows": rows}


def write_per_image(path: Path, rows: list[dict]) -> None:
    """Per-image table (CSV), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)
