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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from . import dataio

CYCLE_LENGTH = 8  # shard files read concurrently (mixes crops of different source images)
_EPOCH_STRIDE = 2**32  # global record index = epoch * stride + position in epoch
# independent random streams derived from the one seed
_STREAM_FILES, _STREAM_WINDOW, _STREAM_AUG = 1, 2, 3


def count_records(shard_dir: Path) -> int:
    """Crops in ``shard_dir``: from manifest.json when it matches the files, else by reading them."""
    shard_dir = Path(shard_dir)
    files = sorted(shard_dir.glob("*.tfrecord"))
    shards = dataio.read_manifest(shard_dir.parent).get("shards")
    if isinstance(shards, list) and {s.get("name") for s in shards} == {f.name for f in files}:
        return int(sum(s["crops"] for s in shards))
    ds = tf.data.TFRecordDataset([str(f) for f in files])
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


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
) -> tf.data.Dataset:
    """Batches ``(lr, hr)``: float32 in [0, 1], shapes (B, p/s, p/s, 3) and (B, p, p, 3).

    ``repeat=False`` gives one epoch (last partial batch dropped). ``start_step`` skips that many
    batches (resume). ``window`` records are shuffled together (memory: ``window`` serialized crops).
    ``num_shards``/``shard_index``: this shard's ``B / num_shards`` records of every global batch of
    ``B = batch_size`` (see the module docstring).
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
    n_records = count_records(shard_dir)
    if n_records == 0:
        raise FileNotFoundError(f"the shards in {shard_dir} hold no records")
    lr_patch = hr_patch // scale
    names = tf.constant([str(f) for f in files])
    n_files = len(files)
    window = max(1, min(window, n_records))

    def epoch_records(e: tf.Tensor) -> tf.data.Dataset:
        order = tf.argsort(tf.random.stateless_uniform([n_files], _seed(seed, _STREAM_FILES, e)))
        ds = tf.data.Dataset.from_tensor_slices(tf.gather(names, order))
        ds = ds.interleave(
            tf.data.TFRecordDataset, cycle_length=min(CYCLE_LENGTH, n_files), block_length=1,
            num_parallel_calls=min(CYCLE_LENGTH, n_files), deterministic=True,
        )

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

    spec = {
        "hr": tf.io.FixedLenFeature([], tf.string),
        "lr": tf.io.FixedLenFeature([], tf.string),
        "hr_shape": tf.io.FixedLenFeature([3], tf.int64),
        "lr_shape": tf.io.FixedLenFeature([3], tf.int64),
    }

    def parse_augment(index: tf.Tensor, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        f = tf.io.parse_single_example(record, spec)
        hr = tf.reshape(tf.io.decode_raw(f["hr"], tf.uint8), f["hr_shape"])
        lr = tf.reshape(tf.io.decode_raw(f["lr"], tf.uint8), f["lr_shape"])
        checks = [
            tf.debugging.assert_equal(f["hr_shape"][:2], f["lr_shape"][:2] * scale,
                                      message=f"stored HR/LR crops are not at scale {scale}"),
            tf.debugging.assert_greater_equal(f["lr_shape"][:2], tf.constant(lr_patch, tf.int64),
                                              message=f"stored crops are smaller than hr_patch {hr_patch}"),
        ]
        s = tf.random.experimental.stateless_split(_seed(seed, _STREAM_AUG, index), 4)
        with tf.control_dependencies(checks):
            lh, lw = tf.shape(lr)[0], tf.shape(lr)[1]
        oy = tf.random.stateless_uniform([], s[0], 0, lh - lr_patch + 1, tf.int32)
        ox = tf.random.stateless_uniform([], s[1], 0, lw - lr_patch + 1, tf.int32)
        lr = lr[oy : oy + lr_patch, ox : ox + lr_patch]
        hr = hr[oy * scale : oy * scale + hr_patch, ox * scale : ox * scale + hr_patch]
        flip = tf.random.stateless_uniform([], s[2]) < 0.5
        k = tf.random.stateless_uniform([], s[3], 0, 4, tf.int32)
        lr = tf.image.rot90(tf.cond(flip, lambda: tf.reverse(lr, [1]), lambda: lr), k)
        hr = tf.image.rot90(tf.cond(flip, lambda: tf.reverse(hr, [1]), lambda: hr), k)
        lr = tf.ensure_shape(tf.cast(lr, tf.float32) / 255.0, [lr_patch, lr_patch, 3])
        hr = tf.ensure_shape(tf.cast(hr, tf.float32) / 255.0, [hr_patch, hr_patch, 3])
        return lr, hr

    ds = ds.map(parse_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(part, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # sharded here (by record position); tf.distribute must not shard again (by file or by element)
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)
