"""Standard SR benchmark sets as evaluation sets: Set5, Set14, BSD100, Urban100, Manga109, DIV2K valid.

``fetch_benchmark(name, dest_root, download_dir, scale)`` downloads (or reuses) the archive of a
set, extracts its HR images safely (``download.safe_extract``) and writes::

    dest_root/<name>/hr/<stem>.png   HR mod-cropped to a multiple of ``scale``, RGB (``images.load_rgb``:
                                     the grey images of Set14 / BSD100 become RGB)
    dest_root/<name>/lr/<stem>.png   ``images.downscale(hr, scale)``: the bicubic used for training
    dest_root/<name>/set.json        source archive and its digests, count, per-image sizes and digests

which is the layout of an evaluation folder (``images.iter_pairs``). The LR images shipped in some
archives are ignored on purpose: they were made with MATLAB ``imresize``; regenerating them with the
project's one bicubic keeps evaluation and training on the same degradation. The folder is built in
a temporary sibling and renamed into place (``download.replace_dir``); a second call whose outputs
and archive identity all verify makes no network request and rewrites nothing.

Archives and digests (nothing here is invented; see ``BENCHMARKS`` for the per-set entries):

* ``benchmark.tar`` (EDSR authors, https://cv.snu.ac.kr/research/EDSR/benchmark.tar: Set5, Set14,
  B100, Urban100, HR + MATLAB LR): the URL is in the EDSR-PyTorch README; its **MD5**
  ``4ace41d33c2384b97e6b320cd0afd6ba`` is published in Coloquinte/torchSR
  (``torchsr/datasets/benchmarks.py``). No size or SHA-256 is published, so the first download is
  verified against the MD5 and its size + SHA-256 are then recorded (see below) and used afterwards.
* per-set HR tarballs on Hugging Face (``eugenesiow/<Set>/resolve/main/data/<Set>_HR.tar.gz``, the
  super-image library's datasets; used in deepinv's ``deepinv/datasets/{set5,set14,bsd100}.py``):
  a fallback when cv.snu.ac.kr is unreachable. **No digest is published** for them.
* ``DIV2K_valid_HR.zip``: size + SHA-256 from ``sources.DIV2K_ARCHIVES`` (verified by ``download``).
* Manga109: **no public download URL**. The images are distributed for academic research only,
  after an application at http://www.manga109.org/en/download.html. Put your own archive holding
  exactly the 109 HR images as ``<download_dir>/Manga109.zip`` or serve it under ``base_url``.

Trust on first use: where no SHA-256 is published, the size and SHA-256 of the first verified (MD5)
or first-ever (no digest at all) download are written to ``<download_dir>/<archive>.digest.json``;
a WARNING says when a file is trusted on first use, and every later run verifies the archive against
that record, so a changed upstream file fails with ``DigestMismatchError`` instead of silently
changing a benchmark. Delete the record to accept a new upstream file deliberately.

``PUBLISHED_BICUBIC_X4`` holds the bicubic x4 PSNR-Y figures papers report, for reports to show
next to the bicubic measured on the fetched sets (``bicubic_psnr_y``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from . import images
from .dataio import write_json_atomic
from .download import (
    DigestMismatchError,
    DownloadError,
    FetchError,
    download,
    download_unpinned,
    file_digests,
    is_verified,
    replace_dir,
    safe_extract,
    sha256_file,
    staging_dir,
    url_for,
)
from .sources import DIV2K_ARCHIVES

log = logging.getLogger(__name__)

SET_JSON = "set.json"
SET_FORMAT = 1  # bump when the content of dest_root/<name>/ changes meaning
RECORD_SUFFIX = ".digest.json"  # trust-on-first-use / MD5-verified identity next to an archive
IMAGE_EXTS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
RAW_DIR = "_raw"  # extracted HR originals, inside the temporary build folder only

EDSR_BASE_URL = "https://cv.snu.ac.kr/research/EDSR/"
EDSR_ARCHIVE = "benchmark.tar"
EDSR_MD5 = "4ace41d33c2384b97e6b320cd0afd6ba"  # published in Coloquinte/torchSR
HF_BASE_URL = "https://huggingface.co/datasets/eugenesiow/{set}/resolve/main/data/"
DIV2K_BASE_URL = "https://data.vision.ee.ethz.ch/cvl/DIV2K/"  # as data.div2k.base_url in params.yaml
MANGA109_ARCHIVE = "Manga109.zip"

# Digest basis, as recorded in set.json and in the <archive>.digest.json records.
BASIS_SHA256 = "published SHA-256"
BASIS_MD5 = "published MD5"
BASIS_TOFU = "trust on first use"

# Bicubic x4 PSNR (dB) on the Y channel of YCbCr, ``scale`` px border cropped, MATLAB imresize down and
# up: the bicubic row of ESRGAN (Wang et al., ECCVW 2018, arXiv:1809.00219) Table 2, the same figures
# as RCAN (Zhang et al., ECCV 2018) and the pkuxmq/Invertible-Image-Rescaling README. SRGAN (Ledig et
# al. 2017) quotes Set5 at 28.43 under its own protocol. DIV2K valid is left out on purpose: the usual
# figure (26.66 dB x4, from EDSR, quoted in that README) comes without a stated Y / border-4 protocol
# (EDSR-PyTorch's README measures DIV2K on RGB with a scale + 2 border).
PUBLISHED_BICUBIC_X4: dict[str, float] = {
    "set5": 28.42,
    "set14": 26.00,
    "bsd100": 25.96,
    "urban100": 23.14,
    "manga109": 24.89,
}
PUBLISHED_BICUBIC_X4_SOURCE = (
    "ESRGAN (arXiv:1809.00219) Table 2, bicubic row (= RCAN, arXiv:1807.02758): "
    "PSNR on Y, border = scale, MATLAB bicubic"
)


class BenchmarkError(FetchError):
    """A benchmark set is unknown, unavailable, or its archive does not hold the expected images."""


class BenchmarkDownloadError(BenchmarkError, DownloadError):
    """No source of a set could be obtained (each source's failure is in the message)."""


@dataclass(frozen=True)
class Source:
    """One archive holding the HR images of a set.

    ``hr_dir`` is the folder of the HR images inside the archive (images directly in it are taken);
    None takes every image of the archive (an HR-only archive whose inner folder varies). Only one
    of ``sha256`` (with ``size``) or ``md5`` is normally known; neither means trust on first use.
    ``base_url`` None: no public URL (the archive must be supplied). ``where``: provenance note.
    """

    archive: str
    base_url: str | None
    hr_dir: str | None
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    where: str = ""

    @property
    def url(self) -> str | None:
        """The canonical URL of the archive (None when there is no public one)."""
        return url_for(self.base_url, self.archive) if self.base_url else None

    @property
    def basis(self) -> str:
        """What the archive is verified against: published SHA-256, published MD5 or trust on first use."""
        if self.sha256 and self.size is not None:
            return BASIS_SHA256
        return BASIS_MD5 if self.md5 else BASIS_TOFU


@dataclass(frozen=True)
class BenchmarkSet:
    """A benchmark set: its key, display name, image count, archives (tried in order), provenance."""

    name: str
    title: str
    count: int
    sources: tuple[Source, ...]
    citation: str
    licence: str


def _edsr(folder: str) -> Source:
    return Source(
        EDSR_ARCHIVE, EDSR_BASE_URL, f"benchmark/{folder}/HR", md5=EDSR_MD5,
        where="URL: sanghyun-son/EDSR-PyTorch README.md; MD5: Coloquinte/torchSR "
              "torchsr/datasets/benchmarks.py",
    )


def _hf(title: str, where: str) -> Source:
    return Source(f"{title}_HR.tar.gz", HF_BASE_URL.format(set=title), None, where=where)


_HF_WHERE = "eugenesiow/super-image-data README.md (HF datasets eugenesiow/{t}); URL as in {d}; no digest"
_DIV2K_VALID = DIV2K_ARCHIVES["DIV2K_valid_HR.zip"]

BENCHMARKS: dict[str, BenchmarkSet] = {
    s.name: s
    for s in (
        BenchmarkSet(
            "set5", "Set5", 5,
            (_edsr("Set5"),
             _hf("Set5", _HF_WHERE.format(t="Set5", d="deepinv/deepinv deepinv/datasets/set5.py"))),
            citation="Bevilacqua et al., Low-complexity single-image super-resolution based on nonnegative "
                     "neighbor embedding, BMVC 2012",
            licence="no licence stated by the authors; research use",
        ),
        BenchmarkSet(
            "set14", "Set14", 14,
            (_edsr("Set14"),
             _hf("Set14", _HF_WHERE.format(t="Set14", d="deepinv/deepinv deepinv/datasets/set14.py"))),
            citation="Zeyde et al., On single image scale-up using sparse-representations, "
                     "Curves and Surfaces 2010 (LNCS 6920)",
            licence="no licence stated by the authors; research use",
        ),
        BenchmarkSet(
            "bsd100", "BSD100", 100,
            (_edsr("B100"),
             _hf("BSD100", _HF_WHERE.format(t="BSD100", d="deepinv/deepinv deepinv/datasets/bsd100.py"))),
            citation="Martin et al., A database of human segmented natural images..., ICCV 2001 "
                     "(the 100 test images of BSDS300)",
            licence="Berkeley Segmentation Dataset: non-commercial research use (see the BSDS page)",
        ),
        BenchmarkSet(
            "urban100", "Urban100", 100,
            (_edsr("Urban100"), _hf("Urban100", _HF_WHERE.format(t="Urban100", d="the HF dataset page"))),
            citation="Huang, Singh, Ahuja, Single image super-resolution from transformed "
                     "self-exemplars, CVPR 2015",
            licence="Flickr images selected by the authors (see jbhuang0604/SelfExSR); research use",
        ),
        BenchmarkSet(
            "manga109", "Manga109", 109,
            (Source(MANGA109_ARCHIVE, None, None,
                    where="no public URL: apply at http://www.manga109.org/en/download.html; "
                          "supply an archive of the 109 HR images"),),
            citation="Matsui et al., Sketch-based manga retrieval using Manga109 dataset, MTAP 2017; "
                     "Aizawa et al., Building a manga dataset 'Manga109' with annotations for "
                     "multimedia applications, IEEE MultiMedia 2020",
            licence="academic research use only, with the copyright notice of each title; "
                    "no redistribution",
        ),
        BenchmarkSet(
            "div2k_valid", "DIV2K valid", 100,
            (Source(_DIV2K_VALID.name, DIV2K_BASE_URL, "DIV2K_valid_HR", size=_DIV2K_VALID.size,
                    sha256=_DIV2K_VALID.sha256, where="srgan.sources.DIV2K_ARCHIVES"),),
            citation="Agustsson & Timofte, NTIRE 2017 challenge on single image super-resolution: "
                     "dataset and study, CVPRW 2017",
            licence="DIV2K: academic research use",
        ),
    )
}
ALIASES = {"b100": "bsd100"}


def resolve_name(name: str, sets: Mapping[str, BenchmarkSet] | None = None) -> str:
    """Canonical key of a set name (case-insensitive, ``b100`` = ``bsd100``); BenchmarkError if unknown."""
    table = BENCHMARKS if sets is None else sets
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in table:
        raise BenchmarkError(f"unknown benchmark set {name!r}; choose from: {', '.join(table)}")
    return key


# -- archive identity records ---------------------------------------------------------------------
def _record_path(archive: Path) -> Path:
    return archive.with_name(archive.name + RECORD_SUFFIX)


def _read_record(archive: Path) -> dict[str, Any] | None:
    """The recorded identity of ``archive`` (size, SHA-256, MD5, basis), or None if absent/unreadable."""
    try:
        rec = json.loads(_record_path(archive).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("size"), int):
        return None
    if not isinstance(rec.get("sha256"), str):
        return None
    return rec


# -- obtaining a verified archive ---------------------------------------------------------------
def _write_record(path: Path, src: Source, size: int, sha256: str, md5: str, basis: str) -> dict[str, Any]:
    rec = {"name": src.archive, "size": size, "sha256": sha256, "md5": md5, "basis": basis, "origin": src.url}
    write_json_atomic(_record_path(path), rec)
    return rec


def _identity(src: Source, size: int, sha256: str, md5: str | None, basis: str) -> dict[str, Any]:
    """The archive as recorded in set.json: no mirror URL, so a mirror does not change the file."""
    return {"name": src.archive, "origin": src.url, "hr_dir": src.hr_dir, "size": size,
            "sha256": sha256, "md5": md5, "digest": basis}


def _obtain(src: Source, base_url: str | None, download_dir: Path, opts: dict[str, Any]) -> tuple[Path, dict]:
    """Download (or reuse) ``src`` verified; return its path and its identity for set.json."""
    path = Path(download_dir) / src.archive
    base = base_url or src.base_url
    url = url_for(base, src.archive) if base else None
    if src.basis == BASIS_SHA256:
        assert src.size is not None and src.sha256 is not None
        if url is None and not is_verified(path, src.size, src.sha256):
            raise BenchmarkError(f"{src.archive}: not in {download_dir} and no URL to download it from")
        download(url or "", path, src.size, src.sha256, **opts)
        return path, _identity(src, src.size, src.sha256, src.md5, BASIS_SHA256)

    rec = _read_record(path)
    if rec is not None and src.md5 and rec.get("md5") != src.md5:
        log.warning("%s: its record does not carry the published MD5; verifying the archive again", path)
        _record_path(path).unlink(missing_ok=True)
        rec = None
    if rec is not None:
        # identity known (MD5-verified or trusted on first use): enforce it from now on
        size, sha256 = rec["size"], rec["sha256"]
        if not is_verified(path, size, sha256):
            if url is None:
                raise BenchmarkError(
                    f"{src.archive}: the copy in {download_dir} does not match its record "
                    f"{_record_path(path).name} and there is no URL to download it again"
                )
            try:
                download(url, path, size, sha256, **opts)
            except DigestMismatchError as exc:
                raise DigestMismatchError(
                    f"{exc}. The expected digest was recorded in {_record_path(path)} ({rec.get('basis')}): "
                    "the file served now is not the one first verified; delete that record to accept it"
                ) from None
        return path, _identity(src, size, sha256, rec.get("md5"), rec.get("basis", BASIS_TOFU))

    # no record yet: verify by MD5 when published, otherwise trust on first use
    size = sha256 = got_md5 = None
    if path.is_file():
        size, sha256, got_md5 = file_digests(path)  # e.g. put there by hand
        if src.md5 and got_md5 != src.md5:
            log.warning("%s does not match its published MD5; downloading it again", path)
            path.unlink()
            size = None
    if size is None:
        if url is None:
            raise BenchmarkError(
                f"{src.archive}: no public download ({src.where}); put the archive in {download_dir} "
                "or pass base_url of a server holding it"
            )
        size, sha256, got_md5 = download_unpinned(url, path, md5=src.md5, **opts)
    assert sha256 is not None and got_md5 is not None
    basis = BASIS_MD5 if src.md5 else BASIS_TOFU
    _write_record(path, src, size, sha256, got_md5, basis)
    if src.md5:
        log.info("%s: MD5 %s verified (published); recorded size %d and SHA-256 %s in %s",
                 src.archive, got_md5, size, sha256, _record_path(path).name)
    else:
        log.warning(
            "%s has no published digest: trusting it on first use (size %d, SHA-256 %s) and recording "
            "that in %s; later runs are verified against it", src.archive, size, sha256,
            _record_path(path).name,
        )
    return path, _identity(src, size, sha256, got_md5, basis)


def _obtain_any(
    bset: BenchmarkSet, base_url: str | None, download_dir: Path, opts: dict[str, Any]
) -> tuple[Source, Path, dict]:
    """The first source of ``bset`` that can be obtained; a digest mismatch is never skipped over."""
    failures: list[str] = []
    for src in bset.sources:
        try:
            path, ident = _obtain(src, base_url, download_dir, opts)
            return src, path, ident
        except DigestMismatchError:
            raise  # integrity failure: report it, do not hide it behind a mirror
        except (DownloadError, BenchmarkError) as exc:
            failures.append(str(exc))
            if src is not bset.sources[-1]:
                log.warning("%s: %s; trying the next source", bset.title, exc)
    raise BenchmarkDownloadError(f"{bset.title}: no source could be obtained: " + " | ".join(failures))


# -- building the set folder ----------------------------------------------------------------------
def _selector(src: Source, members: dict[str, str]) -> Callable[[str], str | None]:
    """safe_extract selector for the HR images of ``src``; records output name -> member in ``members``."""
    prefix = src.hr_dir.strip("/") + "/" if src.hr_dir else None

    def select(rel: str) -> str | None:
        base = rel.rsplit("/", 1)[-1]
        if base.startswith("._") or rel.startswith("__MACOSX/") or not base.lower().endswith(IMAGE_EXTS):
            return None  # macOS resource forks and non-images
        if prefix is not None and not (rel.startswith(prefix) and "/" not in rel[len(prefix):]):
            return None
        members[base] = rel
        return base

    return select


def _build(
    bset: BenchmarkSet, src: Source, archive: Path, ident: dict, scale: int, tmp: Path
) -> dict[str, Any]:
    """Extract the HR images of ``archive`` and write hr/, lr/ and set.json into ``tmp``."""
    members: dict[str, str] = {}
    raw = tmp / RAW_DIR
    extracted = safe_extract(archive, raw, _selector(src, members))
    where = f"under {src.hr_dir}/" if src.hr_dir else "in the archive"
    if len(extracted) != bset.count:
        raise BenchmarkError(
            f"{bset.title}: {archive.name} holds {len(extracted)} HR images {where}, expected {bset.count}; "
            "not the expected layout or version of the set"
        )
    stems: dict[str, str] = {}
    for fname in extracted:
        stem = Path(fname).stem
        if stem in stems:
            raise BenchmarkError(f"{bset.title}: {stems[stem]} and {fname} would both become {stem}.png")
        stems[stem] = fname
    per_image: dict[str, dict[str, Any]] = {}
    for stem, fname in sorted(stems.items()):
        rgb = images.load_rgb(raw / fname)  # ImageError naming the file if it is not a readable image
        with Image.open(raw / fname) as im:
            mode = im.mode  # recorded: grey (L), palette (P), ... sources were converted to RGB
        hr = images.mod_crop(rgb, scale)
        lr = images.downscale(hr, scale)
        hr_path, lr_path = tmp / "hr" / f"{stem}.png", tmp / "lr" / f"{stem}.png"
        images.save_png(hr_path, hr)
        images.save_png(lr_path, lr)
        per_image[stem] = {
            "member": members[fname],
            "source_sha256": extracted[fname],
            "source_mode": mode,
            "hr_size": [int(hr.shape[1]), int(hr.shape[0])],
            "lr_size": [int(lr.shape[1]), int(lr.shape[0])],
            "hr_sha256": sha256_file(hr_path),
            "lr_sha256": sha256_file(lr_path),
        }
    shutil.rmtree(raw)
    meta = {
        "format": SET_FORMAT,
        "name": bset.name,
        "title": bset.title,
        "scale": scale,
        "count": len(per_image),
        "archive": ident,
        "hr": f"mod-cropped to a multiple of {scale} (top-left anchored), RGB",
        "lr": "srgan.images.downscale of hr (Pillow antialiased bicubic = MATLAB imresize kernel)",
        "images": per_image,
        "citation": bset.citation,
        "licence": bset.licence,
    }
    (tmp / SET_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def _is_current(out: Path, bset: BenchmarkSet, scale: int, download_dir: Path) -> bool:
    """True if ``out`` was built for this set and scale from a still-trusted archive, all files verified."""
    try:
        meta = json.loads((out / SET_JSON).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or (meta.get("format"), meta.get("name"), meta.get("scale")) != (
        SET_FORMAT, bset.name, scale
    ):
        return False
    arc, imgs = meta.get("archive") or {}, meta.get("images")
    if not isinstance(imgs, dict) or len(imgs) != bset.count:
        return False
    src = next((s for s in bset.sources if s.archive == arc.get("name")), None)
    if src is None:
        return False
    if src.basis == BASIS_SHA256 and (arc.get("sha256"), arc.get("size")) != (src.sha256, src.size):
        return False
    if src.basis == BASIS_MD5 and arc.get("md5") != src.md5:
        return False
    rec = _read_record(Path(download_dir) / src.archive)
    if rec is not None and rec["sha256"] != arc.get("sha256"):
        return False  # built from another file than the one now on record
    for sub in ("hr", "lr"):
        want = {f"{stem}.png": info.get(f"{sub}_sha256") for stem, info in imgs.items()}
        try:
            have = {p.name for p in (out / sub).iterdir()}
        except OSError:
            return False
        if have != set(want) or any(sha256_file(out / sub / n) != d for n, d in want.items()):
            return False
    return True


def fetch_benchmark(
    name: str,
    dest_root: Path,
    download_dir: Path,
    scale: int,
    base_url: str | None = None,
    progress: bool | None = None,
    *,
    sets: Mapping[str, BenchmarkSet] | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
) -> Path:
    """Build ``dest_root/<name>/{hr,lr,set.json}`` for benchmark ``name`` at ``scale``; return that folder.

    The archive is downloaded into (or reused, verified, from) ``download_dir``. ``base_url``
    replaces the base URL of every source (a mirror holding the archives under their own names);
    sources are tried in order, falling back on network/HTTP errors but never on a digest mismatch.
    ``sets`` replaces ``BENCHMARKS`` (tests, private copies). Nothing is downloaded or rewritten
    when the folder is already complete and verified; a failure leaves the previous folder intact.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    table = BENCHMARKS if sets is None else sets
    bset = table[resolve_name(name, table)]
    dest_root, download_dir = Path(dest_root), Path(download_dir)
    out = dest_root / bset.name
    if _is_current(out, bset, scale, download_dir):
        log.info("%s: %s is complete and verified (x%d); nothing to do", bset.title, out, scale)
        return out
    opts = {"progress": progress, "retries": retries, "backoff": backoff, "timeout": timeout}
    src, archive, ident = _obtain_any(bset, base_url, download_dir, opts)
    tmp = staging_dir(out)
    try:
        meta = _build(bset, src, archive, ident, scale, tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: %d images (x%d) from %s [%s] -> %s", bset.title, meta["count"], scale, src.archive,
             ident["digest"], out)
    return out


def fetch_benchmarks(
    names: Iterable[str],
    dest_root: Path,
    download_dir: Path,
    scale: int,
    base_url: str | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> dict[str, Path]:
    """``fetch_benchmark`` for each of ``names`` (all checked first); returns {canonical name: folder}.

    Sets sharing an archive (EDSR's benchmark.tar) download it once.
    """
    table = kwargs.get("sets") or BENCHMARKS
    keys = list(dict.fromkeys(resolve_name(n, table) for n in names))  # unknown names fail before any work
    return {
        k: fetch_benchmark(k, dest_root, download_dir, scale, base_url, progress, **kwargs) for k in keys
    }


def bicubic_psnr_y(set_dir: Path) -> float:
    """Mean PSNR-Y (dB, border = scale) of the project bicubic upscale of ``set_dir``'s lr/ against hr/.

    The measured counterpart of ``PUBLISHED_BICUBIC_X4`` (those used MATLAB imresize both ways).
    """
    from . import metrics

    values = []
    for pair in images.iter_pairs(set_dir):
        scale = pair.hr.shape[0] // pair.lr.shape[0]
        values.append(metrics.psnr_y(images.upscale_bicubic(pair.lr, scale), pair.hr, border=scale))
    return float(sum(values) / len(values))
