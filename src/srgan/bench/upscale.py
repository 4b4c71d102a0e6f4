"""Tiled upscaling (``inference.upscale`` with the evaluate stage's tile/overlap): speed and peak RSS.

One fresh process per image size, so the peak resident memory above the process's baseline
(TF and the model loaded) compares between sizes.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from .. import config
from .timing import CpuMeter

MB = 2**20
RSS_PERIOD_S = 0.005  # sampling period of the peak-RSS thread (TF allocates outside Python)


class RssSampler:
    """Peak resident set size of this process while the block runs, sampled in a thread."""

    def __enter__(self) -> RssSampler:
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(RSS_PERIOD_S):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Child job: upscale one random LR image of ``spec['lr_hw']``; time, HR MP/s and peak RSS."""
    import psutil

    from .. import inference, models

    cfg = config.from_dict(spec["cfg"])
    scale, ev = cfg.preprocess.scale, cfg.evaluate
    G = models.build_generator(cfg.model.generator, scale)
    h, w = spec["lr_hw"]
    lr = np.random.default_rng(cfg.seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    # Warm-up on a crop one window + 1 px wide: it has the image's window shape, so the cached trace
    # that the tiled path uses is ready, at the same cost for every image size.
    side = ev.tile + 2 * ev.tile_overlap + 1
    inference.upscale(G, lr[:side, :side], scale, tile=ev.tile, overlap=ev.tile_overlap)
    base = psutil.Process().memory_info().rss
    with RssSampler() as rss, CpuMeter() as meter:
        t0 = time.perf_counter()
        inference.upscale(G, lr, scale, tile=ev.tile, overlap=ev.tile_overlap)
        seconds = time.perf_counter() - t0
    windows = len(inference.plan_windows(h, w, ev.tile, ev.tile_overlap)) if ev.tile else 1
    hr_mpix = h * w * scale * scale / 1e6
    return {"lr_hw": [h, w], "windows": windows, "seconds": seconds, "hr_mpix": hr_mpix,
            "hr_mpix_per_s": hr_mpix / seconds, "rss_base_mb": base / MB, "rss_peak_mb": rss.peak / MB,
            "rss_above_base_mb": (rss.peak - base) / MB, "cpu": meter.result}
