"""Image I/O, evaluation pairs and the one bicubic used everywhere (numpy + Pillow only, no TensorFlow).

``load_rgb`` turns any file Pillow can decode into ``uint8`` HxWx3 RGB:

* EXIF orientation is applied (a phone photo comes out the way it is displayed);
* grey (``1``, ``L``), palette (``P``), ``CMYK``, ``YCbCr`` are converted to RGB;
* transparency (``LA``, ``RGBA``, ``PA``, palette with a transparent colour, premultiplied modes)
  is composited over **white**: dropping alpha would expose whatever colour happens to be stored
  under transparent pixels (often black or garbage), which is not what anybody sees;
* 16-bit grey (``I;16*``) is scaled ``round(v / 257)`` (65535 -> 255), never clipped. 16-bit RGB
  PNG/TIFF are reduced to 8 bits by Pillow's decoder itself (high byte, ``v >> 8``, which agrees
  with ``v / 257`` on every 8-bit value expanded to 16 bits and is within 1 level elsewhere);
* 32-bit integer ``I``: values up to 255 are taken as 8-bit, up to 65535 as 16-bit (older Pillow
  opened 16-bit PNGs as ``I``), anything larger is scaled from the full 32-bit range;
* float ``F``: data in [0, 1] is scaled by 255, otherwise it is taken as 0..255 and clipped.

A file that cannot be decoded completely raises ``ImageError`` naming the file. Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False on purpose: a truncated file must fail, not be
silently padded with grey.

Evaluation pairs (``iter_pairs``, ``load_pairs``): a folder's ``hr/<name>.png`` with its
``lr/<name>.png`` (data/processed/valid, a benchmark set), loaded through ``load_rgb``; HR must be
an integer multiple of LR.

Bicubic (see docs/ARCHITECTURE.md): Pillow's antialiased bicubic (a = -0.5, support widened by
the scale factor when downscaling, the kernel MATLAB ``imresize`` uses), run per channel on
float32 (mode ``F``) so nothing is rounded between the two separable passes, rounded once.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from .dataio import atomic_write

PathLike = str | os.PathLike[str]


class ImageError(ValueError):
    """An image cannot be read (missing, corrupt, truncated, unsupported) or has the wrong shape."""


# --------------------------------------------------------------------------- loading


# Files in an image folder that are never images (notes, manifests, partial downloads)
IGNORED_SUFFIXES = {".json", ".txt", ".md", ".csv", ".part", ".tmp", ".lock"}


def list_images(folder: Path) -> list[str]:
    """Candidate image files under ``folder`` (recursive), as sorted relative POSIX names.

    Hidden files, fetch.json and obvious non-images (.json, .txt, .part, ...) are ignored; any
    other file is tried and, if it does not decode, listed as skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.name == "fetch.json" or p.suffix.lower() in IGNORED_SUFFIXES:
            continue
        names.append(rel.as_posix())
    return sorted(names)



def load_rgb(path: PathLike | BinaryIO) -> np.ndarray:
    """Decode ``path`` fully into ``uint8`` HxWx3 RGB (EXIF orientation applied).

    Raises ``ImageError`` naming the file if it is missing, not an image, truncated or corrupt.
    """
    name = _display_name(path)
    try:
        with Image.open(path) as im:
            # load() decodes every byte: truncation/CRC errors surface here, not later.
            im.load()
            im = _exif_transposed(im)
            arr = _to_rgb_array(im)
    except ImageError as exc:
        raise ImageError(f"{name}: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: too large to decode safely: {exc}") from None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR, errno.ENOTDIR):
            raise ImageError(f"{name}: cannot open: {exc.strerror or exc}") from None
        raise ImageError(f"{name}: not a readable image (truncated/corrupt): {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise SyntaxError, struct.error, zlib.error...
        raise ImageError(
            f"{name}: not a readable image (truncated/corrupt): {type(exc).__name__}: {exc}"
        ) from None
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{name}: image has no pixels ({arr.shape[1]}x{arr.shape[0]})")
    return arr


def _display_name(path: PathLike | BinaryIO) -> str:
    if isinstance(path, (str, os.PathLike)):
        return str(path)
    return str(getattr(path, "name", "<stream>"))


def _exif_transposed(im: Image.Image) -> Image.Image:
    """Apply the EXIF Orientation tag; a broken EXIF block does not make the pixels unusable."""
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        return im
    return im if out is None else out


def _white_composite(rgba: np.ndarray) -> np.ndarray:
    """Composite HxWx4 uint8 over white, rounded once."""
    rgb = rgba[..., :3].astype(np.float32)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return _round_u8(rgb * a + 255.0 * (1.0 - a))


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    palette_alpha = mode == "P" and getattr(im.palette, "mode", "") == "RGBA"
    if mode in ("LA", "La", "RGBA", "RGBa", "PA") or palette_alpha or (
        mode in ("P", "L", "RGB") and "transparency" in im.info  # a tRNS colour / palette index
    ):
        return _white_composite(np.asarray(im.convert("RGBA"), dtype=np.uint8))
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode.startswith("I;16"):  # I;16, I;16L, I;16B, I;16N: 0..65535
        v = np.asarray(im).astype(np.float32)
        return _grey_to_rgb(_round_u8(v / 257.0))
    if mode == "I":
        v = np.asarray(im).astype(np.float64)
        vmax = float(v.max()) if v.size else 0.0
        vmin = float(v.min()) if v.size else 0.0
        if vmin >= 0 and vmax <= 255:
            u8 = _round_u8(v)
        elif vmin >= 0 and vmax <= 65535:
            u8 = _round_u8(v / 257.0)
        else:
            u8 = _round_u8((np.clip(v, 0, None)) * (255.0 / 2147483647.0))
        return _grey_to_rgb(u8)
    if mode == "F":
        v = np.nan_to_num(np.asarray(im).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if v.size and float(v.min()) >= 0.0 and float(v.max()) <= 1.0:
            v = v * 255.0
        return _grey_to_rgb(_round_u8(v))
    try:
        # 1, L, P, CMYK (Pillow undoes Adobe's inverted CMYK JPEGs), YCbCr, ...
        return np.array(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise ImageError(f"unsupported image mode {mode!r}: {exc}") from None


def _grey_to_rgb(u8: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(u8[..., None], 3, axis=2))


def _round_u8(v: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(v, 0.0, 255.0)).astype(np.uint8)


# --------------------------------------------------------------------------- resizing


def _check_image(img: np.ndarray, what: str = "image") -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty uint8 HxW[xC] array, got {img.dtype} {img.shape}")
    return img


def bicubic_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``uint8`` HxWx3 (or HxW) to ``size = (width, height)`` with the project bicubic.

    Per channel in float32 (Pillow mode ``F``, antialiased when shrinking), rounded once.
    """
    img = _check_image(img)
    width, height = (int(size[0]), int(size[1]))
    if width <= 0 or height <= 0:
        raise ValueError(f"bicubic_resize: size must be positive (width, height), got {size!r}")
    planes = img[..., None] if img.ndim == 2 else img
    out = np.empty((height, width, planes.shape[2]), dtype=np.uint8)
    for c in range(planes.shape[2]):
        ch = Image.fromarray(np.ascontiguousarray(planes[..., c], dtype=np.float32))  # mode F
        res = ch.resize((width, height), Image.Resampling.BICUBIC)
        out[..., c] = _round_u8(np.asarray(res, dtype=np.float32))
    return out[..., 0] if img.ndim == 2 else out


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop (top-left anchored) so height and width are multiples of ``scale``."""
    img = np.asarray(img)
    h, w = img.shape[:2]
    h2, w2 = h - h % scale, w - w % scale
    if h2 == 0 or w2 == 0:
        raise ImageError(f"image {w}x{h} is smaller than the scale factor {scale}")
    return img[:h2, :w2]


def downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic LR of ``hr``, whose height and width must be multiples of ``scale``."""
    hr = _check_image(hr, "downscale")
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"downscale: {w}x{h} is not a multiple of scale {scale} (use mod_crop first)")
    return bicubic_resize(hr, (w // scale, h // scale))


def upscale_bicubic(lr: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic baseline: ``lr`` enlarged ``scale`` times with the project bicubic."""
    lr = _check_image(lr, "upscale_bicubic")
    h, w = lr.shape[:2]
    return bicubic_resize(lr, (w * scale, h * scale))


# --------------------------------------------------------------------------- saving


def save_png(path: PathLike, arr: np.ndarray, replace: bool = True) -> None:
    """Write ``uint8`` HxWx3 (or HxW) as PNG atomically (temp file in the same folder + rename);
    ``replace=False``: FileExistsError, nothing written, if ``path`` exists by then."""
    path = Path(path)
    arr = _check_image(arr, f"save_png {path}")
    with atomic_write(path, "wb", replace=replace) as f:
        Image.fromarray(np.ascontiguousarray(arr)).save(f, format="PNG")


# --------------------------------------------------------------------------- evaluation pairs
@dataclass(frozen=True)
class Pair:
    """One evaluation image: its name and the aligned LR / HR uint8 arrays."""

    name: str
    lr: np.ndarray
    hr: np.ndarray


def pair_files(folder: PathLike) -> list[Path]:
    """The HR files of an evaluation folder (``<folder>/hr/*.png`` with ``lr/`` beside), sorted."""
    folder = Path(folder)
    files = sorted((folder / "hr").glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no validation images in {folder / 'hr'}: run the preprocess stage first")
    return files


def iter_pairs(folder: PathLike, limit: int = 0,
               names: Sequence[str] | None = None) -> Iterator[Pair]:
    """(name, lr, hr) of every image of an evaluation folder, one at a time (bounded memory).

    ``folder`` holds ``hr/<name>.png`` and ``lr/<name>.png`` (data/processed/valid, a benchmark
    set); ``limit`` > 0 takes the first ``limit`` by name, ``names`` only those images. HR must be
    an integer multiple of LR.
    """
    files = pair_files(folder)
    if names is not None:
        files = [f for f in files if f.stem in set(names)]
    for hr_path in files[:limit] if limit > 0 else files:
        lr_path = hr_path.parent.parent / "lr" / hr_path.name
        if not lr_path.is_file():
            raise FileNotFoundError(f"{lr_path} is missing for {hr_path}: re-run the preprocess stage")
        hr, lr = load_rgb(hr_path), load_rgb(lr_path)
        (hh, hw), (lh, lw) = hr.shape[:2], lr.shape[:2]
        if hh % lh or hw % lw or hh // lh != hw // lw:
            raise ValueError(f"{hr_path.name}: HR {hw}x{hh} is not an integer multiple of LR {lw}x{lh}")
        yield Pair(hr_path.stem, lr, hr)


def load_pairs(folder: PathLike, limit: int = 0) -> list[Pair]:
    """All pairs of :func:`iter_pairs` in memory (for the few images validated during training)."""
    return list(iter_pairs(folder, limit))
