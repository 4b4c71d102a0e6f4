"""srgan.metrics against independent references (scikit-image) and known closed-form cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from srgan import metrics


def _pair(h: int = 40, w: int = 52, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth-ish HR image and a noisy 'SR' version of it, both uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 5.0), 128 + 90 * np.cos(yy / 7.0), (xx * 3 + yy * 2) % 256], -1)
    hr = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).round().astype(np.uint8)
    sr = np.clip(hr.astype(np.float64) + rng.normal(0, 6, hr.shape), 0, 255).round().astype(np.uint8)
    return sr, hr


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    # Wang et al. settings. skimage filters with reflect padding but then averages the SSIM
    # map after cropping (win_size - 1) // 2 = 5 px per side, i.e. exactly the 'valid' region
    # our implementation (and BasicSR's filter2D(...)[5:-5, 5:-5]) averages, so the two must
    # agree to float rounding, not merely approximately.
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )


def test_rgb_to_y_range_and_values() -> None:
    img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    y = metrics.rgb_to_y(img)
    assert y.dtype == np.float64 and y.shape == (1, 5)
    np.testing.assert_allclose(y[0], [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966], atol=1e-9)
    # float input in [0, 1] is the same thing
    np.testing.assert_allclose(metrics.rgb_to_y(img / 255.0), y, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.rgb_to_y(img.astype(np.float32))  # 0..255 floats are refused, not misread


@pytest.mark.parametrize("border", [0, 2, 4])
def test_psnr_matches_skimage(border: int) -> None:
    sr, hr = _pair()
    b = slice(border, -border or None)
    y_sr, y_hr = metrics.rgb_to_y(sr)[b, b], metrics.rgb_to_y(hr)[b, b]
    ref_y = peak_signal_noise_ratio(y_hr, y_sr, data_range=255)
    ref_rgb = peak_signal_noise_ratio(hr[b, b], sr[b, b], data_range=255)
    assert metrics.psnr_y(sr, hr, border) == pytest.approx(ref_y, abs=1e-9)
    assert metrics.psnr_rgb(sr, hr, border) == pytest.approx(ref_rgb, abs=1e-9)


@pytest.mark.parametrize("border", [0, 3, 4])
def test_ssim_matches_skimage(border: int) -> None:
    sr, hr = _pair(seed=border)
    b = slice(border, -border or None)
    ref = _skimage_ssim(metrics.rgb_to_y(sr)[b, b], metrics.rgb_to_y(hr)[b, b])
    got = metrics.ssim_y(sr, hr, border)
    assert 0.0 < got < 1.0
    assert got == pytest.approx(ref, abs=1e-9)


def test_ssim_gray_matches_skimage_on_minimum_size() -> None:
    rng = np.random.default_rng(3)
    a = rng.uniform(16, 235, (11, 13))
    b = a + rng.normal(0, 5, a.shape)
    assert metrics.ssim_gray(a, b) == pytest.approx(_skimage_ssim(a, b), abs=1e-9)


def test_gaussian_window_is_wang_window() -> None:
    g = metrics.gaussian_window_1d()
    assert g.shape == (11,) and g.sum() == pytest.approx(1.0)
    ref = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    np.testing.assert_allclose(g, ref / ref.sum(), rtol=1e-12)


def test_identical_images() -> None:
    _, hr = _pair()
    res = metrics.evaluate_pair(hr, hr.copy(), 4)
    assert res == {"psnr_y": math.inf, "ssim_y": 1.0, "psnr_rgb": math.inf}


def test_known_offsets() -> None:
    # exactly one gray level everywhere in Y -> 20 log10(255 / 1)
    y = np.random.default_rng(1).uniform(16, 234, (20, 20))
    assert metrics.psnr(y + 1.0, y) == pytest.approx(20 * math.log10(255.0), abs=1e-9)
    # +1 on every RGB channel: RGB MSE = 1, Y shifts by (65.481 + 128.553 + 24.966) / 255
    hr = np.full((16, 16, 3), 100, np.uint8)
    sr = hr + np.uint8(1)
    assert metrics.psnr_rgb(sr, hr, 4) == pytest.approx(20 * math.log10(255.0), abs=1e-9)
    assert metrics.psnr_y(sr, hr, 4) == pytest.approx(20 * math.log10(255.0 / (219.0 / 255.0)), abs=1e-9)


def test_border_is_cropped() -> None:
    _, hr = _pair()
    sr = hr.copy()
    sr[:4, :] = 0
    sr[:, -4:] = 255  # damage only inside the border
    assert metrics.psnr_y(sr, hr, 4) == math.inf
    assert metrics.ssim_y(sr, hr, 4) == 1.0
    assert metrics.psnr_y(sr, hr, 3) < 40


def test_input_validation() -> None:
    sr, hr = _pair()
    with pytest.raises(ValueError, match="uint8"):
        metrics.psnr_y(sr.astype(np.float32) / 255, hr, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr_y(sr[:-1], hr, 4)
    with pytest.raises(ValueError, match="too small"):
        metrics.psnr_y(sr[:8], hr[:8], 4)
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim_y(sr[:18], hr[:18], 4)  # 10 rows left after the border
