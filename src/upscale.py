"""Upscale images with a trained generator.

    python src/upscale.py --out DIR [--model models/generator.keras | runs:/RUN_ID | models:/NAME@ALIAS]
                          [--tile 128 --overlap 24] [--overwrite] [--max-pixels N] IMAGE_OR_DIR...

Folders are searched recursively for common image extensions; any size or mode is accepted
(grey, palette, alpha over white, 16-bit). Each input becomes <stem>_x<scale>.png in DIR (scale
read off the model); an image found in a folder argument keeps its sub-folder under DIR. Outputs
are written atomically. Before the first image is upscaled, these are refused with one ``error:``
line each: an output that already exists (unless --overwrite), a second input with the same output,
an input over --max-pixels LR pixels (read from the file header), and, inside a folder, whatever is
named like an image but is not a file (a folder, a FIFO, a broken symlink, a symlink loop) or is a
symlink to a folder (not followed). A bad file never stops the others; an output that another
process created meanwhile is kept, not replaced (without --overwrite); once the disk is full the
remaining images are reported, not computed. Exit code: 0 if every image was written, 1 if anything
failed, 130 on Ctrl-C (the image in progress is not written). --model takes a .keras file or an MLflow URI: runs:/RUN_ID[/model]
(the run's generator), models:/NAME@ALIAS or models:/NAME/VERSION (a registered version).
Tile defaults: params.yaml ``evaluate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from srgan import batch_upscale, config, quiet
from srgan.config import ROOT

# Used only when params.yaml cannot be read: its evaluate.tile / tile_overlap values, so a broken
# params file never blocks upscaling (the overlap covers the default generator's receptive field).
FALLBACK_TILE, FALLBACK_OVERLAP = 128, 24
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130  # 130 = 128 + SIGINT, the shell's Ctrl-C code


def _defaults() -> tuple[int, int]:
    """(tile, overlap) from params.yaml; a broken params file must not block upscaling."""
    try:
        ev = config.load().evaluate
    except config.ConfigError as exc:
        print(f"warning: {exc}; using tile {FALLBACK_TILE}, overlap {FALLBACK_OVERLAP}", file=sys.stderr)
        return FALLBACK_TILE, FALLBACK_OVERLAP
    return ev.tile, ev.tile_overlap


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    ap.add_argument("--model", default=str(ROOT / "models/generator.keras"),
                    help="generator: a .keras file, runs:/RUN_ID[/model], models:/NAME@ALIAS or models:/NAME/VERSION")
    ap.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    ap.add_argument("--tile", type=int, default=None, help="LR tile side in px, 0 = whole image")
    ap.add_argument("--overlap", type=int, default=None, help="LR px of context around each tile")
    ap.add_argument("--batch", type=int, default=1, help="tiles per model call")
    ap.add_argument("--self-ensemble", action="store_true",
                    help="average the 8 flips/rotations (EDSR's '+'): 8x slower, a float32 HR buffer "
                         "(12 bytes per output pixel), slightly higher PSNR")
    ap.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    ap.add_argument("--max-pixels", type=int, default=batch_upscale.DEFAULT_MAX_PIXELS, metavar="N",
                    help=f"refuse inputs of more than N LR pixels (default {batch_upscale.DEFAULT_MAX_PIXELS:_}: "
                         "at x4 the output takes 48 bytes per LR pixel)")
    quiet.add_verbose_option(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    written: list[Path] = []
    try:
        tile, overlap = _defaults()
        tile = tile if args.tile is None else args.tile
        overlap = overlap if args.overlap is None else args.overlap
        if tile < 0 or overlap < 0 or args.batch < 1 or args.max_pixels < 1:
            ap.error("--tile and --overlap must be >= 0, --batch and --max-pixels >= 1")
        return _run(args, tile, overlap, written)
    except KeyboardInterrupt:
        # One line, no traceback: outputs are renamed into place only when complete.
        print(f"interrupted: {len(written)} image(s) written to {args.out}; the one in progress was not",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace, tile: int, overlap: int, written: list[Path]) -> int:
    try:  # before TensorFlow loads: a bad --out costs no time
        out_dir = batch_upscale.prepare_out_dir(args.out)
    except batch_upscale.BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED

    quiet.quiet_native_startup()  # before TensorFlow is imported
    from srgan import inference, models, tracking  # models registers the custom layers for loading

    try:
        path = tracking.resolve_generator(args.model)  # a local file, or downloaded from MLflow
        model = models.load_generator(path)  # safe_mode=True: no arbitrary code from the file
        scale = inference.infer_scale(model)
    except Exception as exc:  # noqa: BLE001 - any load failure is one clear message, not a traceback
        print(f"error: cannot load generator {args.model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED

    def report(r: batch_upscale.FileResult) -> None:
        if r.ok:
            written.append(r.out)
            (lw, lh), (sw, sh) = r.lr_size, r.sr_size
            print(f"{r.src} -> {r.out} ({lw}x{lh} -> {sw}x{sh}, {r.seconds:.1f}s)", flush=True)
        else:
            print(f"error: {r.src}: {r.error}", file=sys.stderr, flush=True)

    results = batch_upscale.upscale_files(
        model, args.inputs, out_dir,
        tile=tile, overlap=overlap, scale=scale, batch=args.batch, on_result=report,
        self_ensemble=args.self_ensemble, overwrite=args.overwrite, max_pixels=args.max_pixels,
    )
    print(batch_upscale.summarize(results, out_dir, scale))
    return EXIT_OK if results and all(r.ok for r in results) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
