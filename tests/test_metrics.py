"""srgan.metrics against independent references (scikit-image) and known closed-form cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from srgan import images, losses, metrics


class _Ref:
    """A reference pair (what ``images.Pair`` offers a metric)."""

    def __init__(self, hr: np.ndarray, lr: np.ndarray):
        self.hr, self.lr = hr, lr


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
    res = metrics.Scorer(4).score(hr, _Ref(hr, images.downscale(hr, 4)))
    assert {k: res[k] for k in ("psnr_y", "ssim_y", "psnr_rgb", "psnr_cbcr")} == {
        "psnr_y": math.inf, "ssim_y": 1.0, "psnr_rgb": math.inf, "psnr_cbcr": math.inf}


def test_known_offsets() -> None:
    # exactly one gray level everywhere in Y -> 20 log10(255 / 1)
    y = np.random.default_rng(1).uniform(16, 234, (20, 20))
    assert metrics.psnr(y + 1.0, y) == pytest.approx(20 * math.log10(255.0), abs=1e-9)
    # +1 on every RGB channel: RGB MSE = 1, Y shifts by (65.481 + 128.553 + 24.966) / 255
    hr = np.full((16, 16, 3), 100, np.uint8)
    sr = hr + np.uint8(1)
    assert metrics.psnr_rgb(sr, hr, 4) == pytest.approx(20 * math.log10(255.0), abs=1e-9)
    assert metrics.psnr_y(sr, hr, 4) == pytest.approx(20 * math.log10(255.0 / (219.0 / 255.0)), abs=1e-9)


def test_chroma_psnr_sees_colour_errors_and_not_gray_ones() -> None:
    hr = np.random.default_rng(2).integers(20, 200, (16, 16, 3)).astype(np.uint8)
    gray = hr + np.uint8(3)  # the same shift on R, G and B: luma moves, chroma does not
    assert metrics.psnr_cbcr(gray, hr, 4) > 200 and metrics.psnr_y(gray, hr, 4) < 40  # > 200: rounding only
    red = hr.copy()
    red[..., 0] += 3  # a colour shift: Cb moves by 3 x 37.797 / 255, Cr by 3 x 112 / 255
    mse = ((3 * 37.797 / 255) ** 2 + (3 * 112.0 / 255) ** 2) / 2
    assert metrics.psnr_cbcr(red, hr, 4) == pytest.approx(10 * math.log10(255.0**2 / mse), abs=1e-9)
    assert metrics.rgb_to_cbcr(np.full((1, 1, 3), 255, np.uint8)) == pytest.approx(np.full((1, 1, 2), 128.0))


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


# -- the sub-pixel artifact score --------------------------------------------------------------------
def _photo_pair(scale: int = 4) -> tuple[np.ndarray, np.ndarray]:
    from conftest import skimage_data_dir

    hr = images.mod_crop(images.load_rgb(skimage_data_dir() / "astronaut.png"), scale)
    return hr, images.downscale(hr, scale)


def test_artifact_is_zero_for_bicubic_and_low_for_a_smooth_image():
    hr, lr = _photo_pair()
    assert metrics.subpixel_artifact(images.upscale_bicubic(lr, 4), lr, 4, metrics.ARTIFACT_WINDOW) == 0.0
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    smooth = np.stack([200 * xx + 20, 150 * yy + 40, 100 * (xx + yy) / 2 + 60], -1).round().astype(np.uint8)
    small = images.downscale(smooth, 4)
    # a smooth image's detail over bicubic is tiny, so is any pattern in it: 8-bit rounding and the
    # image edges only, a tenth of a level (a visible checkerboard is a few levels)
    assert metrics.subpixel_artifact(smooth, small, 4, metrics.ARTIFACT_WINDOW) < 0.25


def test_artifact_measures_a_checkerboard_and_ranks_it_above_real_detail():
    hr, lr = _photo_pair()
    window = metrics.ARTIFACT_WINDOW
    real_level = metrics.subpixel_artifact(hr, lr, 4, window)
    rng = np.random.default_rng(0)
    period = rng.normal(0.0, 1.0, (4, 4))
    period -= period.mean()
    period *= 2.0 / np.sqrt(np.mean(period**2))  # RMS 2 levels, zero mean: a pure lattice pattern
    bic = images.upscale_bicubic(lr, 4).astype(np.float64)
    board = np.tile(period, (bic.shape[0] // 4, bic.shape[1] // 4))[..., None]
    sr = np.clip(bic + board, 0, 255).round().astype(np.uint8)
    got = metrics.subpixel_artifact(sr, lr, 4, window)
    # the pattern's amplitude in Y levels (an equal RGB step moves BT.601 Y by 219/255 of it)
    assert got == pytest.approx(2.0 * 219 / 255, rel=0.05)
    assert got > 2 * real_level  # the photo's own detail leaks less into the lattice
    # the same pattern on the real image's detail: still found on top of HR's level
    assert metrics.subpixel_artifact(np.clip(hr + board, 0, 255).round().astype(np.uint8), lr, 4, window) > 2 * real_level


def test_artifact_refuses_mismatched_or_tiny_images():
    hr, lr = _photo_pair()
    with pytest.raises(ValueError, match="is not 4x the LR"):
        metrics.subpixel_artifact(hr[:-4], lr, 4, metrics.ARTIFACT_WINDOW)
    with pytest.raises(ValueError, match="smaller than one 64-px window"):
        metrics.subpixel_artifact(hr[:32, :32], lr[:8, :8], 4, metrics.ARTIFACT_WINDOW)


# -- discriminator health -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(losses.ADVERSARIAL))
def test_d_health_separating_and_chance_outputs(name):
    """Constructed D outputs in each objective's own units: a D that separates scores high, one
    that outputs the same distribution for real and fake sits at chance."""
    rng = np.random.default_rng(1)
    verdict = losses.ADVERSARIAL[name].verdict
    # a separating D: real above its decision point, fake below (logits, LS targets and critics alike)
    real, fake = rng.normal(1.5, 0.5, 400), rng.normal(-1.0, 0.5, 400)
    if name == "least_squares":  # regression onto 1 / 0
        real, fake = rng.normal(0.9, 0.15, 400), rng.normal(0.1, 0.15, 400)
    good = metrics.d_health(real, fake, verdict)
    assert good["d_acc"] > 0.9 and good["d_auc"] > 0.95 and good["d_gap"] > 0
    same = rng.normal(0.3, 1.0, 800)
    chance = metrics.d_health(same[:400], same[400:], verdict)
    assert abs(chance["d_auc"] - 0.5) < 0.06 and abs(chance["d_gap"]) < 0.2
    if name != "least_squares":  # LS's decision point is 1/2, not the mean: a shifted D is biased, not good
        assert abs(chance["d_acc"] - 0.5) < 0.06
    assert chance["d_acc"] < metrics.D_SEPARATES <= good["d_acc"]


def test_d_health_of_a_critic_ignores_its_level():
    """A Wasserstein critic has no absolute level: shifting both outputs changes nothing."""
    verdict = losses.ADVERSARIAL["wasserstein_gp"].verdict
    real, fake = np.array([3.0, 4.0, 5.0]), np.array([1.0, 2.0, 4.5])
    a, b = metrics.d_health(real, fake, verdict), metrics.d_health(real + 100, fake + 100, verdict)
    assert a == b and a["d_acc"] == a["d_auc"] == pytest.approx(7 / 9) and a["d_gap"] == pytest.approx(1.5)


def test_d_health_probability_family_is_in_probability_units():
    verdict = losses.ADVERSARIAL["modified"].verdict
    h = metrics.d_health(np.array([0.0]), np.array([0.0]), verdict)
    assert h["d_gap"] == 0.0 and h["d_auc"] == 0.5
    h = metrics.d_health(np.array([50.0]), np.array([-50.0]), verdict)  # saturated: no overflow
    assert h["d_gap"] == pytest.approx(1.0) and h["d_acc"] == 1.0


# -- the registry -------------------------------------------------------------------------------------
def test_registry_entries_are_complete_and_named_once():
    for name, m in metrics.REGISTRY.items():
        assert m.name == name and m.label and m.digits >= 0
        assert (m.score is None) == (m.kind == metrics.DISCRIMINATOR), name
    assert metrics.get("eval/valid/niqe") is metrics.REGISTRY["niqe"] and metrics.get("val_psnr_y").name == "psnr_y"
    assert not metrics.higher_is_better("eval/valid/niqe") and metrics.higher_is_better("val_ssim_y")
    with pytest.raises(KeyError, match="unknown metric 'nope'; registered: psnr_y"):
        metrics.get("nope")
    with pytest.raises(ValueError, match="registered twice"):
        metrics.register(metrics.REGISTRY["psnr_y"])


def test_a_new_metric_is_one_entry(monkeypatch, tmp_path):
    """Registering a metric puts it into every scorer, the evaluate stage's metrics.json and the report."""
    from srgan import evaluate, report

    monkeypatch.setattr(metrics, "REGISTRY", dict(metrics.REGISTRY))
    metrics.register(metrics.Metric("mean_level", "mean level", None, 1, metrics.NO_REFERENCE,
                                    lambda img, ref, scale, _: float(np.mean(img))))
    hr, lr = _photo_pair()
    for sub, img in (("hr", hr), ("lr", lr)):
        images.save_png(tmp_path / "set" / sub / "astronaut.png", img)
    scorer = metrics.Scorer(4)
    assert "mean_level" in scorer.names and "niqe" not in scorer.names  # NIQE needs its model
    summary, rows = evaluate.evaluate_sets({"bicubic": images.upscale_bicubic}, {"set": tmp_path / "set"},
                                           scorer, tmp_path / "eval", zoom=32)
    assert summary["set"]["hr"]["mean_level"] == pytest.approx(float(np.mean(hr)))
    assert rows[0]["bicubic_mean_level"] > 0
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text(__import__("json").dumps(summary))
    assert "<th>mean level</th>" in report.build(tmp_path / "reports").read_text()
