"""Preprocess stage: data/raw -> data/processed (TFRecord crops, validation PNGs, manifest).

Resumable: re-running keeps finished shards. All logic lives in ``srgan.preprocess``.
"""

from __future__ import annotations

import logging
import sys
import time

from srgan import config
from srgan.images import ImageError
from srgan.preprocess import PreprocessError, preprocess


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        cfg = config.load()
        m = preprocess(cfg, config.ROOT / "data" / "raw", config.ROOT / "data" / "processed")
    except (config.ConfigError, PreprocessError, ImageError) as exc:
        print(f"preprocess: error: {exc}", file=sys.stderr)
        return 1
    c = m["counts"]
    print(
        f"preprocess: {c['train_crops']} crops from {c['train_images']}/{c['train_files']} training images "
        f"in {c['shards']} shards, {c['valid_images']}/{c['valid_files']} validation images, "
        f"{c['skipped']} skipped, {time.perf_counter() - start:.1f} s (manifest digest {m['digest'][:12]})"
    )
    for s in m["skipped"]:
        print(f"  skipped {s['file']}: {s['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
