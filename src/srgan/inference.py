"""Generator inference: whole-image or tiled (overlapping, stitched) upscaling of one image.

Batch upscaling of files (planning, checks, per-file errors) is ``srgan.batch_upscale``.

Tiling contract. The LR image is cut into *cores* of ``tile`` x ``tile`` px (the last row/column
may be narrower). Each core is run inside a *window* that adds up to ``overlap`` px of context
on every side; only the core's part of the output is kept. Windows are clamped to the image
instead of padded: a window that would cross the image border is shifted inwards, so

* every window has the same shape, ``min(tile + 2*overlap, H) x min(tile + 2*overlap, W)`` ->
  one traced graph for every tile of every image at least that large, and the model never
  sees more than ``(tile + 2*overlap)^2`` input pixels, whatever the image size;
* a window edge is either the image edge (where the model's own zero 'same' padding then does
  exactly what it does in whole-image inference) or at least ``overlap`` px away from its core.

Hence, for a model whose receptive-field radius (in LR px) is <= ``overlap``, tiled output
equals whole-image output up to float32 rounding: oneDNN orders sums differently per input
shape (~1e-7), and a resize layer whose float32 in/out ratio depends on the input size (x3)
adds up to ~1e-5; after rounding to uint8 a pixel can rarely differ by one level. With a
smaller overlap the seams differ (the SRResNet generator's radius is about 2*blocks + 8 LR
px, ~24 for 8 blocks at x4). Reflect/zero padding of edge tiles would instead change the
border pixels.

A plan with a single window (``tile=0`` or tile >= image) runs eagerly: one call, so tracing
a graph per image size would cost more than it saves. Multi-window plans use a cached
``tf.function`` traced once per window shape.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf


# --------------------------------------------------------------------------- tiling plan
@dataclass(frozen=True)
class Window:
    """One tile: LR core ``[y0:y1, x0:x1]`` it produces, window ``[wy:wy+h, wx:wx+w]`` it reads."""

    y0: int
    y1: int
    x0: int
    x1: int
    wy: int
    wx: int
    h: int
    w: int


def _axis_plan(n: int, tile: int, overlap: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Window length and (core_start, core_end, window_start) triples along one axis."""
    win = min(tile + 2 * overlap, n)
    spans = []
    for c0 in range(0, n, tile):
        c1 = min(c0 + tile, n)
        # Clamp, don't pad: keeps one window shape and leaves image borders as the model sees them whole.
        s = min(max(c0 - overlap, 0), n - win)
        spans.append((c0, c1, s))
    return win, spans


def plan_windows(h: int, w: int, tile: int, overlap: int) -> list[Window]:
    """All tiles of an ``h`` x ``w`` LR image, row-major; every window has the same shape."""
    if h < 1 or w < 1:
        raise ValueError(f"empty image {w}x{h}")
    if tile < 1 or overlap < 0:
        raise ValueError(f"need tile >= 1 and overlap >= 0, got tile={tile}, overlap={overlap}")
    win_h, rows = _axis_plan(h, tile, overlap)
    win_w, cols = _axis_plan(w, tile, overlap)
    return [
        Window(y0, y1, x0, x1, wy, wx, win_h, win_w) for (y0, y1, wy) in rows for (x0, x1, wx) in cols
    ]


# --------------------------------------------------------------------------- model calls
_PREDICT_FNS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _predict_fn(model: Any) -> Any:
    """A cached ``tf.function`` running ``model`` in inference mode on fixed-shape windows.

    Traced per input shape (no shape relaxation): tiles all share one shape, so a folder of
    large images costs one trace; and static shapes keep layers that cannot handle unknown
    spatial dims in graph mode (e.g. Keras' bilinear UpSampling2D) working. Cached per model;
    the closure holds only a weak reference so the cache never keeps a model alive.
    """
    fn = _PREDICT_FNS.get(model)
    if fn is None:
        ref = weakref.ref(model)

        def run(x: tf.Tensor) -> tf.Tensor:
            return tf.cast(ref()(x, training=False), tf.float32)

        fn = tf.function(run)
        _PREDICT_FNS[model] = fn
    return fn


def _eager_fn(model: Any) -> Callable[[tf.Tensor], tf.Tensor]:
    """Single-shot calls (whole image, one window): eager, so no per-image-size trace."""
    return lambda x: tf.cast(model(x, training=False), tf.float32)


def _check_lr(lr: np.ndarray, scale: int) -> np.ndarray:
    lr = np.asarray(lr)
    if lr.dtype != np.uint8 or lr.ndim != 3 or lr.shape[2] != 3 or min(lr.shape[:2]) < 1:
        raise ValueError(f"expected a non-empty uint8 HxWx3 image, got {lr.dtype} {lr.shape}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return lr


def _run(fn: Any, batch: np.ndarray, scale: int) -> np.ndarray:
    """Model output for a uint8 NHWC batch as float32 NHWC, shape-checked against ``scale``."""
    out = fn(tf.convert_to_tensor(batch.astype(np.float32) / 255.0)).numpy()
    n, h, w, _ = batch.shape
    if out.shape != (n, h * scale, w * scale, 3):
        raise ValueError(
            f"model output {tuple(out.shape[1:])} for input {(h, w, 3)} is not a x{scale} RGB upscale"
        )
    return out


Check = Callable[[], None]  # called before every model call; raises to stop (e.g. a server's deadline)


def _iter_cores(
    model: Any, lr: np.ndarray, scale: int, tile: int, overlap: int, batch: int, check: Check | None = None
) -> Iterator[tuple[Window, np.ndarray]]:
    """Yield (window, float32 HR output of its core) for every tile of ``lr``; ``check()`` runs
    before each model call, so whoever passes it can stop the work between tiles."""
    h, w = lr.shape[:2]
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    windows = plan_windows(h, w, tile, overlap) if tile > 0 else [Window(0, h, 0, w, 0, 0, h, w)]
    if len(windows) == 1:
        # One window is the whole image (tile >= image): same computation as tile=0.
        if check is not None:
            check()
        yield windows[0], _run(_eager_fn(model), lr[None], scale)[0]
        return
    fn = _predict_fn(model)
    for i in range(0, len(windows), batch):
        if check is not None:
            check()
        group = windows[i : i + batch]
        crops = [lr[t.wy : t.wy + t.h, t.wx : t.wx + t.w] for t in group]
        # Pad the last batch with repeats so the batch shape (and the trace) never changes.
        crops += [crops[-1]] * (batch - len(crops))
        out = _run(fn, np.stack(crops), scale)
        for t, o in zip(group, out):
            oy, ox = (t.y0 - t.wy) * scale, (t.x0 - t.wx) * scale
            yield t, o[oy : oy + (t.y1 - t.y0) * scale, ox : ox + (t.x1 - t.x0) * scale]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8: clip, x255, round half to even (what BasicSR's tensor2img does)."""
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def upscale_float(
    model: Any, lr: np.ndarray, scale: int, tile: int = 0, overlap: int = 16, batch: int = 1
) -> np.ndarray:
    """The raw float32 model output (unclipped) for a uint8 LR image, whole (``tile=0``) or tiled.

    What :func:`upscale` rounds core by core; for checks stricter than uint8 (tiling, export).
    """
    lr = _check_lr(lr, scale)
    h, w = lr.shape[:2]
    sr = np.empty((h * scale, w * scale, 3), np.float32)
    for t, core in _iter_cores(model, lr, scale, tile, overlap, batch):
        sr[t.y0 * scale : t.y1 * scale, t.x0 * scale : t.x1 * scale] = core
    return sr


# The 8 symmetries of the square (dihedral group D4) as (quarter turns, mirror first).
DIHEDRAL: tuple[tuple[int, bool], ...] = tuple((k, flip) for flip in (False, True) for k in range(4))


def _view(img: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """``img`` mirrored (if ``flip``) then turned ``k`` quarter turns, as a *view*: writes reach ``img``."""
    return np.rot90(img[:, ::-1] if flip else img, k)


def _forward(img: np.ndarray, k: int, flip: bool) -> np.ndarray:
    return np.ascontiguousarray(_view(img, k, flip))


def upscale_self_ensemble(
    model: Any, lr: np.ndarray, scale: int, tile: int = 0, overlap: int = 16, batch: int = 1,
    check: Check | None = None,
) -> np.ndarray:
    """Geometric self-ensemble (EDSR's "+", Lim et al. 2017): the mean of the 8 outputs for the
    rotated/mirrored input, each mapped back, then rounded to uint8. 8x the inference time; one
    full-size float32 HR accumulator (12 bytes per HR pixel) on top of what tiling needs.
    """
    lr = _check_lr(lr, scale)
    acc = np.zeros((lr.shape[0] * scale, lr.shape[1] * scale, 3), np.float32)
    for k, flip in DIHEDRAL:
        # Each core is added straight into the accumulator seen in the transformed frame (a view),
        # so no full-size output of a single pass is ever held.
        frame = _view(acc, k, flip)
        for t, core in _iter_cores(model, _forward(lr, k, flip), scale, tile, overlap, batch, check):
            frame[t.y0 * scale : t.y1 * scale, t.x0 * scale : t.x1 * scale] += core
    return to_uint8(acc / len(DIHEDRAL))


def upscale(
    model: Any, lr: np.ndarray, scale: int, tile: int = 0, overlap: int = 16, batch: int = 1,
    self_ensemble: bool = False, check: Check | None = None,
) -> np.ndarray:
    """Super-resolve a uint8 HxWx3 LR image to uint8 (H*scale)x(W*scale)x3.

    ``tile=0`` runs the whole image at once; otherwise LR cores of ``tile`` px with ``overlap``
    px of context per side (see the module docstring), ``batch`` windows per model call. Each
    core is converted to uint8 as it arrives, so no full-size float HR buffer exists.
    ``self_ensemble`` averages the 8 flips/rotations instead (:func:`upscale_self_ensemble`).
    ``check()`` runs before every model call and may raise to stop the work (a server's deadline).
    """
    if self_ensemble:
        return upscale_self_ensemble(model, lr, scale, tile=tile, overlap=overlap, batch=batch, check=check)
    lr = _check_lr(lr, scale)
    h, w = lr.shape[:2]
    sr = np.empty((h * scale, w * scale, 3), np.uint8)
    for t, core in _iter_cores(model, lr, scale, tile, overlap, batch, check):
        sr[t.y0 * scale : t.y1 * scale, t.x0 * scale : t.x1 * scale] = to_uint8(core)
    return sr


def infer_scale(model: Any, probe: tuple[int, int] = (12, 16)) -> int:
    """The model's integer upscaling factor, from its output/input size on a small blank probe.

    A non-square probe catches models whose two axes scale differently.
    """
    h, w = probe
    out = model(tf.zeros((1, h, w, 3), tf.float32), training=False)
    oh, ow = int(out.shape[1]), int(out.shape[2])
    if oh % h or ow % w or oh // h != ow // w or oh // h < 1 or int(out.shape[3]) != 3:
        raise ValueError(
            f"model maps a {h}x{w}x3 input to {tuple(out.shape[1:])}: not an integer RGB upscale"
        )
    return oh // h
