"""Upscale images with a trained generator.

    python src/upscale.py --out DIR [--model models/generator.keras] [--tile 128 --overlap 16] IMAGE_OR_DIR...

Folders are searched recursively for common image extensions; any size or mode is accepted
(grey, palette, alpha over white, 16-bit). Each input becomes DIR/<stem>_x<scale>.png (scale read
off the model), written atomically. A bad file gets one ``error:`` line on stderr and the rest
still run; the exit code is 1 if anything failed, else 0. Tile defaults: params.yaml ``evaluate``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from srgan import config
from srgan.config import ROOT


def _defaults() -> config.EvaluateConfig:
    """Tile/overlap defaults from params.yaml; a broken params file must not block upscaling."""
    try:
        return config.load().evaluate
    except config.ConfigError as exc:
        print(f"warning: {exc}; using built-in tile defaults", file=sys.stderr)
        return config.EvaluateConfig()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    ap.add_argument("--model", type=Path, default=ROOT / "models/generator.keras", help="generator .keras")
    ap.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    ap.add_argument("--tile", type=int, default=None, help="LR tile side in px, 0 = whole image")
    ap.add_argument("--overlap", type=int, default=None, help="LR px of context around each tile")
    ap.add_argument("--batch", type=int, default=1, help="tiles per model call")
    ap.add_argument("--self-ensemble", action="store_true",
                    help="average the 8 flips/rotations (EDSR's '+'): 8x slower, a float32 HR buffer "
                         "(12 bytes per output pixel), slightly higher PSNR")
    args = ap.parse_args(argv)
    ev = _defaults()
    tile = ev.tile if args.tile is None else args.tile
    overlap = ev.tile_overlap if args.overlap is None else args.overlap
    if tile < 0 or overlap < 0 or args.batch < 1:
        ap.error("--tile and --overlap must be >= 0 and --batch >= 1")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    from srgan import inference, models  # models registers the custom layers for loading

    try:
        model = models.load_generator(args.model)  # safe_mode=True: no arbitrary code from the file
        scale = inference.infer_scale(model)
    except Exception as exc:  # noqa: BLE001 - any load failure is one clear message, not a traceback
        print(f"error: cannot load generator {args.model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    def report(r: inference.FileResult) -> None:
        if r.ok:
            (lw, lh), (sw, sh) = r.lr_size, r.sr_size
            print(f"{r.src} -> {r.out} ({lw}x{lh} -> {sw}x{sh}, {r.seconds:.1f}s)", flush=True)
        else:
            print(f"error: {r.src}: {r.error}", file=sys.stderr, flush=True)

    results = inference.upscale_files(
        model, args.inputs, args.out,
        tile=tile, overlap=overlap, scale=scale, batch=args.batch, on_result=report,
        self_ensemble=args.self_ensemble,
    )
    print(inference.summarize(results, args.out, scale))
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
