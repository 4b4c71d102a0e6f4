"""Tiled upscaling (``inference.upscale`` with the evaluate stage's tile/overlap): speed and peak RSS.

One fresh process per image size, so the peak resident memory above the process's baseline
(TF and the model loaded) compares between sizes. The peak is the kernel's own high-water mark
of this process's memory (``VmHWM``, reset just before the timed call; not ``ru_maxrss``, which
keeps the parent's size across exec), recorded with whether it could be reset.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .. import config
from .timing import CpuMeter, peak_rss, reset_peak_rss


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Child job: upscale one random LR image of ``spec['lr_hw']``; time, HR MP/s and peak RSS."""
    import psutil

    from .. import inference, models
    from ..pipeline import MB

    cfg = config.from_dict(spec["cfg"])
    scale, ev = cfg.preprocess.scale, cfg.evaluate
    G = models.build_generator(cfg.model.generator, scale)
    h, w = spec["lr_hw"]
    lr = np.random.default_rng(cfg.seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    # Warm-up on a crop one window + 1 px wide: it has the image's window shape, so the cached trace
    # that the tiled path uses is ready, at the same cost for every image size.
    side = ev.tile + 2 * ev.tile_overlap + 1
    inference.upscale(G, lr[:side, :side], scale, tile=ev.tile, overlap=ev.tile_overlap)
    since_base = reset_peak_rss()  # the peak of the timed call only, where the OS can reset it
    base = psutil.Process().memory_info().rss
    with CpuMeter() as meter:
        t0 = time.perf_counter()
        inference.upscale(G, lr, scale, tile=ev.tile, overlap=ev.tile_overlap)
        seconds = time.perf_counter() - t0
    peak = max(peak_rss(), base)
    windows = len(inference.plan_windows(h, w, ev.tile, ev.tile_overlap)) if ev.tile else 1
    hr_mpix = h * w * scale * scale / 1e6
    return {"lr_hw": [h, w], "windows": windows, "seconds": seconds, "hr_mpix": hr_mpix,
            "hr_mpix_per_s": hr_mpix / seconds, "rss_base_mb": base / MB, "rss_peak_mb": peak / MB,
            "rss_above_base_mb": (peak - base) / MB, "peak_since_base": since_base, "cpu": meter.result}
