"""tf.data input pipeline: TFRecord crops -> augmented, aligned (LR, HR) float batches.

Stream order (per epoch ``e``): shard files in a seeded order, read interleaved (8 at a time,
one record each), then permuted within windows of ``window`` records (the whole epoch when it is
smaller, as for the sample set). Every record gets a global index ``e * 2**32 + i``.

Augmentation (krasserm/super-resolution style), from each stored crop:
random LR offset (oy, ox) -> LR patch ``lr[oy:oy+p/s, ox:ox+p/s]`` and HR patch
``hr[oy*s:oy*s+p, ox*s:ox*s+p]`` (HR offset on the scale grid, so the pair stays aligned), then a
random horizontal flip and a random ``rot90`` (k = 0..3) applied identically to both: the 8
symmetries of the square.

Determinism: all randomness is stateless (``tf.random.stateless_*``) and derived from ``seed``,
the epoch and the record's global index, so the output does not depend on the TF global seed,
on parallelism or on how far earlier iterators went. Resume: ``start_step=n`` yields exactly the
batches an uninterrupted iterator yields after ``n`` batches; whole epochs are skipped without
reading them, within the epoch only serialized records are read (no decoding/augmenting).

Sharding (multi-worker training): with ``num_shards=k`` the stream is the same and every global
batch of ``batch_size`` records is cut into ``k`` consecutive blocks; shard ``i`` keeps block ``i``
(by the record's position in the stream, before decoding), so the shards never share a crop, their
batches concatenate to the one-process batch, and resume by step stays exact. tf.distribute's own
auto-sharding is switched off: the sharding is done here.

Memory (``cache_bytes``): when the shards fit, every crop is decoded once into two uint8 arrays
and the stream above runs over their row numbers instead of the serialized records (a range per
file, interleaved and permuted alike). Each batch is then one gather per resolution: the patch
offsets, flips and rotations (drawn from the same per-record seeds) are folded into the gather
indices (``symmetric_patches``). The batches are the same as when streaming, value for value; what
goes is reading, parsing and cutting each record on the CPU that trains.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from . import dataio

log = logging.getLogger(__name__)

CYCLE_LENGTH = 8  # shard files read concurrently (mixes crops of different source images)
_EPOCH_STRIDE = 2**32  # global record index = epoch * stride + position in epoch
# independent random streams derived from the one seed
_STREAM_FILES, _STREAM_WINDOW, _STREAM_AUG = 1, 2, 3


def count_records(shard_dir: Path) -> int:
    """Crops in ``shard_dir``: from manifest.json when it matches the files, else by reading them."""
    return sum(file_counts(sorted(Path(shard_dir).glob("*.tfrecord"))))


def file_counts(files: list[Path]) -> list[int]:
    """Crops in each shard file: from the manifest beside their folder when it lists exactly these
    files, else by reading them."""
    if not files:
        return []
    shards = dataio.read_manifest(files[0].parent.parent).get("shards")
    if isinstance(shards, list) and {s.get("name") for s in shards} == {f.name for f in files}:
        crops = {s["name"]: int(s["crops"]) for s in shards}
        return [crops[f.name] for f in files]
    return [int(tf.data.TFRecordDataset(str(f)).reduce(np.int64(0), lambda n, _: n + 1)) for f in files]


def _seed(seed: int, stream: int, *data: tf.Tensor) -> tf.Tensor:
    s = tf.constant([seed, stream], tf.int64)
    for d in data:
        s = tf.random.experimental.stateless_fold_in(s, tf.cast(d, tf.int64))
    return s


def train_dataset(
    shard_dir: Path,
    batch_size: int,
    hr_patch: int,
    scale: int,
    seed: int,
    repeat: bool = True,
    start_step: int = 0,
    window: int = 512,
    num_shards: int = 1,
    shard_index: int = 0,
    cache_bytes: int = 0,
) -> tf.data.Dataset:
    """Batches ``(lr, hr)``: float32 in [0, 1], shapes (B, p/s, p/s, 3) and (B, p, p, 3).

    ``repeat=False`` gives one epoch (last partial batch dropped). ``start_step`` skips that many
    batches (resume). ``window`` records are shuffled together (memory: ``window`` serialized crops).
    ``num_shards``/``shard_index``: this shard's ``B / num_shards`` records of every global batch of
    ``B = batch_size`` (see the module docstring). ``cache_bytes``: decode every crop once into
    memory when the shards take at most this many bytes (the same batches, see "Memory").
    """
    shard_dir = Path(shard_dir)
    files = sorted(shard_dir.glob("*.tfrecord"))
    if not files:
        raise FileNotFoundError(f"no *.tfrecord shards in {shard_dir}: run the preprocess stage first")
    if hr_patch % scale:
        raise ValueError(f"hr_patch {hr_patch} is not a multiple of scale {scale}")
    if num_shards < 1 or batch_size % num_shards or not 0 <= shard_index < num_shards:
        raise ValueError(f"batch_size {batch_size} cannot be split into {num_shards} shards "
                         f"(shard {shard_index}): the global batch must split evenly across the workers")
    pre = dataio.read_manifest(shard_dir.parent).get("config", {}).get("preprocess", {})
    if pre and (pre.get("scale") != scale or pre.get("hr_crop", hr_patch) < hr_patch):
        raise ValueError(
            f"{shard_dir}: shards were made with scale {pre.get('scale')} and hr_crop {pre.get('hr_crop')}; "
            f"cannot take hr_patch {hr_patch} at scale {scale} (re-run preprocess)"
        )
    counts = file_counts(files)
    n_records = sum(counts)
    if n_records == 0:
        raise FileNotFoundError(f"the shards in {shard_dir} hold no records")
    lr_patch = hr_patch // scale
    n_files = len(files)
    window = max(1, min(window, n_records))
    crops = load_crops(files, scale, lr_patch, cache_bytes) if cache_bytes > 0 else None
    if crops is not None:
        log.info("training crops decoded into memory: %d (%.0f MB)", n_records, sum(a.nbytes for a in crops) / 2**20)
    elif cache_bytes > 0:
        log.info("training crops streamed from %s: more than the %.0f MB of train.cache_mb, or of mixed sizes",
                 shard_dir, cache_bytes / 2**20)
    if crops is None:  # each file's serialized records
        names = tf.constant([str(f) for f in files])

        def file_records(f: tf.Tensor) -> tf.data.Dataset:
            return tf.data.TFRecordDataset(names[f])
        parallel: int | None = min(CYCLE_LENGTH, n_files)
    else:  # each file's rows of the in-memory arrays: the same interleave, over row numbers
        first = tf.constant(np.cumsum([0, *counts[:-1]]), tf.int64)
        sizes = tf.constant(counts, tf.int64)

        def file_records(f: tf.Tensor) -> tf.data.Dataset:
            return tf.data.Dataset.range(first[f], first[f] + sizes[f])
        parallel = None  # a range costs nothing to read

    def epoch_records(e: tf.Tensor) -> tf.data.Dataset:
        order = tf.argsort(tf.random.stateless_uniform([n_files], _seed(seed, _STREAM_FILES, e)))
        ds = tf.data.Dataset.from_tensor_slices(order)
        ds = ds.interleave(file_records, cycle_length=min(CYCLE_LENGTH, n_files), block_length=1,
                           **({"num_parallel_calls": parallel, "deterministic": True} if parallel else {}))

        def permute(w: tf.Tensor, recs: tf.Tensor) -> tf.Tensor:
            keys = tf.random.stateless_uniform(tf.shape(recs), _seed(seed, _STREAM_WINDOW, e, w))
            return tf.gather(recs, tf.argsort(keys))

        ds = ds.batch(window).enumerate().map(permute).unbatch()
        return ds.enumerate().map(lambda i, r: (e * _EPOCH_STRIDE + i, r))

    start_epoch, within = divmod(start_step * batch_size, n_records)
    epochs = tf.data.Dataset.counter(start_epoch) if repeat else tf.data.Dataset.range(start_epoch, 1)
    ds = epochs.flat_map(epoch_records).skip(within)  # skip before decoding: cheap
    part = batch_size // num_shards
    if num_shards > 1:
        def in_shard(position: tf.Tensor, item: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
            # position 0 is the first record of global batch start_step, so the blocks stay aligned
            return (position % batch_size) // part == shard_index

        def drop_position(position: tf.Tensor, item: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
            return item

        ds = ds.enumerate().filter(in_shard).map(drop_position)

    def draw(index: tf.Tensor, lr_hw: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """The record's augmentation: LR offset (oy, ox), horizontal flip, rot90 count k."""
        s = tf.random.experimental.stateless_split(_seed(seed, _STREAM_AUG, index), 4)
        oy = tf.random.stateless_uniform([], s[0], 0, lr_hw[0] - lr_patch + 1, tf.int32)
        ox = tf.random.stateless_uniform([], s[1], 0, lr_hw[1] - lr_patch + 1, tf.int32)
        return oy, ox, tf.random.stateless_uniform([], s[2]) < 0.5, tf.random.stateless_uniform([], s[3], 0, 4, tf.int32)

    if crops is None:
        ds = ds.map(_decode_augment(hr_patch, scale, draw), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(part, drop_remainder=True)
    else:
        hr_all, lr_all = (tf.constant(a) for a in crops)  # captured by the map: fed, not copied per batch
        lr_hw = tf.constant(crops[1].shape[1:3], tf.int32)

        def row_draw(index: tf.Tensor, row: tf.Tensor) -> tuple[tf.Tensor, ...]:
            return (row, *draw(index, lr_hw))

        def gather(rows: tf.Tensor, oy: tf.Tensor, ox: tf.Tensor, flip: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            lr = symmetric_patches(lr_all, rows, oy, ox, flip, k, lr_patch)
            hr = symmetric_patches(hr_all, rows, oy * scale, ox * scale, flip, k, hr_patch)
            return tf.cast(lr, tf.float32) / 255.0, tf.cast(hr, tf.float32) / 255.0

        ds = ds.map(row_draw, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(part, drop_remainder=True).map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # sharded here (by record position); tf.distribute must not shard again (by file or by element)
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


_SPEC = {
    "hr": tf.io.FixedLenFeature([], tf.string),
    "lr": tf.io.FixedLenFeature([], tf.string),
    "hr_shape": tf.io.FixedLenFeature([3], tf.int64),
    "lr_shape": tf.io.FixedLenFeature([3], tf.int64),
}


def _decode(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    f = tf.io.parse_single_example(record, _SPEC)
    return (tf.reshape(tf.io.decode_raw(f["hr"], tf.uint8), f["hr_shape"]),
            tf.reshape(tf.io.decode_raw(f["lr"], tf.uint8), f["lr_shape"]))


def _decode_augment(hr_patch: int, scale: int, draw: Any) -> Any:
    """Per record: decode, check, cut the aligned patches, flip and rotate them (streamed path)."""
    lr_patch = hr_patch // scale

    def decode_augment(index: tf.Tensor, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        hr, lr = _decode(record)
        checks = [
            tf.debugging.assert_equal(tf.shape(hr)[:2], tf.shape(lr)[:2] * scale,
                                      message=f"stored HR/LR crops are not at scale {scale}"),
            tf.debugging.assert_greater_equal(tf.shape(lr)[:2], lr_patch,
                                              message=f"stored crops are smaller than hr_patch {hr_patch}"),
        ]
        with tf.control_dependencies(checks):
            oy, ox, flip, k = draw(index, tf.shape(lr)[:2])
        lr = lr[oy : oy + lr_patch, ox : ox + lr_patch]
        hr = hr[oy * scale : oy * scale + hr_patch, ox * scale : ox * scale + hr_patch]
        lr = tf.image.rot90(tf.cond(flip, lambda: tf.reverse(lr, [1]), lambda: lr), k)
        hr = tf.image.rot90(tf.cond(flip, lambda: tf.reverse(hr, [1]), lambda: hr), k)
        lr = tf.ensure_shape(tf.cast(lr, tf.float32) / 255.0, [lr_patch, lr_patch, 3])
        hr = tf.ensure_shape(tf.cast(hr, tf.float32) / 255.0, [hr_patch, hr_patch, 3])
        return lr, hr

    return decode_augment


def symmetric_patches(crops: tf.Tensor, rows: tf.Tensor, oy: tf.Tensor, ox: tf.Tensor, flip: tf.Tensor,
                      k: tf.Tensor, p: int) -> tf.Tensor:
    """``rot90(flip?(crops[row, oy:oy+p, ox:ox+p]), k)`` for a batch, as one gather.

    Output pixel (i, j) of ``rot90(A, k)`` is A[i, j], A[j, q-i], A[q-i, q-j] or A[q-j, i] for
    k = 0..3 (q = p - 1, NumPy's and tf.image's counter-clockwise rot90), and the flip mirrors the
    column; so every output pixel's source is known before any pixel is read.
    """
    q, k = p - 1, k[:, None, None]
    i, j = tf.range(p)[:, None], tf.range(p)[None, :]
    a = tf.where(k == 0, i, tf.where(k == 1, j, tf.where(k == 2, q - i, q - j)))
    b = tf.where(k == 0, j, tf.where(k == 1, q - i, tf.where(k == 2, q - j, i)))
    b = tf.where(flip[:, None, None], q - b, b)
    h, w = tf.shape(crops, tf.int64)[1], tf.shape(crops, tf.int64)[2]
    y = tf.cast(oy[:, None, None] + a, tf.int64)
    x = tf.cast(ox[:, None, None] + b, tf.int64)
    flat = (rows[:, None, None] * h + y) * w + x
    return tf.gather(tf.reshape(crops, [-1, crops.shape[-1]]), flat)


def fits_in_memory(files: list[Path], budget: int) -> bool:
    """Whether the shard ``files`` take at most ``budget`` bytes (their crops decoded take about as much)."""
    return budget > 0 and sum(f.stat().st_size for f in files) <= budget


def load_crops(files: list[Path], scale: int, lr_patch: int, budget: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Every crop of ``files`` decoded into two uint8 arrays, HR (N, H, W, 3) and LR, rows in file
    order; None when the files take more than ``budget`` bytes or the crops differ in size (the
    stream then decodes them per batch). Raises ValueError for crops that cannot be trained on."""
    if not fits_in_memory(files, budget):
        return None
    hrs, lrs = [], []
    for hr, lr in tf.data.TFRecordDataset([str(f) for f in files]).map(_decode, num_parallel_calls=tf.data.AUTOTUNE):
        if hrs and (hr.shape != hrs[0].shape or lr.shape != lrs[0].shape):
            return None
        hrs.append(hr.numpy())
        lrs.append(lr.numpy())
    hr_a, lr_a = np.stack(hrs), np.stack(lrs)
    if hr_a.shape[1:3] != (lr_a.shape[1] * scale, lr_a.shape[2] * scale):
        raise ValueError(f"stored HR/LR crops are not at scale {scale}: {hr_a.shape[1:]} and {lr_a.shape[1:]}")
    if min(lr_a.shape[1:3]) < lr_patch:
        raise ValueError(f"stored crops are smaller than hr_patch {lr_patch * scale}: LR {lr_a.shape[1:3]}")
    return hr_a, lr_a
