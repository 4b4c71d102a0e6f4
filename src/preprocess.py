"""Preprocess stage: data/raw -> data/processed (TFRecord crops, validation PNGs, manifest).

    python src/preprocess.py [--params params.yaml] [--raw data/raw] [--processed data/processed]

Resumable: re-running keeps finished shards. All logic lives in ``srgan.preprocess``.
"""

import time

from srgan import cli
from srgan.config import Config
from srgan.images import ImageError
from srgan.preprocess import PreprocessError


def main(cfg: Config, args) -> None:
    from srgan.preprocess import preprocess

    start = time.perf_counter()
    m = preprocess(cfg, args.raw, args.processed)
    c = m["counts"]
    print(
        f"preprocess: {c['train_crops']} crops from {c['train_images']}/{c['train_files']} training images "
        f"in {c['shards']} shards, {c['valid_images']}/{c['valid_files']} validation images, "
        f"{c['skipped']} skipped, {time.perf_counter() - start:.1f} s (manifest digest {m['digest'][:12]})"
    )
    for s in m["skipped"]:
        print(f"  skipped {s['file']}: {s['reason']}")


if __name__ == "__main__":
    cli.stage(main, __doc__, {"raw": "data/raw", "processed": "data/processed"},
              expected=(PreprocessError, ImageError))
