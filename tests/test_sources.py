"""srgan.sources (sample | div2k | coco) end to end, with tiny archives on a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _http import FileServer, zip_bytes
from conftest import write_params
from PIL import Image

from srgan import config
from srgan.download import Archive, DigestMismatchError, UnsafeArchiveError
from srgan.sources import SAMPLE_TRAIN, SAMPLE_VALID, SourceError, fetch, sample_dir, seeded_subset

FAST = {"retries": 2, "backoff": 0.0, "timeout": 10.0, "progress": False}


def _image(seed: int, fmt: str, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _table(files: dict[str, bytes]) -> dict[str, Archive]:
    """Archive table with digests computed here, in place of the published ones."""
    return {n: Archive(n, len(b), hashlib.sha256(b).hexdigest()) for n, b in files.items()}


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- DIV2K -------------------------------------------------------------------------------------------
TRAIN_IDS = ["0001", "0002", "0003", "0004"]
VALID_IDS = ["0801", "0802"]
HR = {i: _image(int(i), "PNG", 16) for i in TRAIN_IDS + VALID_IDS}
LR = {i: _image(10_000 + int(i), "PNG", 4) for i in TRAIN_IDS + VALID_IDS}
LR_TRAIN, LR_VALID = "DIV2K_train_LR_bicubic/X4", "DIV2K_valid_LR_bicubic/X4"


def _div2k_files(extra_train: dict[str, bytes] | None = None) -> dict[str, bytes]:
    train = {f"DIV2K_train_HR/{i}.png": HR[i] for i in TRAIN_IDS}
    train["DIV2K_train_HR/"] = b""  # directory entry, as real archives have
    return {
        "DIV2K_train_HR.zip": zip_bytes({**train, **(extra_train or {})}),
        "DIV2K_valid_HR.zip": zip_bytes({f"DIV2K_valid_HR/{i}.png": HR[i] for i in VALID_IDS}),
        "DIV2K_train_LR_bicubic_X4.zip": zip_bytes({f"{LR_TRAIN}/{i}x4.png": LR[i] for i in TRAIN_IDS}),
        "DIV2K_valid_LR_bicubic_X4.zip": zip_bytes({f"{LR_VALID}/{i}x4.png": LR[i] for i in VALID_IDS}),
    }


@pytest.fixture
def div2k():
    files = _div2k_files()
    with FileServer(files) as s:
        yield s, _table(files)


def _cfg(overrides: dict) -> config.Config:
    return config.replace(config.load(), overrides)


def test_div2k_download_extract_split(div2k, tmp_path):
    server, table = div2k
    cfg = _cfg({"data.source": "div2k", "data.div2k.base_url": server.url, "data.div2k.include_lr": True})
    raw, dl = tmp_path / "data/raw", tmp_path / "data/downloads"
    manifest = fetch(cfg, raw, dl, archives=table, **FAST)

    expected = {f"train/{i}.png": HR[i] for i in TRAIN_IDS} | {f"valid/{i}.png": HR[i] for i in VALID_IDS}
    expected |= {f"train_lr/{i}x4.png": LR[i] for i in TRAIN_IDS}
    expected |= {f"valid_lr/{i}x4.png": LR[i] for i in VALID_IDS}
    got = _tree(raw)
    assert json.loads(got.pop("fetch.json")) == manifest
    assert got == expected
    assert manifest["source"] == "div2k"
    assert manifest["counts"] == {"train": 4, "valid": 2, "train_lr": 4, "valid_lr": 2}
    for split, files in manifest["splits"].items():
        for name, digest in files.items():
            assert hashlib.sha256((raw / split / name).read_bytes()).hexdigest() == digest
    assert {a["name"]: a["sha256"] for a in manifest["archives"]} == {n: a.sha256 for n, a in table.items()}
    assert sorted(p.name for p in dl.iterdir()) == sorted([*table, *(n + ".sha256" for n in table)])
    assert sorted(p.name for p in raw.parent.iterdir()) == ["downloads", "raw"]  # no temp dirs left


def test_div2k_hr_only_by_default(div2k, tmp_path):
    server, table = div2k
    cfg = _cfg({"data.source": "div2k", "data.div2k.base_url": server.url.rstrip("/")})  # mirror w/o slash
    manifest = fetch(cfg, tmp_path / "raw", tmp_path / "dl", archives=table, **FAST)
    assert manifest["counts"] == {"train": 4, "valid": 2}
    assert sorted(p for p, _ in server.requests) == ["DIV2K_train_HR.zip", "DIV2K_valid_HR.zip"]


def test_second_run_does_no_network(div2k, tmp_path):
    server, table = div2k
    cfg = _cfg({"data.source": "div2k", "data.div2k.base_url": server.url, "data.div2k.include_lr": True})
    first = fetch(cfg, tmp_path / "raw", tmp_path / "dl", archives=table, **FAST)
    n = len(server.requests)
    assert n == 4
    second = fetch(cfg, tmp_path / "raw", tmp_path / "dl", archives=table, **FAST)
    assert len(server.requests) == n
    assert second == first


def test_cut_mid_archive_is_resumed(div2k, tmp_path):
    server, table = div2k
    server.cut_after["DIV2K_train_HR.zip"] = 500
    cfg = _cfg({"data.source": "div2k", "data.div2k.base_url": server.url})
    manifest = fetch(cfg, tmp_path / "raw", tmp_path / "dl", archives=table, **FAST)
    train_requests = [r for p, r in server.requests if p == "DIV2K_train_HR.zip"]
    assert train_requests == [None, "bytes=500-"]
    assert manifest["counts"]["train"] == 4


def test_digest_mismatch_leaves_no_raw(div2k, tmp_path):
    server, table = div2k
    bad = dict(table)
    bad["DIV2K_valid_HR.zip"] = Archive("DIV2K_valid_HR.zip", table["DIV2K_valid_HR.zip"].size, "ab" * 32)
    cfg = _cfg({"data.source": "div2k", "data.div2k.base_url": server.url})
    with pytest.raises(DigestMismatchError, match="DIV2K_valid_HR.zip: SHA-256 mismatch: expected abab"):
        fetch(cfg, tmp_path / "raw", tmp_path / "dl", archives=bad, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl"]  # no raw, no raw.tmp-*
    assert not list((tmp_path / "dl").glob("DIV2K_valid_HR.zip*"))  # no finished file, no .part


def test_failed_fetch_keeps_previous_raw(div2k, tmp_path):
    server, table = div2k
    cfg = _cfg({"data.source": "sample"})
    fetch(cfg, tmp_path / "raw", tmp_path / "dl", **FAST)
    before = _tree(tmp_path / "raw")
    bad = {n: Archive(n, a.size, "cd" * 32) for n, a in table.items()}
    cfg = _cfg({"data.source": "div2k", "data.div2k.base_url": server.url})
    with pytest.raises(DigestMismatchError):
        fetch(cfg, tmp_path / "raw", tmp_path / "dl", archives=bad, **FAST)
    assert _tree(tmp_path / "raw") == before


def test_path_traversal_archive_is_refused(tmp_path):
    files = _div2k_files(extra_train={"DIV2K_train_HR/../../evil.png": b"x"})
    with FileServer(files) as server:
        cfg = _cfg({"data.source": "div2k", "data.div2k.base_url": server.url})
        with pytest.raises(UnsafeArchiveError, match=r"DIV2K_train_HR.zip: entry .*evil.png.* '\.\.'"):
            fetch(cfg, tmp_path / "data/raw", tmp_path / "data/dl", archives=_table(files), **FAST)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dl"]
    assert not list(tmp_path.rglob("evil.png"))


# -- sample ------------------------------------------------------------------------------------------
def test_sample_is_offline_and_split_as_specified(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the sample source must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    manifest = fetch(_cfg({}), tmp_path / "raw", tmp_path / "dl")
    raw = tmp_path / "raw"
    assert sorted(p.name for p in (raw / "train").iterdir()) == sorted(SAMPLE_TRAIN)
    # the five lossless sporco photos, no JPEG among them
    assert sorted(p.name for p in (raw / "valid").iterdir()) == [
        "barbara.png", "kodim23.png", "monarch.png", "sail.png", "tulips.png"]
    assert set(SAMPLE_TRAIN).isdisjoint(SAMPLE_VALID) and "rocket.jpg" not in SAMPLE_TRAIN + SAMPLE_VALID
    assert {"motorcycle_left.png", "motorcycle_right.png"} <= set(SAMPLE_TRAIN)  # near-duplicates together
    for split, src in (("train", sample_dir("skimage")), ("valid", sample_dir("sporco"))):
        for p in (raw / split).iterdir():
            assert p.read_bytes() == (src / p.name).read_bytes()  # byte-for-byte copies
            assert manifest["splits"][split][p.name] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert manifest["source"] == "sample" and manifest["archives"] == []
    assert set(manifest["details"]["packages"]) == {"scikit-image", "sporco"}
    assert not (tmp_path / "dl").exists()


# -- COCO --------------------------------------------------------------------------------------------
VAL_NAMES = [f"{i:012d}.jpg" for i in range(100, 130)]
TRAIN_NAMES = [f"{i:012d}.jpg" for i in range(500, 520)]


@pytest.fixture(scope="module")
def coco_files() -> dict[str, bytes]:
    return {
        "val2017.zip": zip_bytes({f"val2017/{n}": _image(i, "JPEG") for i, n in enumerate(VAL_NAMES)}),
        "train2017.zip": zip_bytes({f"train2017/{n}": _image(99 + i, "JPEG") for i, n in enumerate(TRAIN_NAMES)}),
    }


@pytest.fixture
def coco(coco_files):
    with FileServer(coco_files) as s:
        yield s, _table(coco_files)


def _coco_cfg(server: FileServer, **kw) -> config.Config:
    over = {"data.source": "coco", "data.coco.base_url": server.url, "data.coco.train_images": 12,
            "data.coco.valid_images": 6}
    over |= {f"data.coco.{k}": v for k, v in kw.items() if k != "seed"}
    return _cfg(over | {"seed": kw.get("seed", 42)})


def test_coco_subset_deterministic_and_disjoint(coco, tmp_path):
    server, table = coco
    a = fetch(_coco_cfg(server), tmp_path / "a", tmp_path / "dl", archives=table, **FAST)
    b = fetch(_coco_cfg(server), tmp_path / "b", tmp_path / "dl", archives=table, **FAST)
    assert a == b and _tree(tmp_path / "a") == _tree(tmp_path / "b")
    train, valid = set(a["splits"]["train"]), set(a["splits"]["valid"])
    assert len(train) == 12 and len(valid) == 6 and not train & valid
    assert train | valid <= set(VAL_NAMES)
    order = seeded_subset(VAL_NAMES, 42)  # sorted, then shuffled by the seed
    assert valid == set(order[:6]) and train == set(order[6:18])
    # only the chosen members were extracted
    assert sorted(_tree(tmp_path / "a")) == sorted(["fetch.json", *(f"train/{n}" for n in train),
                                                    *(f"valid/{n}" for n in valid)])
    assert [p for p, _ in server.requests] == ["val2017.zip"]  # train2017 not needed
    c = fetch(_coco_cfg(server, seed=7), tmp_path / "c", tmp_path / "dl", archives=table, **FAST)
    assert set(c["splits"]["valid"]) != valid  # the seed matters


def test_coco_valid_stable_when_train_size_changes(coco, tmp_path):
    server, table = coco
    a = fetch(_coco_cfg(server), tmp_path / "a", tmp_path / "dl", archives=table, **FAST)
    b = fetch(_coco_cfg(server, train_images=3), tmp_path / "b", tmp_path / "dl", archives=table, **FAST)
    assert a["splits"]["valid"] == b["splits"]["valid"]


def test_coco_train2017_feeds_train(coco, tmp_path):
    server, table = coco
    m = fetch(_coco_cfg(server, train_archive="train2017"), tmp_path / "raw", tmp_path / "dl",
              archives=table, **FAST)
    assert set(m["splits"]["train"]) == set(seeded_subset(TRAIN_NAMES, 42)[:12])
    assert set(m["splits"]["valid"]) == set(seeded_subset(VAL_NAMES, 42)[:6])
    assert {a["name"] for a in m["archives"]} == {"val2017.zip", "train2017.zip"}


def test_coco_too_many_images_is_a_clear_error(coco, tmp_path):
    server, table = coco
    with pytest.raises(SourceError, match="= 36, but val2017.zip holds only 30 images"):
        fetch(_coco_cfg(server, train_images=30), tmp_path / "raw", tmp_path / "dl", archives=table, **FAST)
    assert not (tmp_path / "raw").exists()


# -- CLI ---------------------------------------------------------------------------------------------
def _fetch_cli(params: Path, raw: Path, shared: Path) -> subprocess.CompletedProcess:
    """src/fetch.py as DVC runs it; DVC_ROOT says where the shared archive cache is."""
    cmd = [sys.executable, str(config.ROOT / "src" / "fetch.py"), "--params", str(params), "--raw", str(raw)]
    return subprocess.run(cmd, env={**os.environ, "DVC_ROOT": str(shared)}, capture_output=True, text=True,
                          timeout=300)


def test_cli_sample_and_one_line_errors(tmp_path):
    params = write_params(tmp_path / "params.yaml", **{"data.source": "sample"})
    out = _fetch_cli(params, tmp_path / "raw", tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "raw/fetch.json").read_text())["counts"] == {"train": len(SAMPLE_TRAIN), "valid": 5}

    params.write_text(params.read_text().replace("source: sample", "source: nope"))
    out = _fetch_cli(params, tmp_path / "raw", tmp_path)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(err) == 1 and err[0].startswith("error:") and "data.source" in err[0]


def test_cli_reports_digest_mismatch_in_one_line(div2k, tmp_path):
    server, _ = div2k  # real published sizes/digests: the tiny test archives cannot match them
    params = write_params(tmp_path / "params.yaml", **{"data.source": "div2k", "data.div2k.base_url": server.url})
    out = _fetch_cli(params, tmp_path / "raw", tmp_path)
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert err[-1].startswith("error: DIV2K_train_HR.zip: size mismatch: expected 3530603713 bytes"), err
    assert "Traceback" not in out.stderr
    assert (tmp_path / "data" / "downloads").is_dir()  # the cache is under DVC_ROOT, shared by workspaces


# -- folder ------------------------------------------------------------------------------------------
def _own_images(root: Path) -> Path:
    from PIL import Image

    src = sample_dir("skimage")
    (root / "sub").mkdir(parents=True)
    Image.open(src / "astronaut.png").convert("RGB").resize((200, 200)).save(root / "a.jpg", quality=95)
    Image.open(src / "coffee.png").convert("L").save(root / "sub" / "grey.png")     # grey, in a sub-folder
    Image.open(src / "chelsea.png").convert("RGBA").save(root / "cat.png")           # with alpha
    Image.open(src / "motorcycle_left.png").save(root / "m.tiff")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")                 # skipped by preprocess
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_source_with_a_split_and_the_pipeline_on_it(tmp_path):
    from srgan.preprocess import preprocess

    own = _own_images(tmp_path / "photos")
    cfg = _cfg({"data.source": "folder", "data.folder.train": str(own), "data.folder.valid": str(tmp_path / "none"),
                "data.folder.valid_fraction": 0.25, "preprocess.hr_crop": 64, "train.hr_patch": 32})
    manifest = fetch(cfg, tmp_path / "raw", tmp_path / "dl")
    train, valid = manifest["splits"]["train"], manifest["splits"]["valid"]
    assert len(valid) == 1 and set(train).isdisjoint(valid)
    assert set(train) | set(valid) == {"a.jpg", "sub/grey.png", "cat.png", "m.tiff", "broken.png"}
    assert str(tmp_path) not in json.dumps(manifest)  # no machine paths: DVC's hash stays put
    again = fetch(cfg, tmp_path / "raw2", tmp_path / "dl")
    assert again["splits"] == manifest["splits"]  # the split is seeded
    m = preprocess(cfg, tmp_path / "raw", tmp_path / "processed", workers=1, progress=False)
    skipped = {s["file"] for s in m["skipped"]}
    assert "train/broken.png" in skipped or "valid/broken.png" in skipped
    assert m["counts"]["train_images"] + m["counts"]["valid_images"] == 4


def test_folder_source_errors_are_clear(tmp_path):
    cfg = _cfg({"data.source": "folder", "data.folder.train": str(tmp_path / "missing")})
    with pytest.raises(SourceError, match="data.folder.train: .* is not a folder"):
        fetch(cfg, tmp_path / "raw", tmp_path / "dl")
    (tmp_path / "empty").mkdir()
    cfg = _cfg({"data.source": "folder", "data.folder.train": str(tmp_path / "empty")})
    with pytest.raises(SourceError, match="no image files"):
        fetch(cfg, tmp_path / "raw", tmp_path / "dl")
    assert not (tmp_path / "raw").exists()
