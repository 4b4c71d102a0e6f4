"""srgan.pipeline: batches, aligned augmentation, determinism, resume skip-ahead; validation pairs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srgan import config, images, pipeline
from srgan.preprocess import preprocess

SCALE, CROP, PATCH, BATCH = 4, 64, 48, 4


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipe")
    for sub in ("train", "valid"):
        (root / "raw" / sub).mkdir(parents=True)
    for i in range(3):  # 3 images x 4 crops = 12 records in 2 shards
        Image.fromarray(texture(128, 128 + 8 * i, seed=i)).save(root / "raw" / "train" / f"t{i}.png")
    for i in range(3):
        Image.fromarray(texture(40 + 4 * i, 36, seed=10 + i)).save(root / "raw" / "valid" / f"v{i}.png")
    cfg = config.from_dict({"preprocess": {"scale": SCALE, "hr_crop": CROP, "crops_per_image": 4,
                                           "shard_size": 8}, "train": {"hr_patch": PATCH}})
    m = preprocess(cfg, root / "raw", root / "processed", workers=1, progress=False)
    assert m["counts"]["train_crops"] == 12 and m["counts"]["shards"] == 2
    return root / "processed"


def batches(ds, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(lr.numpy(), hr.numpy()) for lr, hr in ds.take(n)]


def test_shapes_dtypes_range(processed):
    ds = pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=1)
    lr_spec, hr_spec = ds.element_spec
    assert lr_spec.shape == (BATCH, PATCH // SCALE, PATCH // SCALE, 3) and lr_spec.dtype.name == "float32"
    assert hr_spec.shape == (BATCH, PATCH, PATCH, 3) and hr_spec.dtype.name == "float32"
    for lr, hr in batches(ds, 5):  # 20 records > 12: runs past the end of the epoch (repeat)
        assert lr.shape == (BATCH, 12, 12, 3) and hr.shape == (BATCH, 48, 48, 3)
        assert 0.0 <= lr.min() and lr.max() <= 1.0 and 0.0 <= hr.min() and hr.max() <= 1.0


def test_augmented_pairs_stay_aligned(processed):
    ds = pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=3)
    for lr, hr in batches(ds, 3):
        for i in range(BATCH):
            hr8 = np.rint(hr[i] * 255).astype(np.uint8)
            lr8 = np.rint(lr[i] * 255).astype(np.uint8)
            d = np.abs(images.downscale(hr8, SCALE).astype(int) - lr8)[2:-2, 2:-2]  # away from patch borders
            assert d.max() <= 1
            # a misaligned pair (LR shifted by one px) would be far off: the check has teeth
            wrong = np.abs(images.downscale(hr8, SCALE).astype(int)[2:-3, 2:-2] - lr8[3:-2, 2:-2])
            assert wrong.mean() > 3 * max(d.mean(), 0.5)


def test_augmentation_covers_flips_and_rotations(processed):
    ds = pipeline.train_dataset(processed / "train", 12, CROP, SCALE, seed=5, repeat=False)
    (lr, hr), = batches(ds, 1)  # patch = whole crop: only the symmetry varies
    import tensorflow as tf

    stored = {}
    for path in sorted((processed / "train").glob("*.tfrecord")):
        for rec in tf.data.TFRecordDataset(str(path)):
            f = tf.train.Example.FromString(rec.numpy()).features.feature
            hrs = np.frombuffer(f["hr"].bytes_list.value[0], np.uint8).reshape(CROP, CROP, 3)
            stored[hrs.tobytes()] = "identity"
            for k in range(4):
                for flip in (False, True):
                    v = np.rot90(hrs[:, ::-1] if flip else hrs, k)
                    stored.setdefault(np.ascontiguousarray(v).tobytes(), f"rot{k}{'f' if flip else ''}")
    seen = [stored[np.rint(h * 255).astype(np.uint8).tobytes()] for h in hr]  # every output is a symmetry
    assert len(set(seen)) > 2


def test_deterministic_for_a_seed(processed):
    a = batches(pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=7), 4)
    b = batches(pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=7), 4)
    c = batches(pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=8), 4)
    for (la, ha), (lb, hb) in zip(a, b):
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(ha, hb)
    assert not all(np.array_equal(ha, hc) for (_, ha), (_, hc) in zip(a, c))


def test_start_step_equals_skipping(processed):
    full = batches(pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=2), 9)
    for start in (2, 5):  # 5 * 4 = 20 records: resumes inside the second epoch
        resumed = batches(pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=2,
                                                 start_step=start), 9 - start)
        for (lf, hf), (lr, hr) in zip(full[start:], resumed):
            np.testing.assert_array_equal(lf, lr)
            np.testing.assert_array_equal(hf, hr)


def test_shards_split_every_global_batch_and_resume_exactly(processed):
    """Multi-worker sharding: shard i holds block i of every global batch, so the shards'
    batches concatenate to the one-process batch (no crop twice), also when resumed mid-epoch."""
    import tensorflow as tf

    full = batches(pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=2), 7)
    for start in (0, 5):  # 5 * 4 = 20 records: resumes inside the second epoch
        shards = [batches(pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=2, start_step=start,
                                                 num_shards=2, shard_index=i), 7 - start) for i in range(2)]
        for k, (lf, hf) in enumerate(full[start:]):
            assert shards[0][k][0].shape[0] == shards[1][k][0].shape[0] == BATCH // 2
            np.testing.assert_array_equal(np.concatenate([shards[0][k][0], shards[1][k][0]]), lf)
            np.testing.assert_array_equal(np.concatenate([shards[0][k][1], shards[1][k][1]]), hf)
            assert not np.array_equal(shards[0][k][1], shards[1][k][1])
    ds = pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=2, num_shards=2, shard_index=1)
    # tf.distribute must not shard it again
    assert ds.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.OFF
    for shards, index in ((3, 0), (2, 2), (0, 0)):
        with pytest.raises(ValueError, match="split evenly across the workers"):
            pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=2, num_shards=shards,
                                   shard_index=index)


def test_one_epoch_and_manifestless_count(processed, tmp_path):
    ds = pipeline.train_dataset(processed / "train", 5, PATCH, SCALE, seed=0, repeat=False)
    assert len(batches(ds, 100)) == 2  # 12 records, remainder dropped
    alone = tmp_path / "train"
    shutil.copytree(processed / "train", alone)  # no manifest next to it: records are counted
    assert pipeline.count_records(alone) == 12
    assert len(batches(pipeline.train_dataset(alone, 5, PATCH, SCALE, seed=0, repeat=False), 100)) == 2


def test_errors(processed, tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.tfrecord shards"):
        pipeline.train_dataset(tmp_path, BATCH, PATCH, SCALE, seed=0)
    with pytest.raises(ValueError, match="hr_patch 96"):
        pipeline.train_dataset(processed / "train", BATCH, 96, SCALE, seed=0)
    with pytest.raises(ValueError, match="multiple of scale"):
        pipeline.train_dataset(processed / "train", BATCH, 50, SCALE, seed=0)


def test_load_pairs(processed):
    valid = images.load_pairs(processed / "valid")
    assert [p.name for p in valid] == ["v0", "v1", "v2"]
    for p in valid:
        assert p.lr.dtype == np.uint8 and p.hr.dtype == np.uint8
        assert p.hr.shape[0] == 4 * p.lr.shape[0] and p.hr.shape[1] == 4 * p.lr.shape[1]
        np.testing.assert_array_equal(p.lr, images.downscale(p.hr, SCALE))
    assert len(images.load_pairs(processed / "valid", limit=2)) == 2
    assert [p.name for p in images.iter_pairs(processed / "valid", names=["v2", "v0"])] == ["v0", "v2"]


@pytest.mark.parametrize("start, shards, index", [(0, 1, 0), (5, 1, 0), (3, 2, 1)])
def test_crops_in_memory_give_the_streamed_batches(processed, start, shards, index):
    """train.cache_mb: the in-memory path gathers each batch at once; every value equals the
    stream's (same record order, offsets, flips and rotations), also resumed and sharded."""
    def run(cache_bytes: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return batches(pipeline.train_dataset(processed / "train", BATCH, PATCH, SCALE, seed=11, start_step=start,
                                              num_shards=shards, shard_index=index, cache_bytes=cache_bytes), 7)

    streamed, cached = run(0), run(2**30)
    for (ls, hs), (lc, hc) in zip(streamed, cached, strict=True):
        np.testing.assert_array_equal(lc, ls)
        np.testing.assert_array_equal(hc, hs)


def test_symmetric_patches_are_numpy_flips_and_rotations():
    import tensorflow as tf

    crops = np.random.default_rng(0).integers(0, 256, (3, 9, 7, 3), dtype=np.uint8)
    rows, oy, ox = np.array([2, 0, 1, 2, 1, 0, 2, 1]), np.array([0, 4, 1, 3, 2, 0, 4, 1]), np.array([2, 0, 1, 2, 0, 2, 1, 0])
    flip, k = np.array([0, 1, 0, 1, 0, 1, 0, 1], bool), np.array([0, 0, 1, 1, 2, 2, 3, 3])
    got = pipeline.symmetric_patches(tf.constant(crops), tf.constant(rows, tf.int64), tf.constant(oy, tf.int32),
                                     tf.constant(ox, tf.int32), tf.constant(flip), tf.constant(k, tf.int32), 5).numpy()
    for n in range(len(rows)):
        patch = crops[rows[n], oy[n]:oy[n] + 5, ox[n]:ox[n] + 5]
        np.testing.assert_array_equal(got[n], np.rot90(patch[:, ::-1] if flip[n] else patch, k[n]))


def test_crops_too_large_for_the_budget_are_streamed(processed):
    files = sorted((processed / "train").glob("*.tfrecord"))
    size = sum(f.stat().st_size for f in files)
    assert pipeline.fits_in_memory(files, size) and not pipeline.fits_in_memory(files, size - 1)
    assert not pipeline.fits_in_memory(files, 0)
    hr, lr = pipeline.load_crops(files, *pipeline.crop_shapes(files[0]))
    assert hr.shape == (12, CROP, CROP, 3) and lr.shape == (12, CROP // SCALE, CROP // SCALE, 3)
    with pytest.raises(ValueError, match="crops of one size"):
        pipeline.load_crops(files, (CROP, CROP + 4, 3), (CROP // SCALE, CROP // SCALE + 1, 3))
    assert hr.ctypes.data % pipeline.ALIGN == 0 and lr.ctypes.data % pipeline.ALIGN == 0
    counts = pipeline.file_counts(files)
    for wrong in ([counts[0] + 1, *counts[1:]], [counts[0] - 1, *counts[1:]]):  # a stale manifest
        with pytest.raises(ValueError, match=f"{files[0].name}: holds .* not the {wrong[0]}"):
            pipeline.load_crops(files, *pipeline.crop_shapes(files[0]), counts=wrong)


def test_resident_crops_are_a_shared_variable_and_a_tensor_under_a_strategy():
    import tensorflow as tf

    a = pipeline.aligned_empty((3, 4, 5, 3))
    a[:] = np.arange(a.size, dtype=np.uint8).reshape(a.shape)
    v = pipeline.resident(a)
    assert isinstance(v, tf.Variable) and not v.trainable
    np.testing.assert_array_equal(v.numpy(), a)
    a[0, 0, 0, 0] = 255  # shared, not copied: the write shows through
    assert int(v[0, 0, 0, 0]) == 255
    a[0, 0, 0, 0] = 0
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():  # a variable here would be distributed
        t = pipeline.resident(np.ascontiguousarray(a))
    assert not isinstance(t, tf.Variable)
    np.testing.assert_array_equal(t.numpy(), a)


MEMORY_PROBE = """
import sys
from pathlib import Path
import psutil
from srgan import pipeline
from srgan.bench.timing import peak_rss
shards, data_bytes = Path(sys.argv[1]), int(sys.argv[2])
for _ in pipeline.train_dataset(shards, 4, 32, 4, 0).take(3):  # TF's runtime and thread pools start
    pass
before = psutil.Process().memory_info().rss
ds = pipeline.train_dataset(shards, 4, 32, 4, 0, cache_bytes=2 * data_bytes)
for _ in ds.take(3):
    pass
print((peak_rss() - before) / data_bytes)
"""


@pytest.mark.slow  # several processes
def test_cached_crops_are_held_once(tmp_path):
    """Decoding the crops into memory costs about their own size at the peak, not two or three
    copies (NumPy list + stack + a tensor that tf.data copies again: 3.3x measured before)."""
    import subprocess
    import sys

    import tensorflow as tf

    hr_side, n, per_file = 128, 1600, 400  # 1600 x (48 KiB + 3 KiB) = ~80 MB of crops
    rng = np.random.default_rng(0)
    shards = tmp_path / "train"
    shards.mkdir()

    def feature(**kw):
        return {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) if isinstance(v, bytes)
                else tf.train.Feature(int64_list=tf.train.Int64List(value=list(v))) for k, v in kw.items()}

    for f in range(n // per_file):
        with tf.io.TFRecordWriter(str(shards / f"train-{f:05d}.tfrecord")) as w:
            for _ in range(per_file):
                hr = rng.integers(0, 256, (hr_side, hr_side, 3), dtype=np.uint8)
                lr = np.ascontiguousarray(hr[::SCALE, ::SCALE])
                w.write(tf.train.Example(features=tf.train.Features(feature=feature(
                    hr=hr.tobytes(), lr=lr.tobytes(), hr_shape=hr.shape, lr_shape=lr.shape))).SerializeToString())
    data_bytes = n * 3 * (hr_side**2 + (hr_side // SCALE) ** 2)
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(shards), str(data_bytes)], capture_output=True,
                         text=True, check=True, env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    growth = float(out.stdout.strip().splitlines()[-1])
    # the claim is the upper bound (one copy); the lower one only shows the crops were cached: RSS can
    # lose clean library pages meanwhile when the machine is busy (0.82 in a CI run beside a study)
    assert 0.5 < growth < 1.6, f"peak memory grew by {growth:.2f}x the crops' size"


@pytest.mark.parametrize("counts, cycle", [([5, 0, 3, 7, 1, 4], 3), ([2, 9, 4], 8), ([6], 8), ([1, 1, 0, 2], 1)])
def test_interleave_order_is_tf_data_interleave(counts, cycle):
    """The in-memory stream's epoch order is computed at once; it must be the order in which
    tf.data's interleave reads the shard files (inputs of every length, empty ones too)."""
    import tensorflow as tf

    first = np.cumsum([0, *counts[:-1]])
    order = np.random.default_rng(len(counts)).permutation(len(counts))
    ranges = [(int(first[f]), int(first[f] + counts[f])) for f in order]
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(ranges, tf.int64)).interleave(
        lambda r: tf.data.Dataset.range(r[0], r[1]), cycle_length=cycle, block_length=1,
        num_parallel_calls=cycle, deterministic=True)
    assert pipeline.interleave_order(ranges, cycle).tolist() == [int(x) for x in ds]
