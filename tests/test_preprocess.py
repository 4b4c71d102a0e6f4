"""srgan.preprocess and the stage main: crops, shards, resume, bad input, LR/HR alignment."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srgan import config, images
from srgan import preprocess as pp
from srgan.preprocess import PreprocessError, crop_positions, preprocess

SCALE, CROP = 4, 32


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def small_cfg(**pre) -> config.Config:
    pre = {"scale": SCALE, "hr_crop": CROP, "crops_per_image": 4, "shard_size": 8, **pre}
    return config.from_dict({"preprocess": pre, "train": {"hr_patch": 16}})


def make_raw(root: Path, n_train: int = 4, n_valid: int = 2) -> Path:
    raw = root / "raw"
    (raw / "train").mkdir(parents=True)
    (raw / "valid").mkdir(parents=True)
    for i in range(n_train):
        Image.fromarray(texture(70 + 6 * i, 66 + 10 * i, seed=i)).save(raw / "train" / f"t{i}.png")
    for i in range(n_valid):
        Image.fromarray(texture(50 + i, 43 + 2 * i, seed=100 + i)).save(raw / "valid" / f"v{i}.png")
    (raw / "fetch.json").write_text("{}")
    return raw


def read_records(path: Path) -> list[dict]:
    import tensorflow as tf

    out = []
    for rec in tf.data.TFRecordDataset(str(path)):
        f = tf.train.Example.FromString(rec.numpy()).features.feature
        hs, ls = list(f["hr_shape"].int64_list.value), list(f["lr_shape"].int64_list.value)
        out.append({
            "hr": np.frombuffer(f["hr"].bytes_list.value[0], np.uint8).reshape(hs),
            "lr": np.frombuffer(f["lr"].bytes_list.value[0], np.uint8).reshape(ls),
            "source": f["source"].bytes_list.value[0].decode(),
            "offset": tuple(f["offset"].int64_list.value),
        })
    return out


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- crop positions


def test_crop_positions_grid_cover_and_determinism():
    pos = crop_positions(2040, 1356, 256, 16, 4, 42, "0001.png")
    assert pos == crop_positions(2040, 1356, 256, 16, 4, 42, "0001.png")
    assert pos != crop_positions(2040, 1356, 256, 16, 4, 43, "0001.png")
    assert pos != crop_positions(2040, 1356, 256, 16, 4, 42, "0002.png")
    assert len(pos) == 16 and len(set(pos)) == 16
    for y, x in pos:
        assert y % 4 == 0 and x % 4 == 0 and 0 <= y <= 1356 - 256 and 0 <= x <= 2040 - 256
    # a small image gives fewer crops, and together they cover all of it
    few = crop_positions(300, 260, 256, 16, 4, 42, "a.png")
    assert len(few) == 4
    cover = np.zeros((260, 300), bool)
    for y, x in few:
        cover[y : y + 256, x : x + 256] = True
    assert cover[: 260 - 260 % 4, : 300 - 300 % 4].all()
    assert crop_positions(255, 1000, 256, 16, 4, 42, "a.png") == []


# --------------------------------------------------------------------------- alignment


def test_lr_hr_alignment_crop_vs_whole_image():
    img = texture(96, 96, seed=3)
    lr_whole = images.downscale(img, SCALE)
    for y, x in [(0, 0), (8, 20), (32, 64)]:  # offsets on the scale grid
        lr_crop = images.downscale(img[y : y + CROP, x : x + CROP], SCALE)
        ly, lx, n = y // SCALE, x // SCALE, CROP // SCALE
        region = lr_whole[ly : ly + n, lx : lx + n]
        np.testing.assert_array_equal(lr_crop[2:-2, 2:-2], region[2:-2, 2:-2])  # kernel support: 2 LR px
    # and the bicubic-upscaled LR lines up with HR at zero shift, not a neighbour
    up = images.upscale_bicubic(lr_whole, SCALE).astype(float)[8:-8, 8:-8]
    hr = img.astype(float)

    def err(dy: int, dx: int) -> float:
        return float(np.mean((up - hr[8 + dy : 96 - 8 + dy, 8 + dx : 96 - 8 + dx]) ** 2))

    errs = {(dy, dx): err(dy, dx) for dy in (-2, -1, 0, 1, 2) for dx in (-2, -1, 0, 1, 2)}
    assert min(errs, key=errs.get) == (0, 0)


# --------------------------------------------------------------------------- end to end


def test_preprocess_outputs_and_bad_input(tmp_path):
    raw = make_raw(tmp_path, n_train=3, n_valid=1)
    tr, va = raw / "train", raw / "valid"
    Image.fromarray(texture(64, 64, 9)[..., 0]).save(tr / "grey.png")
    rgba = np.dstack([texture(64, 64, 10), np.full((64, 64), 128, np.uint8)])
    Image.fromarray(rgba).save(tr / "rgba.png")
    Image.fromarray(texture(64, 64, 11)).convert("P").save(tr / "pal.gif")
    Image.fromarray(texture(64, 64, 12)).convert("CMYK").save(tr / "cmyk.jpg")
    Image.fromarray((texture(64, 64, 13)[..., 0].astype(np.uint16) * 257)).save(tr / "deep.png")
    (tr / "corrupt.png").write_bytes(os.urandom(2000))
    Image.fromarray(texture(64, 64, 14)).save(tr / "whole.jpg")
    (tr / "cut.jpg").write_bytes((tr / "whole.jpg").read_bytes()[:600])
    (tr / "whole.jpg").unlink()
    Image.fromarray(texture(20, 90, 15)).save(tr / "tiny.png")
    (tr / "notes.txt").write_text("ignored")
    (va / "broken.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(100))
    Image.fromarray(texture(12, 12, 16)).save(va / "small.png")

    cfg = small_cfg()
    out = tmp_path / "out"
    m = preprocess(cfg, raw, out, workers=1, progress=False)

    skipped = {s["file"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"train/corrupt.png", "train/cut.jpg", "train/tiny.png",
                            "valid/broken.jpg", "valid/small.png"}
    assert "corrupt" in skipped["train/corrupt.png"] and "truncated" in skipped["train/cut.jpg"]
    assert "smaller than the 32px training crop" in skipped["train/tiny.png"]
    c = m["counts"]
    assert c["train_files"] == 11 and c["train_images"] == 8 and c["valid_images"] == 1
    assert c["valid_files"] == 3 and c["skipped"] == 5
    assert set(m["sources"]) == {f"train/{p.name}" for p in tr.iterdir() if p.suffix != ".txt"} | {
        f"valid/{p.name}" for p in va.iterdir()}
    assert m["sources"]["train/t0.png"] == hashlib.sha256((tr / "t0.png").read_bytes()).hexdigest()
    assert m["config"] == {"seed": 42, "preprocess": {"scale": 4, "hr_crop": 32, "crops_per_image": 4,
                                                      "shard_size": 8, "valid_max_side": 0}}
    body = {k: v for k, v in m.items() if k != "digest"}
    assert m["digest"] == hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert json.loads((out / "manifest.json").read_text()) == m

    # shards: 2 images each, named in order, crop counts as listed, nothing temporary left
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == [s["name"] for s in m["shards"]] and all(n.endswith(".tfrecord") for n in names)
    total = 0
    for s in m["shards"]:
        recs = read_records(out / "train" / s["name"])
        assert len(recs) == s["crops"]
        total += len(recs)
        for r in recs:
            assert r["hr"].shape == (CROP, CROP, 3) and r["lr"].shape == (CROP // SCALE, CROP // SCALE, 3)
            np.testing.assert_array_equal(r["lr"], images.downscale(r["hr"], SCALE))
            src = images.load_rgb(tr / r["source"])
            y, x = r["offset"]
            assert y % SCALE == 0 and x % SCALE == 0
            np.testing.assert_array_equal(r["hr"], src[y : y + CROP, x : x + CROP])
    assert total == c["train_crops"]

    # conversions really happened (grey -> equal channels, deep -> scaled not clipped)
    deep = [r for s in m["shards"] for r in read_records(out / "train" / s["name"]) if r["source"] == "deep.png"]
    assert deep and 20 < deep[0]["hr"].mean() < 235
    # validation pair: mod-cropped to a multiple of the scale, LR = downscale(HR)
    hr = images.load_rgb(out / "valid" / "hr" / "v0.png")
    lr = images.load_rgb(out / "valid" / "lr" / "v0.png")
    assert hr.shape == (48, 40, 3) and lr.shape == (12, 10, 3)
    np.testing.assert_array_equal(hr, images.load_rgb(va / "v0.png")[:48, :40])
    np.testing.assert_array_equal(lr, images.downscale(hr, SCALE))
    assert m["valid"] == [{"name": "v0", "source": "valid/v0.png", "hr_shape": [48, 40, 3],
                           "lr_shape": [12, 10, 3]}]


def test_valid_max_side_centre_crop(tmp_path):
    raw = make_raw(tmp_path, n_train=1, n_valid=0)
    Image.fromarray(texture(90, 70, 5)).save(raw / "valid" / "big.png")
    m = preprocess(small_cfg(valid_max_side=50), raw, tmp_path / "out", workers=1, progress=False)
    hr = images.load_rgb(tmp_path / "out" / "valid" / "hr" / "big.png")
    assert hr.shape == (48, 48, 3) and m["valid"][0]["lr_shape"] == [12, 12, 3]
    np.testing.assert_array_equal(hr, images.load_rgb(raw / "valid" / "big.png")[20:68, 10:58])


def test_resume_keeps_finished_work_and_redoes_changed(tmp_path):
    raw = make_raw(tmp_path, n_train=5)
    out = tmp_path / "out"
    m1 = preprocess(small_cfg(), raw, out, workers=1, progress=False)
    assert [s["name"] for s in m1["shards"]] == ["train-00000.tfrecord", "train-00001.tfrecord",
                                                 "train-00002.tfrecord"]
    t1, v1 = mtimes(out / "train"), mtimes(out / "valid" / "hr")

    # identical re-run: nothing rewritten, identical manifest
    m2 = preprocess(small_cfg(), raw, out, workers=1, progress=False)
    assert m2 == m1 and mtimes(out / "train") == t1 and mtimes(out / "valid" / "hr") == v1

    # one source changes: only its shard is redone; a stray temp file is removed
    Image.fromarray(texture(80, 80, seed=77)).save(raw / "train" / "t2.png")
    (out / "train" / "train-00004.tfrecord.tmp").write_bytes(b"half")
    m3 = preprocess(small_cfg(), raw, out, workers=1, progress=False)
    t3 = mtimes(out / "train")
    assert set(t3) == set(t1)
    assert t3["train-00000.tfrecord"] == t1["train-00000.tfrecord"]
    assert t3["train-00002.tfrecord"] == t1["train-00002.tfrecord"]
    assert t3["train-00001.tfrecord"] != t1["train-00001.tfrecord"]
    assert m3["digest"] != m1["digest"]

    # another config: everything redone, shards of the old layout removed
    m4 = preprocess(small_cfg(shard_size=16), raw, out, workers=1, progress=False)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["train-00000.tfrecord", "train-00001.tfrecord"]
    assert [s["crops"] for s in m4["shards"]] == [16, 4]
    assert mtimes(out / "valid" / "hr") == v1  # validation does not depend on shard_size


def test_interrupted_run_resumes(tmp_path, monkeypatch):
    raw = make_raw(tmp_path, n_train=5)
    out = tmp_path / "out"
    real = pp.crop_image
    calls = []

    def dies_on_fourth(job):
        calls.append(job.name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(pp, "crop_image", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        preprocess(small_cfg(), raw, out, workers=1, progress=False)
    assert not (out / "manifest.json").exists()
    assert (out / "train" / "train-00000.tfrecord").exists()
    assert not (out / "train" / "train-00001.tfrecord").exists()  # half-written shard never looks done
    done = mtimes(out / "train")["train-00000.tfrecord"]

    monkeypatch.setattr(pp, "crop_image", real)
    calls.clear()
    m = preprocess(small_cfg(), raw, out, workers=1, progress=False)
    assert mtimes(out / "train")["train-00000.tfrecord"] == done
    assert sorted(p.name for p in (out / "train").iterdir()) == [s["name"] for s in m["shards"]]
    fresh = preprocess(small_cfg(), raw, tmp_path / "fresh", workers=1, progress=False)
    assert fresh["digest"] == m["digest"]


def test_ordered_map_keeps_order_and_every_job():
    from multiprocessing.pool import ThreadPool

    with ThreadPool(3) as pool:
        assert list(pp._ordered_map(pool, lambda x: x * x, range(20), depth=4)) == [x * x for x in range(20)]
    assert list(pp._ordered_map(None, str, [1, 2], depth=1)) == ["1", "2"]


def test_worker_processes_give_the_same_result(tmp_path):
    raw = make_raw(tmp_path, n_train=9)  # more jobs than the 2 * 2 + 2 kept in flight
    m1 = preprocess(small_cfg(), raw, tmp_path / "a", workers=1, progress=False)
    m2 = preprocess(small_cfg(), raw, tmp_path / "b", workers=2, progress=False)
    assert m1 == m2
    for s in m1["shards"]:
        assert (tmp_path / "a" / "train" / s["name"]).read_bytes() == (tmp_path / "b" / "train" / s["name"]).read_bytes()


def test_errors_name_the_raw_dir(tmp_path):
    with pytest.raises(PreprocessError, match="no training images in .*raw/train"):
        preprocess(small_cfg(), tmp_path / "raw", tmp_path / "out", workers=1)
    raw = make_raw(tmp_path, n_train=0, n_valid=1)
    with pytest.raises(PreprocessError, match="overlaps the raw dir"):
        preprocess(small_cfg(), raw, raw, workers=1)
    (raw / "train" / "bad.png").write_bytes(b"not an image")
    Image.fromarray(texture(10, 10)).save(raw / "train" / "small.png")
    with pytest.raises(PreprocessError, match=r"no usable training image in .*raw/train: all 2 files"):
        preprocess(small_cfg(), raw, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    for p in (raw / "valid").iterdir():
        p.unlink()
    with pytest.raises(PreprocessError, match="no validation images in .*raw/valid"):
        preprocess(small_cfg(), raw, tmp_path / "out", workers=1, progress=False)
    (raw / "valid" / "x.png").write_bytes(b"junk")
    Image.fromarray(texture(64, 64)).save(raw / "train" / "ok.png")
    with pytest.raises(PreprocessError, match=r"no usable validation image in .*raw/valid"):
        preprocess(small_cfg(), raw, tmp_path / "out", workers=1, progress=False)


def test_stage_script_and_one_line_errors(tmp_path):
    """src/preprocess.py as DVC runs it: paths from the command line, one `error:` line on bad params."""
    import subprocess
    import sys

    import yaml

    raw = make_raw(tmp_path / "data", n_train=2, n_valid=1)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(small_cfg(workers=1).to_dict()))
    cmd = [sys.executable, str(config.ROOT / "src" / "preprocess.py"), "--params", str(params),
           "--raw", str(raw), "--processed", str(tmp_path / "data" / "processed")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / "processed" / "manifest.json").exists()
    assert "crops from 2/2 training images" in out.stdout

    params.write_text(params.read_text().replace("scale: 4", "scale: 5"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: {params}: preprocess.scale: 5 is not allowed; allowed values: 2, 3, 4"]


@pytest.mark.slow  # several processes
def test_output_bytes_are_the_same_in_every_process(tmp_path):
    """Two runs in two processes write byte-identical outputs (protobuf map order is per process
    unless serialised deterministically), so DVC sees unchanged data and re-trains nothing."""
    import subprocess
    import sys

    raw = make_raw(tmp_path / "data", n_train=3, n_valid=1)
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]); from test_preprocess import small_cfg;"
            "from srgan.preprocess import preprocess; preprocess(small_cfg(workers=1), Path(sys.argv[1]), Path(sys.argv[2]),"
            " progress=False)")
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        env = {**os.environ, "PYTHONPATH": str(config.ROOT / "src")}
        subprocess.run([sys.executable, "-c", code, str(raw), str(out), str(Path(__file__).parent)], check=True,
                       capture_output=True, timeout=300, env=env)
        outs.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) > 3
    assert [k for k in outs[0] if outs[0][k] != outs[1][k]] == []
