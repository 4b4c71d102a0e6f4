"""Pictures of results: image grids, comparison images with a zoomed detail, crops side by side.

numpy only (uint8 HxWx3 in, uint8 out), so the training loop, evaluation, the study report and
the rating app draw the same panels the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SEPARATOR_PX = 4  # white gap between panels
BAND_PX = 6  # white gap between the rows of a comparison image
WHITE = 255
BOX_COLOR = (255, 0, 0)  # the zoomed detail's frame


def upscale_nearest(lr: np.ndarray, scale: int) -> np.ndarray:
    """Pixel replication (exactly what PIL's NEAREST does for integer factors)."""
    return np.repeat(np.repeat(lr, scale, axis=0), scale, axis=1)


def hstack(panels: Sequence[np.ndarray], sep: int = SEPARATOR_PX) -> np.ndarray:
    """Panels of equal height side by side with white separators."""
    h = panels[0].shape[0]
    gap = np.full((h, sep, 3), WHITE, np.uint8)
    out: list[np.ndarray] = []
    for i, p in enumerate(panels):
        if i:
            out.append(gap)
        out.append(p)
    return np.concatenate(out, axis=1)


def image_grid(lr: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """LR (nearest) | bicubic | SR | HR side by side, uint8."""
    s = hr.shape[0] // lr.shape[0]
    return hstack([upscale_nearest(lr, s), bicubic, sr, hr])


def detail_box(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left of the ``size`` square with the most gradient energy: where SR methods differ most."""
    y = hr.astype(np.float32).mean(axis=2)
    energy = np.abs(np.diff(y, axis=0))[:, :-1] + np.abs(np.diff(y, axis=1))[:-1, :]
    size = min(size, energy.shape[0], energy.shape[1])
    # integral image: the energy of every window in O(HW)
    ii = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    win = ii[size:, size:] - ii[:-size, size:] - ii[size:, :-size] + ii[:-size, :-size]
    r, c = np.unravel_index(np.argmax(win), win.shape)
    return int(r), int(c)


def enlarge(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor (show pixels as they are)."""
    return upscale_nearest(img, max(1, int(factor)))


def draw_box(img: np.ndarray, r: int, c: int, size: int, color: tuple[int, int, int] = BOX_COLOR) -> np.ndarray:
    """A copy of ``img`` with a 1-px frame around the ``size`` square at (r, c)."""
    out = img.copy()
    h, w = out.shape[:2]
    r1, c1 = min(r + size - 1, h - 1), min(c + size - 1, w - 1)
    col = np.array(color, np.uint8)
    out[r, c:c1 + 1] = out[r1, c:c1 + 1] = col
    out[r:r1 + 1, c] = out[r:r1 + 1, c1] = col
    return out


def comparison_panels(lr: np.ndarray, outputs: Sequence[np.ndarray], hr: np.ndarray, zoom: int) -> np.ndarray:
    """Top row LR (nearest) | each output | HR; bottom row the same zoomed detail of each, enlarged
    to one panel's width; the detail is framed on the HR panel."""
    s = hr.shape[0] // lr.shape[0]
    panels = [upscale_nearest(lr, s), *outputs, hr]
    r, c = detail_box(hr, zoom)
    z = min(zoom, hr.shape[0], hr.shape[1])
    panels_top = [*panels[:-1], draw_box(hr, r, c, z)]
    top = hstack(panels_top)
    f = max(1, hr.shape[1] // z)
    bottom = hstack([enlarge(p[r:r + z, c:c + z], f) for p in panels])
    width = top.shape[1]
    bottom = np.pad(bottom, ((0, 0), (0, max(width - bottom.shape[1], 0)), (0, 0)),
                    constant_values=WHITE)[:, :width]
    band = np.full((BAND_PX, width, 3), WHITE, np.uint8)
    return np.concatenate([top, band, bottom], axis=0)


def crop_row(images: Sequence[np.ndarray], box: tuple[int, int, int], factor: int = 1) -> np.ndarray:
    """The same ``(row, col, size)`` crop of each image, enlarged by ``factor``, side by side."""
    r, c, z = box
    return hstack([enlarge(im[r:r + z, c:c + z], factor) for im in images])
