"""Every bound that a request, a flag or the environment can push, with its default: one place.

Each is stated where it is used (``--help``, the served model's signature, the error that names it)
and can be changed there; what is not a pipeline param lives here rather than in params.yaml (which
holds what shapes a result, so changing it re-runs stages).
"""

from __future__ import annotations

# -- image size, in LR pixels per image (width x height of the input) -------------------------------
# `srgan upscale --max-pixels`: writing a PNG costs scale^2 x 3 bytes per LR pixel (48 at x4), so 50 MP
# is a 2.4 GB output and about an hour of tiled inference on 2 cores (0.23 HR MP/s).
UPSCALE_MAX_PIXELS = 50_000_000
# The served MLflow Model's `max_pixels` (model config, the signature's param default): the same
# limit in the same unit, smaller because MLflow's scoring server holds each image as JSON lists
# both ways, measured ~2.2 KB per LR pixel at x4 (a Python list per output pixel) where upscale
# holds 48 bytes; 512 x 512 LR -> a 2048 x 2048 answer: 26 s and 0.64 GB with the default generator
# on 2 cores, within MLflow's 60 s request timeout.
SERVE_MAX_PIXELS = 512 * 512
# A served request's JSON can spend at most this many bytes per allowed pixel before it is refused
# unparsed (an 8-bit pixel takes ~12 bytes as `[255, 255, 255], `; floats with 17 digits ~60).
SERVE_BODY_BYTES_PER_PIXEL = 64
# JSON nesting a served request may have: {"inputs": N x H x W x 3} is 5 deep, "params" 2.
SERVE_MAX_JSON_DEPTH = 8
# `srgan export --input-size HxW`: the check runs the Keras model and the export on that size
# (~0.5 KB of activations per LR pixel for the default generator, more for larger ones).
EXPORT_MAX_PIXELS = 4_000_000
# The export check runs two crops in one batch (to show the batch is dynamic) up to this many LR
# pixels per crop, and one crop above it.
EXPORT_BATCH_CHECK_PIXELS = 512 * 512

# -- waiting for a locked MLflow sqlite store ------------------------------------------------------
# After MLflow's own 20 s sqlite busy timeout, a command waits this much longer for a store another
# process holds locked (e.g. a 30 s `BEGIN EXCLUSIVE`), then stops with one line.
MLFLOW_LOCK_WAIT_S = 120.0
MLFLOW_LOCK_WAIT_ENV = "SRGAN_MLFLOW_LOCK_WAIT_S"  # seconds; overrides MLFLOW_LOCK_WAIT_S


def pixel_limit_error(width: int, height: int, max_pixels: int, scale: int | None = None, count: int = 1,
                      raise_hint: str = "") -> str | None:
    """The one message for images over a pixel limit (None when within it): their size, the limit,
    what their x``scale`` output would need, and ``raise_hint`` (what to do)."""
    pixels = width * height * count
    if pixels <= max_pixels:
        return None
    what, verb, its = ((f"{width}x{height}", "is", "its") if count == 1
                       else (f"{count} images of {width}x{height}", "are", "their"))
    need = ""
    if scale:
        need = f" ({its} x{scale} output alone needs {pixels * scale * scale * RGB_BYTES / 1e9:.2g} GB)"
    hint = f"; {raise_hint}" if raise_hint else ""
    return f"{what} {verb} {_amount(pixels, 1)}, over the limit of {_amount(max_pixels)}{need}{hint}"


def _amount(pixels: int, digits: int | None = None) -> str:
    """``50 MP`` from a million up (``digits`` after the point), ``65,536 pixels`` below."""
    if pixels < MEGA:
        return f"{pixels:,} pixels"
    return f"{pixels / MEGA:.{digits}f} MP" if digits is not None else f"{pixels / MEGA:g} MP"


MEGA = 1_000_000
RGB_BYTES = 3  # bytes per output pixel of a uint8 RGB image
