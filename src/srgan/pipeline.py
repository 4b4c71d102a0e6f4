"""tf.data input pipeline: TFRecord crops -> augmented, aligned (LR, HR) float batches.

Stream order (per epoch ``e``): shard files in a seeded order, read interleaved (8 at a time,
one record each), then permuted within windows of ``window`` records (the whole epoch when it is
smaller, as for the sample set). Records are then cut into batches; global batch ``g`` is the one
a training step ``g`` (counted from the start of the phase) trains on.

Augmentation (krasserm/super-resolution style), from each stored crop:
random LR offset (oy, ox) -> LR patch ``lr[oy:oy+p/s, ox:ox+p/s]`` and HR patch
``hr[oy*s:oy*s+p, ox*s:ox*s+p]`` (HR offset on the scale grid, so the pair stays aligned), then a
random horizontal flip and a random ``rot90`` (k = 0..3) applied identically to both: the 8
symmetries of the square. The draws of global batch ``g`` are one ``(batch_size, 4)`` uniform
tensor from the seed and ``g``, one row per record, and the whole batch is cut, flipped and
rotated by one gather per resolution (``symmetric_patches``): a few ops per batch, not per crop,
so the CPU that trains loses next to nothing to the feed.

Determinism: all randomness is stateless (``tf.random.stateless_*``) and derived from ``seed``,
the epoch and the batch number, so the output does not depend on the TF global seed, on
parallelism or on how far earlier iterators went. Resume: ``start_step=n`` yields exactly the
batches an uninterrupted iterator yields after ``n`` batches; whole epochs are skipped without
reading them, within the epoch only serialized records are read (no decoding/augmenting).

Sharding (multi-worker training): with ``num_shards=k`` the stream is the same and every global
batch of ``batch_size`` records is cut into ``k`` consecutive blocks; shard ``i`` keeps block ``i``
(by the record's position in the stream, before decoding) and row block ``i`` of the batch's draws,
so the shards never share a crop, their batches concatenate to the one-process batch, and resume
by step stays exact. tf.distribute's own auto-sharding is switched off: the sharding is done here.

Memory (``cache_bytes``): when the shards fit, every crop is decoded once into two uint8 arrays
and the stream runs over their row numbers instead of the serialized records: the epoch's whole
order is computed at once (the same interleave, ``interleave_order``, and the same window
permutations), and a batch gathers straight from the arrays. The batches are the same as when
streaming, value for value; what goes is reading and parsing every record on the CPU that trains.
Every crop of a training set has one size (preprocess makes them so).
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
MB = 2**20  # train.cache_mb is in MiB
ALIGN = 64  # bytes: TensorFlow's buffer alignment (Eigen's); a buffer aligned so is shared, not copied
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
    lr_patch, part = hr_patch // scale, batch_size // num_shards
    window = max(1, min(window, n_records))
    start_epoch, within = divmod(start_step * batch_size, n_records)
    epochs = tf.data.Dataset.counter(start_epoch) if repeat else tf.data.Dataset.range(start_epoch, 1)
    hr_shape, lr_shape = crop_shapes(files[int(np.flatnonzero(counts)[0])])
    if hr_shape[:2] != (lr_shape[0] * scale, lr_shape[1] * scale):
        raise ValueError(f"{shard_dir}: stored HR/LR crops are not at scale {scale} (HR {hr_shape}, LR {lr_shape})")
    if min(lr_shape[:2]) < lr_patch:
        raise ValueError(f"{shard_dir}: stored crops are smaller than hr_patch {hr_patch} (HR {hr_shape})")
    crops = load_crops(files, hr_shape, lr_shape, counts) if fits_in_memory(files, cache_bytes) else None
    if crops is not None:
        log.info("training crops decoded into memory: %d (%.0f MB)", n_records, sum(a.nbytes for a in crops) / MB)
        ds = epochs.map(_epoch_rows(counts, seed, window)).unbatch()
        hr_all, lr_all = (resident(a) for a in crops)
        del crops  # the variables now own these arrays (shared, not copied)

        def pixels(rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            return lr_all, hr_all, rows
    else:
        if cache_bytes > 0:
            log.info("training crops streamed from %s: their shards take more than train.cache_mb (%.0f MB)",
                     shard_dir, cache_bytes / MB)
        ds = epochs.flat_map(_epoch_records(files, seed, window))

        def pixels(records: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            f = tf.io.parse_example(records, _SPEC)
            n = tf.shape(records)[0]
            # one decode per batch; preprocess writes crops of one size, another size fails this reshape
            hr = tf.reshape(tf.io.decode_raw(f["hr"], tf.uint8), [n, *hr_shape])
            lr = tf.reshape(tf.io.decode_raw(f["lr"], tf.uint8), [n, *lr_shape])
            return lr, hr, tf.range(n, dtype=tf.int64)
    ds = ds.skip(within)  # before decoding: cheap
    if num_shards > 1:
        def in_shard(position: tf.Tensor, item: tf.Tensor) -> tf.Tensor:
            # position 0 is the first record of global batch start_step, so the blocks stay aligned
            return (position % batch_size) // part == shard_index

        def drop_position(position: tf.Tensor, item: tf.Tensor) -> tf.Tensor:
            return item

        ds = ds.enumerate().filter(in_shard).map(drop_position)
    lh, lw = lr_shape[:2]

    def augment(step: tf.Tensor, items: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        lr_src, hr_src, rows = pixels(items)
        # the global batch's draws, one row per record; this shard takes its block
        u = tf.random.stateless_uniform([batch_size, 4], _seed(seed, _STREAM_AUG, step))
        u = u[shard_index * part : (shard_index + 1) * part]
        oy = tf.minimum(tf.cast(u[:, 0] * (lh - lr_patch + 1), tf.int32), lh - lr_patch)
        ox = tf.minimum(tf.cast(u[:, 1] * (lw - lr_patch + 1), tf.int32), lw - lr_patch)
        flip, k = u[:, 2] < 0.5, tf.minimum(tf.cast(u[:, 3] * 4, tf.int32), 3)
        lr = symmetric_patches(lr_src, rows, oy, ox, flip, k, lr_patch)
        hr = symmetric_patches(hr_src, rows, oy * scale, ox * scale, flip, k, hr_patch)
        return tf.cast(lr, tf.float32) / 255.0, tf.cast(hr, tf.float32) / 255.0

    ds = ds.batch(part, drop_remainder=True).enumerate(start=start_step)
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # sharded here (by record position); tf.distribute must not shard again (by file or by element)
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def _epoch_records(files: list[Path], seed: int, window: int) -> Any:
    """Epoch ``e`` -> its serialized records: files in a seeded order, read interleaved, permuted
    within windows."""
    names, n_files = tf.constant([str(f) for f in files]), len(files)
    cycle = min(CYCLE_LENGTH, n_files)

    def epoch_records(e: tf.Tensor) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(tf.gather(names, _file_order(seed, e, n_files)))
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=cycle, block_length=1, num_parallel_calls=cycle,
                           deterministic=True)

        def permute(w: tf.Tensor, recs: tf.Tensor) -> tf.Tensor:
            return tf.gather(recs, _window_order(seed, e, w, tf.shape(recs)))

        return ds.batch(window).enumerate().map(permute).unbatch()

    return epoch_records


def _epoch_rows(counts: list[int], seed: int, window: int) -> Any:
    """Epoch ``e`` -> the row numbers (into the files' crops, in file order) of the records that
    ``_epoch_records`` reads in that epoch, as one tensor: the interleave in ``interleave_order``,
    the window permutations unrolled (the epoch's windows are known in advance)."""
    n_files, n = len(counts), sum(counts)
    first = np.cumsum([0, *counts[:-1]])

    def rows_of(order: np.ndarray) -> np.ndarray:
        return interleave_order([(first[f], first[f] + counts[f]) for f in order], min(CYCLE_LENGTH, n_files))

    def epoch_rows(e: tf.Tensor) -> tf.Tensor:
        rows = tf.ensure_shape(tf.numpy_function(rows_of, [_file_order(seed, e, n_files)], tf.int64), [n])
        return tf.concat([tf.gather(rows[w:w + window], _window_order(seed, e, w // window, [min(window, n - w)]))
                          for w in range(0, n, window)], 0)

    return epoch_rows


def _file_order(seed: int, epoch: tf.Tensor, n_files: int) -> tf.Tensor:
    return tf.argsort(tf.random.stateless_uniform([n_files], _seed(seed, _STREAM_FILES, epoch)))


def _window_order(seed: int, epoch: tf.Tensor, w: Any, shape: Any) -> tf.Tensor:
    return tf.argsort(tf.random.stateless_uniform(shape, _seed(seed, _STREAM_WINDOW, epoch, w)))


def interleave_order(ranges: list[tuple[int, int]], cycle: int) -> np.ndarray:
    """The order in which ``Dataset.interleave(cycle_length=cycle, block_length=1)`` yields the
    elements of inputs that are ``range(a, b)`` each: ``cycle`` inputs open at once, one element
    from each in turn; an input found exhausted frees its slot, which the next input takes when the
    turn comes round again (TensorFlow's InterleaveDataset, sequential; the parallel one with
    ``deterministic=True`` yields the same)."""
    slots: list[list[int] | None] = [None] * cycle
    out, nxt, idx, n_open = [], 0, 0, 0
    while nxt < len(ranges) or n_open:
        slot = slots[idx]
        if slot is not None:
            if slot[0] < slot[1]:
                out.append(slot[0])
                slot[0] += 1
            else:
                slots[idx], n_open = None, n_open - 1
            idx = (idx + 1) % cycle
        elif nxt < len(ranges):
            slots[idx], nxt, n_open = list(ranges[nxt]), nxt + 1, n_open + 1
        else:
            idx = (idx + 1) % cycle
    return np.asarray(out, np.int64)


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


def crop_shapes(file: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(HR shape, LR shape) of the first crop in a shard file."""
    for record in tf.data.TFRecordDataset(str(file)).take(1):
        f = tf.io.parse_single_example(record, _SPEC)
        return tuple(int(v) for v in f["hr_shape"]), tuple(int(v) for v in f["lr_shape"])
    raise FileNotFoundError(f"{file} holds no records")


def symmetry_offsets(p: int, width: int) -> np.ndarray:
    """(8, p, p) int32: for symmetry ``2 * k + flip`` the offset ``a * width + b`` of the source
    pixel (a, b) of output pixel (i, j) of ``rot90(flip?(A), k)``, A a p x p window of rows
    ``width`` wide. rot90 (NumPy's and tf.image's, counter-clockwise) reads A[i, j], A[j, q-i],
    A[q-i, q-j] or A[q-j, i] for k = 0..3 (q = p - 1); the horizontal flip mirrors the column."""
    q, i, j = p - 1, *np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    out = []
    for a, b in ((i, j), (j, q - i), (q - i, q - j), (q - j, i)):
        out += [a * width + b, a * width + q - b]
    return np.stack(out).astype(np.int32)


def symmetric_patches(crops: tf.Tensor, rows: tf.Tensor, oy: tf.Tensor, ox: tf.Tensor, flip: tf.Tensor,
                      k: tf.Tensor, p: int) -> tf.Tensor:
    """``rot90(flip?(crops[row, oy:oy+p, ox:ox+p]), k)`` for a batch, as one gather: every output
    pixel's source is known before any pixel is read (``symmetry_offsets``)."""
    n, h, w, c = crops.shape
    dtype = tf.int32 if n is not None and n * h * w < 2**31 else tf.int64  # int32 indices gather faster
    table = tf.constant(symmetry_offsets(p, w), dtype)
    corner = (tf.cast(rows, dtype) * h + tf.cast(oy, dtype)) * w + tf.cast(ox, dtype)
    index = tf.gather(table, 2 * k + tf.cast(flip, tf.int32)) + corner[:, None, None]
    return tf.gather(tf.reshape(crops, [-1, c]), index)


def fits_in_memory(files: list[Path], budget: int) -> bool:
    """Whether the shard ``files`` take at most ``budget`` bytes (their crops decoded take about as much)."""
    return budget > 0 and sum(f.stat().st_size for f in files) <= budget


def resident(a: np.ndarray) -> tf.Variable | tf.Tensor:
    """``a`` in TensorFlow memory for a dataset's map to read without copying it.

    A non-trainable CPU variable: a map reads it by handle, whereas tf.data copies a captured
    tensor. Measured on 2.2 GB of crops, the whole process (TensorFlow itself ~0.6 GB): 7.5 GB peak
    with a captured ``tf.constant``, 2.95 GB with this variable made from ``load_crops``' aligned
    arrays (shared through DLPack: converting NumPy takes a transient second copy). Under a
    ``tf.distribute`` scope a variable would be mirrored on every device, so there it is a tensor.
    The variable aliases ``a``: writes to ``a`` afterwards show through.
    """
    if tf.distribute.has_strategy():
        return tf.constant(a)
    shared = a.ctypes.data % ALIGN == 0 and a.flags.c_contiguous
    with tf.device("/cpu:0"):
        return tf.Variable(tf.experimental.dlpack.from_dlpack(a.__dlpack__()) if shared else a,
                           trainable=False, name="crops")


def aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array whose buffer starts on an ALIGN-byte boundary."""
    n = int(np.prod(shape))
    raw = np.empty(n + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n].reshape(shape)


def load_crops(files: list[Path], hr_shape: tuple[int, ...], lr_shape: tuple[int, ...],
               counts: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every crop of ``files`` decoded into two uint8 arrays, HR (N, *hr_shape) and LR (N, *lr_shape),
    rows in file order. ``counts``: crops per file (``file_counts``), so each array is allocated
    once and filled in place: peak memory stays near the arrays' own size (a list of crops then
    stacked would take twice that). Raises ValueError naming the file if a crop has another shape
    or a file holds another number of crops."""
    counts = file_counts(files) if counts is None else counts
    n = sum(counts)
    hrs, lrs = aligned_empty((n, *hr_shape)), aligned_empty((n, *lr_shape))
    row = 0
    for f, expected in zip(files, counts, strict=True):
        got = 0  # reads at most one crop more than listed: enough to tell a stale count
        records = tf.data.TFRecordDataset(str(f)).take(expected + 1)
        for hr, lr in records.map(_decode, num_parallel_calls=tf.data.AUTOTUNE):
            if hr.shape != hr_shape or lr.shape != lr_shape:
                raise ValueError(f"{f}: a crop of shape {tuple(hr.shape)} among crops of {hr_shape}; "
                                 "the shards must hold crops of one size (re-run preprocess)")
            if got < expected:
                hrs[row + got], lrs[row + got] = hr.numpy(), lr.numpy()
            got += 1
        if got != expected:
            raise ValueError(f"{f}: holds {'more' if got > expected else got} crops, not the {expected} "
                             "its manifest lists (re-run preprocess)")
        row += got
    return hrs, lrs
