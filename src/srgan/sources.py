"""Data sources (sample | div2k | coco | folder) -> ``data/raw/{train,valid}/`` + ``data/raw/fetch.json``.

``fetch()`` builds the whole raw folder in a temporary sibling (``raw.tmp-*``) and renames it
into place only when complete, so ``data/raw`` is either the previous result or the new one,
never a mix. fetch.json is deterministic (no timestamps, no machine paths, no mirror URL) so
that an identical fetch gives an identical DVC hash and downstream stages are not re-run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srgan.config import Config
from srgan.download import (
    CHUNK,
    Archive,
    FetchError,
    fetch_archive,
    list_members,
    replace_dir,
    safe_extract,
    staging_dir,
)

log = logging.getLogger(__name__)

MANIFEST = "fetch.json"

# The offline sample set: real photographs shipped inside two PyPI wheels (package -> its data/
# folder). Training: colour photos from scikit-image (the two motorcycle views are near-duplicates,
# so both stay in train: splitting them would leak content into validation). Validation: the five
# lossless PNG photos of sporco (BSD licence: Kodak kodim23, monarch, sail, tulips, barbara), which
# are disjoint from training and, unlike a JPEG, carry no compression blocks no upscaler can predict.
SAMPLE_TRAIN_PACKAGE = "skimage"
SAMPLE_TRAIN = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
)
SAMPLE_VALID_PACKAGE = "sporco"
SAMPLE_VALID = ("barbara.png", "kodim23.png", "monarch.png", "sail.png", "tulips.png")
SAMPLE_DISTRIBUTIONS = {"skimage": "scikit-image", "sporco": "sporco"}  # import name -> PyPI name

# Published sizes and SHA-256 digests of the official archives.
DIV2K_ARCHIVES: dict[str, Archive] = {
    a.name: a
    for a in (
        Archive(
            "DIV2K_train_HR.zip", 3530603713,
            "9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335",
        ),
        Archive(
            "DIV2K_valid_HR.zip", 448993893,
            "20dd31fd84d777bc1cf5d6b7654a3f569c0aec74458ae094122ad1d0489900fc",
        ),
        Archive(
            "DIV2K_train_LR_bicubic_X4.zip", 246914039,
            "f006b837f4eb52b82909aa01478e6d6d199eefce932179491d0c9dbb706dde3a",
        ),
        Archive(
            "DIV2K_valid_LR_bicubic_X4.zip", 31505881,
            "a50a5d1c4b88de4e8d300d8fb2b904c52fe93b2b298a4899697760d7cbb6d553",
        ),
    )
}
COCO_ARCHIVES: dict[str, Archive] = {
    a.name: a
    for a in (
        Archive("val2017.zip", 815585330, "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05"),
        Archive(
            "train2017.zip", 19336861798,
            "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
        ),
    )
}
ARCHIVES: dict[str, Archive] = {**DIV2K_ARCHIVES, **COCO_ARCHIVES}

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class SourceError(FetchError):
    """A data source is unavailable or does not have the expected content."""


@dataclass
class _Ctx:
    """What a source builder needs: where archives live, their table, download options."""

    download_dir: Path
    table: Mapping[str, Archive]
    download_opts: dict[str, Any]
    used: list[dict[str, Any]] = field(default_factory=list)

    def get(self, name: str, base_url: str) -> Path:
        """Download (or reuse) the verified archive ``name``; record it for fetch.json."""
        try:
            archive = self.table[name]
        except KeyError:
            raise SourceError(f"{name}: no published size/SHA-256 known for this archive") from None
        path = fetch_archive(archive, base_url, self.download_dir, **self.download_opts)
        self.used.append({"name": archive.name, "size": archive.size, "sha256": archive.sha256})
        return path


# -- sample ------------------------------------------------------------------------------------------
def sample_dir(package: str = SAMPLE_TRAIN_PACKAGE) -> Path:
    """A package's bundled ``data/`` folder, found without importing the package (sporco's own
    dependencies are not installed: only its data files are used)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"data.source=sample needs the {SAMPLE_DISTRIBUTIONS.get(package, package)} package "
                          "(make setup installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _copy_hashed(src: Path, dst: Path) -> str:
    """Byte-for-byte copy; returns the SHA-256 of what was written."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(CHUNK):
            h.update(block)
            fo.write(block)
    return h.hexdigest()


def _sample(cfg: Config, out: Path, ctx: _Ctx, src_dir: Path | None = None) -> tuple[dict, dict]:
    """``src_dir`` (tests) replaces both packages' data folders."""
    splits: dict[str, dict[str, str]] = {}
    versions: dict[str, str] = {}
    for split, package, names in (("train", SAMPLE_TRAIN_PACKAGE, SAMPLE_TRAIN),
                                  ("valid", SAMPLE_VALID_PACKAGE, SAMPLE_VALID)):
        folder = src_dir or sample_dir(package)
        dist = SAMPLE_DISTRIBUTIONS[package]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise SourceError(f"sample images missing from {folder}: {', '.join(missing)} (reinstall {dist})")
        (out / split).mkdir()
        splits[split] = {n: _copy_hashed(folder / n, out / split / n) for n in sorted(names)}
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return splits, {"packages": versions}


# -- div2k -------------------------------------------------------------------------------------------
def _flat_selector(prefix: str, exts: tuple[str, ...] = IMAGE_EXTS) -> Callable[[str], str | None]:
    """Keep images directly under ``prefix`` (an archive folder), named by their basename."""

    def select(rel: str) -> str | None:
        if rel.startswith(prefix) and "/" not in rel[len(prefix):] and rel.lower().endswith(exts):
            return rel[len(prefix):]
        return None

    return select


def _div2k(cfg: Config, out: Path, ctx: _Ctx) -> tuple[dict, dict]:
    d = cfg.data.div2k
    # (archive, folder inside it, split); official LR names keep their suffix: 0001.png <-> 0001x4.png
    plan = [
        ("DIV2K_train_HR.zip", "DIV2K_train_HR/", "train"),
        ("DIV2K_valid_HR.zip", "DIV2K_valid_HR/", "valid"),
    ]
    if d.include_lr:
        plan += [
            ("DIV2K_train_LR_bicubic_X4.zip", "DIV2K_train_LR_bicubic/X4/", "train_lr"),
            ("DIV2K_valid_LR_bicubic_X4.zip", "DIV2K_valid_LR_bicubic/X4/", "valid_lr"),
        ]
    # download everything first: a network failure then costs no extraction work
    paths = {name: ctx.get(name, d.base_url) for name, _, _ in plan}
    splits: dict[str, dict[str, str]] = {}
    for name, prefix, split in plan:
        splits[split] = safe_extract(paths[name], out / split, _flat_selector(prefix, (".png",)))
        if not splits[split]:
            raise SourceError(f"{name}: no {prefix}*.png inside; not the official DIV2K layout")
    if d.include_lr:
        for hr, lr in (("train", "train_lr"), ("valid", "valid_lr")):
            want = {f"{Path(n).stem}x4.png" for n in splits[hr]}
            if want != set(splits[lr]):
                diff = sorted(want ^ set(splits[lr]))
                raise SourceError(f"DIV2K {hr} HR and x4 LR images do not pair up (e.g. {diff[:3]})")
    return splits, {"include_lr": d.include_lr, "lr_scale": 4 if d.include_lr else None}


# -- coco --------------------------------------------------------------------------------------------
# -- folder ------------------------------------------------------------------------------------------
def _folder_images(folder: Path) -> list[str]:
    """Candidate image files under ``folder`` (recursive; hidden files and notes skipped); every
    file is tried by preprocess, which skips and lists the ones that do not decode."""
    from .images import list_images

    return list_images(folder)


def _folder(cfg: Config, out: Path) -> tuple[dict, dict]:
    """Your own images: data.folder.train (+ data.folder.valid, or a seeded split of train)."""
    f = cfg.data.folder
    train_dir, valid_dir = Path(f.train), Path(f.valid)
    if not train_dir.is_dir():
        raise SourceError(f"data.folder.train: {train_dir} is not a folder")
    train = _folder_images(train_dir)
    valid = _folder_images(valid_dir) if valid_dir.is_dir() else []
    if not train:
        raise SourceError(f"data.folder.train: no image files in {train_dir}")
    pairs = {"train": [(train_dir, n) for n in train], "valid": [(valid_dir, n) for n in valid]}
    if not valid:
        if f.valid_fraction <= 0:
            raise SourceError(f"data.folder.valid: no image files in {valid_dir} and data.folder.valid_fraction is 0")
        order = seeded_subset(train, cfg.seed)
        k = max(1, round(len(order) * f.valid_fraction))
        if k >= len(order):
            raise SourceError(f"data.folder: {len(order)} image(s) cannot be split into train and valid")
        held = set(order[:k])
        pairs = {"train": [(train_dir, n) for n in train if n not in held],
                 "valid": [(train_dir, n) for n in train if n in held]}
    splits: dict[str, dict[str, str]] = {}
    for split, files in pairs.items():
        splits[split] = {}
        for folder, name in files:
            dst = out / split / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            splits[split][name] = _copy_hashed(folder / name, dst)
    # no absolute paths: the manifest (and so DVC's hash of data/raw) must not depend on the machine
    return splits, {"valid_fraction": f.valid_fraction if not valid else None}


def seeded_subset(names: list[str], seed: int) -> list[str]:
    """``names`` sorted, then shuffled with ``random.Random(seed)``: a reproducible order."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return order


def _coco_pool(archive: Path, folder: str) -> list[str]:
    select = _flat_selector(folder + "/")
    pool = [select(m) for m in list_members(archive)]
    names = [n for n in pool if n]
    if not names:
        raise SourceError(f"{archive.name}: no {folder}/*.jpg inside; not the official COCO layout")
    return names


def _coco(cfg: Config, out: Path, ctx: _Ctx) -> tuple[dict, dict]:
    c = cfg.data.coco
    n_train, n_valid = c.train_images, c.valid_images
    val_zip = ctx.get("val2017.zip", c.base_url)
    val_order = seeded_subset(_coco_pool(val_zip, "val2017"), cfg.seed)
    # validation is taken first so it stays the same when only train_images changes
    valid = val_order[:n_valid]
    if c.train_archive == "val2017":
        if n_train + n_valid > len(val_order):
            raise SourceError(
                f"data.coco.train_images + data.coco.valid_images = {n_train + n_valid}, "
                f"but val2017.zip holds only {len(val_order)} images"
            )
        train_zip, train_folder, train = val_zip, "val2017", val_order[n_valid:n_valid + n_train]
    else:
        train_zip, train_folder = ctx.get("train2017.zip", c.base_url), "train2017"
        train_order = seeded_subset(_coco_pool(train_zip, "train2017"), cfg.seed)
        train = train_order[:n_train]
    if len(valid) < n_valid or len(train) < n_train:
        raise SourceError(
            f"COCO has too few images: wanted {n_train} train / {n_valid} valid, "
            f"found {len(train)} / {len(valid)}"
        )
    if set(train) & set(valid):  # COCO ids are unique across its splits; guard anyway
        raise SourceError(f"COCO train and valid subsets overlap: {sorted(set(train) & set(valid))[:3]}")

    def pick(folder: str, chosen: list[str]) -> Callable[[str], str | None]:
        wanted = {f"{folder}/{n}": n for n in chosen}
        return wanted.get

    # only the chosen members are extracted (train2017.zip is 19 GB)
    splits = {
        "train": safe_extract(train_zip, out / "train", pick(train_folder, train)),
        "valid": safe_extract(val_zip, out / "valid", pick("val2017", valid)),
    }
    params = {
        "seed": cfg.seed,
        "train_archive": c.train_archive,
        "train_images": n_train,
        "valid_images": n_valid,
    }
    return splits, params


# -- entry point -------------------------------------------------------------------------------------
def fetch(
    cfg: Config,
    raw_dir: Path,
    download_dir: Path,
    *,
    archives: Mapping[str, Archive] | None = None,
    sample_src: Path | None = None,
    progress: bool | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Populate ``raw_dir`` from ``cfg.data.source``; return the fetch.json manifest.

    ``archives`` overrides/extends the published name -> (size, SHA-256) table (tests, new
    mirrors of other files); base URLs come from the config. ``sample_src`` replaces
    scikit-image's data folder. Archives are cached (verified) in ``download_dir``; raw_dir is
    replaced atomically, and left untouched if anything fails.
    """
    raw_dir, download_dir = Path(raw_dir), Path(download_dir)
    source = cfg.data.source
    ctx = _Ctx(
        download_dir=download_dir,
        table={**ARCHIVES, **(archives or {})},
        download_opts={"progress": progress, "retries": retries, "backoff": backoff, "timeout": timeout},
    )
    tmp = staging_dir(raw_dir)
    try:
        if source == "sample":
            splits, details = _sample(cfg, tmp, ctx, sample_src)
        elif source == "div2k":
            splits, details = _div2k(cfg, tmp, ctx)
        elif source == "coco":
            splits, details = _coco(cfg, tmp, ctx)
        elif source == "folder":
            splits, details = _folder(cfg, tmp)
        else:  # pragma: no cover - config validation allows only the three above
            raise SourceError(f"data.source: unknown source {source!r}")
        manifest = {
            "source": source,
            "details": details,
            "counts": {split: len(files) for split, files in splits.items()},
            "splits": splits,
            # identity of the archives, not their URL: a mirror must not change this file
            "archives": ctx.used,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, raw_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: %s -> %s", source, ", ".join(f"{k} {v}" for k, v in manifest["counts"].items()), raw_dir)
    return manifest
