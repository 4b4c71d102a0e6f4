"""Export a trained generator for use outside this project, checked against the Keras model.

    python src/export.py --format savedmodel|onnx|litert --out DIR [--model models/generator.keras]
                         [--input-size HxW [--max-pixels N]] [--image PHOTO] [--tolerance T]

DIR gets the artifact (saved_model/, generator.onnx or generator.tflite) and export.json (max abs
difference from Keras on crops of a real photo, tolerance, sizes, times, versions). Input: float32
(batch, h, w, 3) in [0, 1] named "lr", batch and size dynamic unless --input-size fixes h, w.
ONNX needs `pip install tf2onnx==1.17.0 onnx==1.23.2 onnxruntime==1.32.0`; LiteRT is checked with
ai-edge-litert (`pip install ai-edge-litert==2.3.0`) or else tf.lite.Interpreter.
--input-size is bounded by --max-pixels (the check runs the model on that size). A model that is
not an image-to-image generator (say a classifier) or does not upscale (x1) is refused.
Any failure is one `error:` line and exit code 1, and DIR is left as it was.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from srgan import cli, limits, quiet
from srgan.config import ROOT

FORMAT_CHOICES = ("savedmodel", "onnx", "litert")  # = srgan.export.FORMATS, without importing TF for --help


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models/generator.keras", help="generator .keras")
    # No argparse `choices`: an unknown format is the project's one-line error, not a usage dump.
    ap.add_argument("--format", required=True, help=f"one of: {', '.join(FORMAT_CHOICES)}")
    ap.add_argument("--out", type=Path, required=True, help="output folder (replaced if it holds an export)")
    ap.add_argument("--input-size", default=None, metavar="HxW",
                    help="fix the LR input size (batch stays dynamic); default: any size")
    ap.add_argument("--max-pixels", type=int, default=limits.EXPORT_MAX_PIXELS, metavar="N",
                    help=f"refuse an --input-size of more than N pixels (default {limits.EXPORT_MAX_PIXELS:_}: "
                         "the check runs the model on that size)")
    ap.add_argument("--image", type=Path, default=None, help="photo to check on (default: skimage astronaut)")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="max abs difference allowed (default: per format)")
    quiet.add_verbose_option(ap)
    args = ap.parse_args(argv)
    cli.setup_logging()  # before TensorFlow is imported
    for chatty in ("tensorflow", "tf2onnx"):  # per-step INFO lines of the converters
        logging.getLogger(chatty).setLevel(logging.WARNING)

    def run() -> None:
        from srgan import export

        export.check_format(args.format)
        size = export.parse_size(args.input_size, args.max_pixels) if args.input_size else None
        r = export.export(args.model, args.format, args.out, input_size=size, tolerance=args.tolerance,
                          image=args.image)
        print(f"{r.format}: {args.out / r.file} ({r.size_bytes / 1e6:.2f} MB), "
              f"max abs diff {r.max_abs_diff:.3g} (tolerance {r.tolerance:g}) on {len(r.input_sizes)} "
              f"batches, export {r.export_seconds:.1f} s, "
              f"load {r.load_seconds:.1f} s [{r.runtime}]", flush=True)

    cli.run_main(run)


if __name__ == "__main__":
    main()
