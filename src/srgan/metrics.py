"""Image-quality metrics in the SRGAN paper / BasicSR convention (numpy only).

Convention (Ledig et al. 2017, BasicSR ``calculate_psnr`` / ``calculate_ssim`` with
``test_y_channel=True``):

* inputs are 8-bit (``uint8``): the SR output is rounded to 8 bits *before* measuring, as it
  would be when saved as a PNG;
* ``border`` px (= the scale factor) are cropped from every side of both images;
* PSNR/SSIM are computed on the BT.601 luma Y in [16, 235] (not rounded), data range 255;
* SSIM is Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
  population (co)variances, averaged over the 'valid' region only (window fully inside the
  image), which is what BasicSR's ``filter2D(...)[5:-5, 5:-5]`` and scikit-image's
  ``crop(S, (win_size - 1) // 2)`` both do.

One registry (:data:`REGISTRY`) names every metric the project reports: its function, direction,
label and format. The evaluate stage, training-time validation, tuning, the study and the reports
all read it, and :class:`Scorer` is the one scoring path of validation and evaluation alike, so a
new metric is one :func:`register` call (and its test).

No TensorFlow here on purpose: evaluation, reports and tests import this cheaply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0

# ITU-R BT.601 "studio swing" luma for RGB in [0, 1] (the MATLAB rgb2ycbcr row).
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)
_Y_OFFSET = 16.0


# ... and its chroma rows (Cb, Cr), whose weights sum to zero: a gray shift leaves them unchanged
_CBCR_WEIGHTS = np.array([[-37.797, 112.0], [-74.203, -93.786], [112.0, -18.214]], dtype=np.float64)
_CBCR_OFFSET = 128.0


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma Y = 16 + 65.481 R + 128.553 G + 24.966 B, float64 in [16, 235].

    ``img`` is HxWx3 RGB: ``uint8`` (divided by 255) or float already in [0, 1].
    """
    return _unit_rgb(img) @ _Y_WEIGHTS + _Y_OFFSET


def rgb_to_cbcr(img: np.ndarray) -> np.ndarray:
    """BT.601 chroma (Cb, Cr) as HxWx2 float64 in [16, 240], the MATLAB rgb2ycbcr rows; input as
    :func:`rgb_to_y`."""
    return _unit_rgb(img) @ _CBCR_WEIGHTS + _CBCR_OFFSET


def _unit_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
    if img.dtype == np.uint8:
        rgb = img.astype(np.float64) / 255.0
    elif np.issubdtype(img.dtype, np.floating):
        rgb = img.astype(np.float64, copy=False)
        # A float image in [0, 255] would silently give nonsense luma: refuse it.
        if rgb.size and (np.nanmin(rgb) < -1e-6 or np.nanmax(rgb) > 1.0 + 1e-6):
            raise ValueError("float RGB input must lie in [0, 1] (pass uint8 for 0..255 data)")
    else:
        raise ValueError(f"expected uint8 or float RGB, got dtype {img.dtype}")
    return rgb


def _check_pair(sr: np.ndarray, hr: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate two uint8 HxWx3 images of equal shape and crop ``border`` px off each side."""
    sr = np.asarray(sr)
    hr = np.asarray(hr)
    for name, a in (("sr", sr), ("hr", hr)):
        # uint8 is the convention, not a convenience: float SR would skip the 8-bit rounding.
        if a.dtype != np.uint8:
            raise ValueError(f"{name}: expected uint8 (round SR to 8 bits first), got {a.dtype}")
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"{name}: expected an HxWx3 RGB image, got shape {a.shape}")
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr shapes differ: {sr.shape} vs {hr.shape}")
    border = int(border)
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    h, w = sr.shape[:2]
    if h <= 2 * border or w <= 2 * border:
        raise ValueError(f"image {w}x{h} is too small for a border of {border} px")
    if border:
        sr = sr[border:-border, border:-border]
        hr = hr[border:-border, border:-border]
    return sr, hr


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """PSNR in dB of two equal-shape arrays (no cropping, no colour conversion); inf when equal."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """PSNR (dB) on BT.601 Y after cropping ``border`` px; uint8 HxWx3 inputs."""
    sr, hr = _check_pair(sr, hr, border)
    return psnr(rgb_to_y(sr), rgb_to_y(hr))


def psnr_rgb(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """PSNR (dB) over all three RGB channels after cropping ``border`` px."""
    sr, hr = _check_pair(sr, hr, border)
    return psnr(sr.astype(np.float64), hr.astype(np.float64))


def psnr_cbcr(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """PSNR (dB) on the BT.601 Cb and Cr planes after cropping ``border`` px: the colour errors
    (e.g. green/magenta fringes along fine texture) that Y-only PSNR, SSIM and NIQE do not see."""
    sr, hr = _check_pair(sr, hr, border)
    return psnr(rgb_to_cbcr(sr), rgb_to_cbcr(hr))


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps (what cv2.getGaussianKernel(11, 1.5) returns)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 2-D filtering keeping only the 'valid' region (window fully inside).

    Accumulating shifted slices keeps memory at a few image-sized buffers, unlike a
    sliding-window view times the taps (which would materialise 11 copies).
    """
    k = len(taps)
    h, w = img.shape
    rows = np.zeros((h - k + 1, w), dtype=np.float64)
    for i, t in enumerate(taps):
        rows += t * img[i : i + h - k + 1, :]
    out = np.zeros((h - k + 1, w - k + 1), dtype=np.float64)
    for j, t in enumerate(taps):
        out += t * rows[:, j : j + w - k + 1]
    return out


def ssim_gray(a: np.ndarray, b: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """Mean Wang et al. SSIM of two equal-shape 2-D float arrays over the 'valid' region."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two equal 2-D arrays, got {a.shape} and {b.shape}")
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} px after the border crop, got {a.shape}"
        )
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    g = gaussian_window_1d()
    mu_a = _filter_valid(a, g)
    mu_b = _filter_valid(b, g)
    mu_a2, mu_b2, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = _filter_valid(a * a, g) - mu_a2
    var_b = _filter_valid(b * b, g) - mu_b2
    cov = _filter_valid(a * b, g) - mu_ab
    ssim_map = ((2 * mu_ab + c1) * (2 * cov + c2)) / ((mu_a2 + mu_b2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """SSIM on BT.601 Y after cropping ``border`` px; uint8 HxWx3 inputs.

    Identical inputs give exactly 1.0: numerator and denominator of the map are then the
    same float expressions.
    """
    sr, hr = _check_pair(sr, hr, border)
    return ssim_gray(rgb_to_y(sr), rgb_to_y(hr))


def subpixel_artifact(img: np.ndarray, lr: np.ndarray, scale: int, window: int) -> float:
    """RMS (8-bit Y levels) of the ``scale``-periodic pattern in ``img`` minus the bicubic upscale of
    ``lr``: the sub-pixel checkerboard of a pixel-shuffle upsampler (Odena et al. 2016).

    In every ``window`` x ``window`` LR block the residual is averaged over each of the scale x scale
    sub-pixel positions; what varies between the positions (the block's mean taken off) is the
    periodic pattern. Real detail averages out over a block; a lattice-locked pattern does not.
    The HR image scores its own level (its detail's leakage into the average), which is the level
    to compare with: an SR output above it adds a pattern that real images do not have.
    """
    from .images import upscale_bicubic

    img, lr = np.asarray(img), np.asarray(lr)
    if img.dtype != np.uint8 or lr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {img.dtype} and {lr.dtype}")
    if img.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
        raise ValueError(f"image {img.shape[:2]} is not {scale}x the LR {lr.shape[:2]}")
    side = window * scale
    h, w = (img.shape[0] // side) * side, (img.shape[1] // side) * side
    if not h or not w:
        raise ValueError(f"image {img.shape[1]}x{img.shape[0]} is smaller than one {side}-px window")
    resid = rgb_to_y(img[:h, :w]) - rgb_to_y(upscale_bicubic(lr, scale)[:h, :w])
    blocks = resid.reshape(h // side, window, scale, w // side, window, scale)
    pattern = blocks.mean(axis=(1, 4))  # (rows, scale, cols, scale): each block's sub-pixel means
    pattern = pattern - pattern.mean(axis=(1, 3), keepdims=True)
    return float(np.sqrt(np.mean(pattern**2)))


def mean_scores(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float]:
    """Mean of every metric over the rows that have it (NIQE is missing for images too small)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def ranking_accuracy(real: np.ndarray, fake: np.ndarray) -> float:
    """Share of (real, fake) pairs that D scores real above fake (ties count half): the ROC AUC,
    the same threshold-free separation for every objective."""
    real, fake = np.ravel(real)[:, None], np.ravel(fake)[None, :]
    return float(np.mean((real > fake) + 0.5 * (real == fake)))


def d_health(real: np.ndarray, fake: np.ndarray,
             verdict: Callable[[np.ndarray, np.ndarray], tuple[float, float]]) -> dict[str, float]:
    """How well a discriminator separates held-out real images from the generator's output.

    ``real``/``fake``: D's raw outputs; ``verdict``: the objective's own decision rule
    (``losses.AdvLoss.verdict``). Returns ``d_acc`` (balanced accuracy under that rule), ``d_auc``
    (threshold-free: share of real/fake pairs ordered right, 0.5 = chance) and ``d_gap`` (mean real
    minus mean fake output in the objective's own units).
    """
    real, fake = np.ravel(np.asarray(real, np.float64)), np.ravel(np.asarray(fake, np.float64))
    acc, gap = verdict(real, fake)
    return {"d_acc": float(acc), "d_auc": ranking_accuracy(real, fake), "d_gap": float(gap)}


# --------------------------------------------------------------------------- the registry
FULL_REFERENCE = "full_reference"  # compares the output with the HR image
NO_REFERENCE = "no_reference"  # judges an image alone (also the HR image itself: the "hr" row)
DISCRIMINATOR = "discriminator"  # the adversarial phase's D on held-out images (training only)

ARTIFACT_WINDOW = 16  # LR px per side of the blocks the sub-pixel pattern is averaged in
D_SEPARATES = 0.75  # held-out D accuracy from which D counts as telling real from fake


class Reference(Protocol):
    """What an image metric may compare with: the HR image and the LR input it was made from."""

    hr: np.ndarray
    lr: np.ndarray


ScoreFn = Callable[[np.ndarray, Reference, int, "Scorer"], "float | None"]


@dataclass(frozen=True)
class Metric:
    """One registered metric: how it is computed, which way is better, how it is shown."""

    name: str
    label: str
    higher_is_better: bool | None  # None: a diagnostic, neither way is better
    digits: int
    kind: str  # FULL_REFERENCE | NO_REFERENCE | DISCRIMINATOR
    score: ScoreFn | None = None  # image metrics: (output uint8, reference, scale, scorer) -> value
    needs: str | None = None  # a Scorer attribute that must be set (e.g. the NIQE model)
    headline: bool = True  # in the reports' tables and the study's statistics
    note: str = ""

    def format(self, value: float | None) -> str:
        return "" if value is None or not isinstance(value, (int, float)) else f"{value:.{self.digits}f}"

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is better than ``b`` (False for diagnostics)."""
        if self.higher_is_better is None:
            return False
        return a > b if self.higher_is_better else a < b


REGISTRY: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add a metric to the registry (its order is the reports' column order)."""
    if metric.name in REGISTRY:
        raise ValueError(f"metric {metric.name!r} is registered twice")
    if metric.kind not in (FULL_REFERENCE, NO_REFERENCE, DISCRIMINATOR):
        raise ValueError(f"metric {metric.name!r}: unknown kind {metric.kind!r}")
    REGISTRY[metric.name] = metric
    return metric


VALIDATION_PREFIX = "val_"  # a metric's key in training-time validation (history.csv, MLflow, summary.json)


def val_key(name: str) -> str:
    """The key under which training-time validation logs metric ``name`` (``niqe`` -> ``val_niqe``)."""
    return VALIDATION_PREFIX + name


def get(key: str) -> Metric:
    """The metric of a name or of a logged key ending in it (``eval/valid/niqe``, ``val_niqe``)."""
    name = key.rsplit("/", 1)[-1].removeprefix(VALIDATION_PREFIX)
    if name not in REGISTRY:
        raise KeyError(f"unknown metric {key!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def higher_is_better(key: str) -> bool:
    """Direction of a metric by its name or a logged key ending in it (unregistered: higher)."""
    try:
        return get(key).higher_is_better is not False
    except KeyError:
        return True


def image_metrics(headline_only: bool = False) -> list[Metric]:
    """The registered metrics of an image (full- and no-reference), in report order."""
    return [m for m in REGISTRY.values() if m.kind != DISCRIMINATOR and (m.headline or not headline_only)]


class Scorer:
    """Every registered image metric of one evaluation setting, its resources loaded once.

    Validation during training and the evaluate stage both score through this, so their figures
    are the same function of the same images. ``niqe_model``: None leaves NIQE out.
    """

    def __init__(self, scale: int, niqe_model: Any = None):
        self.scale, self.niqe_model = scale, niqe_model
        self.metrics = [m for m in image_metrics() if m.needs is None or getattr(self, m.needs) is not None]

    @classmethod
    def from_config(cls, ev: Any, scale: int, niqe_dir: Path | None = None) -> Scorer:
        """The scorer of an ``evaluate`` config section; NIQE's model per ``evaluate.niqe`` (the
        MATLAB model from the installed wheel, else ``niqe_dir``; never downloaded here)."""
        from . import niqe  # noqa: PLC0415 - niqe imports this module

        model = None if ev.niqe == "none" else niqe.load_model(ev.niqe, cache_dir=niqe_dir, download=False)
        return cls(scale, model)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.metrics]

    def score(self, img: np.ndarray, ref: Reference) -> dict[str, float | None]:
        """Every metric of one output (uint8 HxWx3) against its reference."""
        return {m.name: m.score(img, ref, self.scale, self) for m in self.metrics}

    def score_hr(self, ref: Reference) -> dict[str, float | None]:
        """The no-reference metrics of the HR image itself (the level real images have)."""
        return {m.name: m.score(ref.hr, ref, self.scale, self) for m in self.metrics if m.kind == NO_REFERENCE}


def _niqe(img: np.ndarray, ref: Reference, scale: int, scorer: Scorer) -> float | None:
    from . import niqe  # noqa: PLC0415 - niqe imports this module

    try:
        return niqe.niqe(img, scorer.niqe_model, border=scale)
    except niqe.NiqeError as exc:  # too small for NIQE's 96-px patches: no score, not a failure
        log.warning("NIQE skipped: %s", exc)
        return None


def _artifact(img: np.ndarray, ref: Reference, scale: int, scorer: Scorer) -> float | None:
    try:
        return subpixel_artifact(img, ref.lr, scale, ARTIFACT_WINDOW)
    except ValueError as exc:  # smaller than one window
        log.warning("artifact score skipped: %s", exc)
        return None


register(Metric("psnr_y", "PSNR-Y (dB)", True, 2, FULL_REFERENCE,
                lambda img, ref, scale, _: psnr_y(img, ref.hr, scale)))
register(Metric("ssim_y", "SSIM-Y", True, 4, FULL_REFERENCE,
                lambda img, ref, scale, _: ssim_y(img, ref.hr, scale)))
register(Metric("psnr_rgb", "PSNR-RGB (dB)", True, 2, FULL_REFERENCE,
                lambda img, ref, scale, _: psnr_rgb(img, ref.hr, scale), headline=False))
register(Metric("psnr_cbcr", "PSNR-CbCr (dB)", True, 2, FULL_REFERENCE,
                lambda img, ref, scale, _: psnr_cbcr(img, ref.hr, scale), headline=False,
                note="colour fidelity: PSNR of the BT.601 chroma planes"))
register(Metric("niqe", "NIQE", False, 2, NO_REFERENCE, _niqe, needs="niqe_model",
                note="no-reference naturalness (Mittal et al. 2013); lower is better"))
register(Metric("artifact", "sub-pixel artifact", False, 3, NO_REFERENCE, _artifact,
                note=f"RMS of the x-scale periodic pattern over bicubic, Y levels in {ARTIFACT_WINDOW}-LR-px "
                     "blocks; HR's own level is the reference"))
register(Metric("d_acc", "D accuracy", None, 3, DISCRIMINATOR,
                note=f"held-out real vs generated patches, the objective's own decision rule; "
                     f">= {D_SEPARATES} counts as separating"))
register(Metric("d_auc", "D AUC", None, 3, DISCRIMINATOR, note="share of real/fake pairs ordered right; 0.5 = chance"))
register(Metric("d_gap", "D output gap", None, 3, DISCRIMINATOR,
                note="mean real minus mean fake output, in the objective's units"))
