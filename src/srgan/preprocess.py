"""Preprocess stage core: raw images -> HR/LR training crops in TFRecord shards + validation PNGs.

Output (``out_dir``, normally data/processed, declared ``persist: true`` in dvc.yaml)::

    train/train-00000.tfrecord   crops of a fixed group of source images (see "Shards")
    valid/hr/<stem>.png          validation image mod-cropped to a multiple of the scale
    valid/lr/<stem>.png          its bicubic downscale (images.downscale)
    manifest.json                written last: counts, config, source digests, skipped files, digest
    .progress.json               resume bookkeeping (deterministic content, no timestamps)

Crops. Candidate positions form a covering grid: ``ceil(W / hr_crop) x ceil(H / hr_crop)`` squares
spaced evenly from edge to edge (on the scale grid), so together they cover the whole image and
neighbours overlap only by the few pixels needed to reach the far edge. ``crops_per_image`` of
them are drawn without replacement (an image with fewer candidates gives fewer crops, every part
of it used). The draw depends only on ``seed``, the file name and the image size: re-runs give
identical crops. The LR of a crop is ``images.downscale`` of that HR crop, so LR pixel (i, j)
covers HR pixels [i*s, (i+1)*s) of the same crop; because crops start on the scale grid they also
equal the corresponding region of the downscaled whole image, away from the crop borders.

Shards. Sorted training files are split into fixed groups of ``max(1, shard_size //
crops_per_image)`` images; group k becomes ``train-{k:05d}.tfrecord`` (at most ``shard_size``
crops when ``crops_per_image <= shard_size``; a group whose images were all skipped writes no
file). A shard is written to ``<name>.tmp`` and renamed when complete.

Resume. A shard's key is the SHA-256 of (preprocess settings that affect it, the seed, the format
version, its source names and their SHA-256). ``.progress.json`` records the key of every finished
shard / validation image; on the next run those with a matching key (and their file present) are
kept, everything else in train/ and valid/{hr,lr}/ is deleted and redone. manifest.json is deleted
at the start and written last, so it only exists for a complete, consistent output.

TFRecord features: ``hr``/``lr`` raw uint8 bytes (HxWx3, row-major), ``hr_shape``/``lr_shape``
int64 [h, w, 3], ``source`` (file name under raw/train), ``offset`` int64 [y, x] of the HR crop.

Workers run numpy/Pillow only (decode, crop, downscale) and return arrays; the parent alone
imports TensorFlow to write shards, after the workers were forked. A parent that already loaded
TensorFlow (tests, notebooks, the trainer) spawns them instead, which needs the usual
``if __name__ == "__main__":`` guard in the calling script.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import multiprocessing
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from . import images
from .config import Config
from .dataio import MANIFEST_NAME, json_digest, read_json, sha256_file, write_json_atomic
from .images import ImageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the shard/record layout or the crop rule changes
PROGRESS_NAME = ".progress.json"
MIN_VALID_LR_SIDE = 8  # LR px; smaller images make PSNR/SSIM (11x11 window, border crop) meaningless

T = TypeVar("T")
R = TypeVar("R")


class PreprocessError(RuntimeError):
    """The raw data cannot produce a usable training or validation set."""


# --------------------------------------------------------------------------- small helpers


def _clean_dir(folder: Path, keep: set[str]) -> int:
    """Delete every entry of ``folder`` not named in ``keep``; returns how many were removed."""
    folder.mkdir(parents=True, exist_ok=True)
    removed = 0
    for p in folder.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed += 1
    return removed


def _ordered_map(pool: Any, fn: Callable[[T], R], jobs: Iterable[T], depth: int) -> Iterator[R]:
    """Results of ``fn`` over ``jobs`` in order, at most ``depth`` in flight (bounded memory).

    The first ``depth`` jobs are submitted at once (not on the first ``next``), so the workers are
    busy while the caller does something slow such as importing TensorFlow.
    """
    if pool is None:
        return map(fn, jobs)
    it = iter(jobs)
    pending: deque = deque(pool.apply_async(fn, (job,)) for job in itertools.islice(it, depth))

    def results() -> Iterator[R]:
        while pending:
            res = pending.popleft().get()
            for job in itertools.islice(it, 1):
                pending.append(pool.apply_async(fn, (job,)))
            yield res

    return results()


def _start_method_context() -> Any:
    """``fork`` (fast, no ``__main__`` guard needed) unless TensorFlow is already loaded here:
    forking a process that runs TF's thread pools can deadlock the child, so then ``spawn``."""
    if "tensorflow" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


def resolve_workers(workers: int) -> int:
    """``0`` -> every core available to this process."""
    if workers > 0:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- training crops


def crop_positions(
    width: int, height: int, hr_crop: int, count: int, scale: int, seed: int, name: str
) -> list[tuple[int, int]]:
    """Top-left (y, x) of up to ``count`` ``hr_crop`` squares from the covering grid, on the scale grid.

    Deterministic in (seed, name, image size); sorted; ``[]`` if the image is smaller than one crop.
    """
    gw, gh, cg = width // scale, height // scale, hr_crop // scale  # in scale-grid units
    if gw < cg or gh < cg:
        return []

    def axis(g: int) -> list[int]:
        n = -(-g // cg)  # ceil: enough squares to reach the far edge
        return [0] if n == 1 else [round(j * (g - cg) / (n - 1)) for j in range(n)]

    ys, xs = axis(gh), axis(gw)
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    rng = np.random.default_rng(np.random.SeedSequence([seed, name_key]))
    cells = np.sort(rng.permutation(len(ys) * len(xs))[: min(count, len(ys) * len(xs))])
    return [(ys[c // len(xs)] * scale, xs[c % len(xs)] * scale) for c in map(int, cells)]


@dataclass(frozen=True)
class TrainJob:
    path: str
    name: str  # relative to raw/train; also the crop-position key
    seed: int
    scale: int
    hr_crop: int
    crops: int


@dataclass
class TrainCrops:
    name: str
    hr: np.ndarray | None = None  # N x hr_crop x hr_crop x 3 uint8
    lr: np.ndarray | None = None  # N x lr x lr x 3 uint8
    offsets: list[tuple[int, int]] = field(default_factory=list)
    skipped: str | None = None


def crop_image(job: TrainJob) -> TrainCrops:
    """Worker: decode one training image and return its HR crops and their bicubic LR."""
    try:
        img = images.load_rgb(job.path)
    except ImageError as exc:
        return TrainCrops(job.name, skipped=str(exc).removeprefix(f"{job.path}: "))
    h, w = img.shape[:2]
    pos = crop_positions(w, h, job.hr_crop, job.crops, job.scale, job.seed, job.name)
    if not pos:
        return TrainCrops(job.name, skipped=f"{w}x{h} is smaller than the {job.hr_crop}px training crop")
    c = job.hr_crop
    hr = np.stack([img[y : y + c, x : x + c] for y, x in pos])
    lr = np.stack([images.downscale(crop, job.scale) for crop in hr])
    return TrainCrops(job.name, hr, lr, pos)


class _ShardWriter:
    """Streams records into ``<name>.tmp``; ``close()`` renames it (or removes it if empty)."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.count = 0
        self._writer = None

    def write(self, crops: TrainCrops) -> None:
        import tensorflow as tf  # parent only: workers never pay for the import

        if self._writer is None:
            self._writer = tf.io.TFRecordWriter(str(self.tmp))
        assert crops.hr is not None and crops.lr is not None

        def i64(v: Iterable[int]) -> tf.train.Feature:
            return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))

        def raw(b: bytes) -> tf.train.Feature:
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))

        for hr, lr, off in zip(crops.hr, crops.lr, crops.offsets):
            ex = tf.train.Example(features=tf.train.Features(feature={
                "hr": raw(np.ascontiguousarray(hr).tobytes()),
                "lr": raw(np.ascontiguousarray(lr).tobytes()),
                "hr_shape": i64(hr.shape),
                "lr_shape": i64(lr.shape),
                "source": raw(crops.name.encode()),
                "offset": i64(off),
            }))
            self._writer.write(ex.SerializeToString(deterministic=True))  # map order fixed: byte-stable shards
            self.count += 1

    def close(self) -> int:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.count:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return self.count


# --------------------------------------------------------------------------- validation images


@dataclass(frozen=True)
class ValidJob:
    path: str
    name: str
    scale: int
    max_side: int  # 0 = whole image
    hr_out: str
    lr_out: str


def prepare_valid(job: ValidJob) -> dict[str, Any]:
    """Worker: mod-crop (and centre-crop) one validation image, save HR and bicubic LR PNGs."""
    try:
        img = images.mod_crop(images.load_rgb(job.path), job.scale)
    except ImageError as exc:
        return {"skipped": str(exc).removeprefix(f"{job.path}: ")}
    if job.max_side:
        lim = job.max_side - job.max_side % job.scale
        h, w = img.shape[:2]
        th, tw = min(h, lim), min(w, lim)
        top, left = (h - th) // 2, (w - tw) // 2
        img = img[top : top + th, left : left + tw]
    h, w = img.shape[:2]
    if min(h, w) < MIN_VALID_LR_SIDE * job.scale:
        return {"skipped": f"{w}x{h} is smaller than {MIN_VALID_LR_SIDE * job.scale}px "
                           f"({MIN_VALID_LR_SIDE} LR px at scale {job.scale})"}
    lr = images.downscale(img, job.scale)
    images.save_png(job.hr_out, img)
    images.save_png(job.lr_out, lr)
    return {"hr_shape": list(img.shape), "lr_shape": list(lr.shape)}


# --------------------------------------------------------------------------- the stage


@dataclass
class _Shard:
    name: str
    sources: list[str]
    key: str


def preprocess(
    cfg: Config, raw_dir: Path, out_dir: Path, workers: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Build (or resume) ``out_dir`` from ``raw_dir/{train,valid}``; returns the manifest.

    ``workers``: processes for decoding/cropping (None -> ``cfg.preprocess.workers``; 0 -> all
    cores; 1 -> in this process). Raises ``PreprocessError`` if no training or no validation
    image is usable.
    """
    p = cfg.preprocess
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    r, o = raw_dir.resolve(), out_dir.resolve()
    if r == o or r in o.parents or o in r.parents:  # stale-file cleanup must never reach raw data
        raise PreprocessError(f"output dir {out_dir} overlaps the raw dir {raw_dir}")
    train_names = images.list_images(raw_dir / "train")
    valid_names = images.list_images(raw_dir / "valid")
    if not train_names:
        raise PreprocessError(f"no training images in {raw_dir / 'train'} (run the fetch stage first)")
    if not valid_names:
        raise PreprocessError(f"no validation images in {raw_dir / 'valid'} (run the fetch stage first)")
    if p.valid_max_side and p.valid_max_side - p.valid_max_side % p.scale < MIN_VALID_LR_SIDE * p.scale:
        raise PreprocessError(
            f"preprocess.valid_max_side: {p.valid_max_side} is below the minimum validation side "
            f"{MIN_VALID_LR_SIDE * p.scale} (0 = whole images)"
        )
    n_workers = resolve_workers(p.workers if workers is None else workers)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # only a finished run has a manifest
    train_dir, hr_dir, lr_dir = out_dir / "train", out_dir / "valid" / "hr", out_dir / "valid" / "lr"

    # Digests first: they decide which finished work from an earlier run is still valid.
    rels = [f"train/{n}" for n in train_names] + [f"valid/{n}" for n in valid_names]
    with ThreadPoolExecutor(max_workers=n_workers) as ex:  # hashlib releases the GIL
        digests = dict(zip(rels, ex.map(lambda r: sha256_file(raw_dir / r), rels)))

    train_settings = {"version": FORMAT_VERSION, "seed": cfg.seed, "scale": p.scale,
                      "hr_crop": p.hr_crop, "crops_per_image": p.crops_per_image, "shard_size": p.shard_size}
    valid_settings = {"version": FORMAT_VERSION, "scale": p.scale, "valid_max_side": p.valid_max_side}

    old = read_json(out_dir / PROGRESS_NAME, {})
    if not isinstance(old, dict) or old.get("version") != FORMAT_VERSION:
        old = {}
    old_valid, old_shards = old.get("valid", {}), old.get("shards", {})

    # -- plan validation: one record per output stem
    valid_plan: list[tuple[str, str, str]] = []  # (stem, name, key)
    prog_valid: dict[str, dict[str, Any]] = {}
    dup_skipped: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    for name in valid_names:
        stem = Path(name).stem
        if stem in seen:
            dup_skipped.append({"file": f"valid/{name}",
                                "reason": f"same output name {stem}.png as valid/{seen[stem]}"})
            continue
        seen[stem] = name
        key = json_digest([valid_settings, name, digests[f"valid/{name}"]])
        rec = old_valid.get(stem)
        if rec and rec.get("key") == key and (
            "skipped" in rec or ((hr_dir / f"{stem}.png").is_file() and (lr_dir / f"{stem}.png").is_file())
        ):
            prog_valid[stem] = rec
        else:
            valid_plan.append((stem, name, key))

    # -- plan training shards: fixed groups of sorted files
    per = max(1, p.shard_size // p.crops_per_image)
    shards = []
    for k in range(0, len(train_names), per):
        group = train_names[k : k + per]
        key = json_digest([train_settings, [[n, digests[f"train/{n}"]] for n in group]])
        shards.append(_Shard(f"train-{k // per:05d}.tfrecord", group, key))
    prog_shards: dict[str, dict[str, Any]] = {}
    todo_shards = []
    for sh in shards:
        rec = old_shards.get(sh.name)
        if rec and rec.get("key") == sh.key and (rec.get("crops") == 0 or (train_dir / sh.name).is_file()):
            prog_shards[sh.name] = rec
        else:
            todo_shards.append(sh)

    # -- remove stale outputs (other config, other sources, half-written temp files)
    removed = _clean_dir(train_dir, {n for n, r in prog_shards.items() if r.get("crops")})
    keep_png = {f"{s}.png" for s, r in prog_valid.items() if "skipped" not in r}
    removed += _clean_dir(hr_dir, keep_png) + _clean_dir(lr_dir, keep_png)
    prog = {"version": FORMAT_VERSION, "shards": prog_shards, "valid": prog_valid}
    write_json_atomic(out_dir / PROGRESS_NAME, prog)
    if prog_shards or prog_valid or removed:
        log.info("resume: kept %d/%d shards and %d/%d validation images; removed %d stale files",
                 len(prog_shards), len(shards), len(prog_valid), len(seen), removed)

    n_jobs = len(valid_plan) + sum(len(sh.sources) for sh in todo_shards)
    n_proc = min(n_workers, n_jobs)
    pool_cm = _start_method_context().Pool(n_proc) if n_proc > 1 else contextlib.nullcontext()
    with pool_cm as pool:
        depth = 2 * n_proc + 2
        # -- validation first: cheap, and a set without validation images fails early
        jobs = [ValidJob(str(raw_dir / "valid" / name), name, p.scale, p.valid_max_side,
                         str(hr_dir / f"{stem}.png"), str(lr_dir / f"{stem}.png"))
                for stem, name, _ in valid_plan]
        bar = tqdm(total=len(jobs), desc="valid images", unit="img", disable=not progress or not jobs)
        for (stem, name, key), res in zip(valid_plan, _ordered_map(pool, prepare_valid, jobs, depth)):
            prog_valid[stem] = {"key": key, "source": f"valid/{name}", **res}
            write_json_atomic(out_dir / PROGRESS_NAME, prog)
            bar.update()
        bar.close()
        if not any("skipped" not in r for r in prog_valid.values()):
            raise PreprocessError(
                f"no usable validation image in {raw_dir / 'valid'}: "
                + _skip_summary([*dup_skipped, *_valid_skips(prog_valid)])
            )

        # -- training shards, written in order as the workers' results arrive
        jobs2 = [TrainJob(str(raw_dir / "train" / n), n, cfg.seed, p.scale, p.hr_crop, p.crops_per_image)
                 for sh in todo_shards for n in sh.sources]
        results = _ordered_map(pool, crop_image, jobs2, depth)
        if jobs2:  # slow import, while the workers already crop: not inside the progress bar
            import tensorflow  # noqa: F401
        bar = tqdm(total=len(jobs2), desc="train images", unit="img", disable=not progress or not jobs2)
        for sh in todo_shards:
            writer = _ShardWriter(train_dir / sh.name)
            used: dict[str, int] = {}
            skipped: list[dict[str, str]] = []
            for _ in sh.sources:
                r = next(results)
                if r.skipped:
                    skipped.append({"file": f"train/{r.name}", "reason": r.skipped})
                else:
                    writer.write(r)
                    used[r.name] = len(r.offsets)
                bar.update()
            prog_shards[sh.name] = {"key": sh.key, "crops": writer.close(), "images": used, "skipped": skipped}
            write_json_atomic(out_dir / PROGRESS_NAME, prog)
        bar.close()

    train_skips = [s for sh in shards for s in prog_shards[sh.name]["skipped"]]
    n_train_used = sum(len(prog_shards[sh.name]["images"]) for sh in shards)
    if n_train_used == 0:
        raise PreprocessError(f"no usable training image in {raw_dir / 'train'}: " + _skip_summary(train_skips))

    shard_list = [{"name": sh.name, "crops": prog_shards[sh.name]["crops"],
                   "sources": sorted(prog_shards[sh.name]["images"])}
                  for sh in shards if prog_shards[sh.name]["crops"]]
    valid_list = [{"name": s, "source": r["source"], "hr_shape": r["hr_shape"], "lr_shape": r["lr_shape"]}
                  for s, r in sorted(prog_valid.items()) if "skipped" not in r]
    skipped_all = sorted([*train_skips, *dup_skipped, *_valid_skips(prog_valid)], key=lambda s: s["file"])
    section = {k: v for k, v in p.model_dump().items() if k != "workers"}  # workers: no effect on data
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "config": {"seed": cfg.seed, "preprocess": section},
        "counts": {
            "train_files": len(train_names),
            "train_images": n_train_used,
            "train_crops": sum(s["crops"] for s in shard_list),
            "shards": len(shard_list),
            "valid_files": len(valid_names),
            "valid_images": len(valid_list),
            "skipped": len(skipped_all),
        },
        "sources": digests,
        "skipped": skipped_all,
        "shards": shard_list,
        "valid": valid_list,
    }
    manifest["digest"] = json_digest(manifest)  # the data hash training records as lineage
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return manifest


def _valid_skips(prog_valid: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    return [{"file": r["source"], "reason": r["skipped"]} for r in prog_valid.values() if "skipped" in r]


def _skip_summary(skips: list[dict[str, str]]) -> str:
    if not skips:
        return "nothing to use"
    head = "; ".join(f"{s['file']}: {s['reason']}" for s in skips[:3])
    more = f" (and {len(skips) - 3} more)" if len(skips) > 3 else ""
    return f"all {len(skips)} files were skipped: {head}{more}"
