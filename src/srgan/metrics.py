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

No TensorFlow here on purpose: evaluation, reports and tests import this cheaply.
"""

from __future__ import annotations

import math

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0
LOWER_IS_BETTER = frozenset({"niqe"})  # metrics where a smaller value is better (the rest: larger)

# ITU-R BT.601 "studio swing" luma for RGB in [0, 1] (the MATLAB rgb2ycbcr row).
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)
_Y_OFFSET = 16.0


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma Y = 16 + 65.481 R + 128.553 G + 24.966 B, float64 in [16, 235].

    ``img`` is HxWx3 RGB: ``uint8`` (divided by 255) or float already in [0, 1].
    """
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
    return rgb @ _Y_WEIGHTS + _Y_OFFSET


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


def evaluate_pair(sr: np.ndarray, hr: np.ndarray, scale: int) -> dict[str, float]:
    """All metrics of one SR/HR uint8 pair with border = ``scale``.

    Returns ``{"psnr_y", "ssim_y", "psnr_rgb"}``; PSNR is ``inf`` for identical images
    (callers writing JSON must handle it).
    """
    return {
        "psnr_y": psnr_y(sr, hr, scale),
        "ssim_y": ssim_y(sr, hr, scale),
        "psnr_rgb": psnr_rgb(sr, hr, scale),
    }


def higher_is_better(metric: str) -> bool:
    """Direction of a metric by its name or a logged key ending in it (``eval/valid/niqe``)."""
    return metric.rsplit("/", 1)[-1] not in LOWER_IS_BETTER
