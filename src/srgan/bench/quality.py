"""Quality: a small config trained in float32 and in mixed_bfloat16 (same seeds), validation PSNR-Y.

Each (precision, seed) trains both phases with ``trainer.train`` in a fresh process. The precisions
are called equal when their mean PSNR-Y differs by no more than the seed-to-seed spread.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import config

PRECISIONS = ("float32", "mixed_bfloat16")


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Child job: pretrain + gan phases of ``spec['cfg']``; the final validation metrics."""
    from ..trainer import TrainData, train

    cfg = config.from_dict(spec["cfg"])
    data = TrainData.load(Path(spec["processed_dir"]), cfg.train.val_images)
    t0 = time.perf_counter()
    pre, _ = train(cfg, "pretrain", data)
    with tempfile.TemporaryDirectory() as tmp:
        init = pre.export_generator(Path(tmp) / "srresnet.keras")
        _, result = train(cfg, "gan", data, init_generator=init, data_offset=cfg.pretrain.steps)
    return {"precision": cfg.train.precision, "seed": cfg.seed, "seconds": time.perf_counter() - t0,
            "psnr_y": result.val["val_psnr_y"], "ssim_y": result.val["val_ssim_y"],
            "bicubic_psnr_y": data.baseline(cfg.preprocess.scale)["bicubic_psnr_y"]}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per precision: mean PSNR-Y and its seed spread (max - min); bf16 minus float32; the verdict."""
    out: dict[str, Any] = {}
    for prec, rs in runs.items():
        psnr = [r["psnr_y"] for r in rs]
        out[prec] = {"seeds": [r["seed"] for r in rs], "psnr_y": psnr, "mean": statistics.fmean(psnr),
                     "spread": max(psnr) - min(psnr), "seconds": sum(r["seconds"] for r in rs)}
    if all(p in out for p in PRECISIONS):
        f32, bf16 = out["float32"], out["mixed_bfloat16"]
        out["bf16_minus_f32_db"] = bf16["mean"] - f32["mean"]
        if len(f32["psnr_y"]) > 1:
            out["seed_spread_db"] = max(f32["spread"], bf16["spread"])
            out["equal_within_seed_spread"] = abs(out["bf16_minus_f32_db"]) <= out["seed_spread_db"]
    return out
