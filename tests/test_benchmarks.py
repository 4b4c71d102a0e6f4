"""srgan.benchmarks end to end: tiny archives of the real layouts on a local HTTP server, real download code.

The archives are cut from real photos (scikit-image's data folder): EDSR's ``benchmark.tar`` (plain
tar, ``benchmark/<Set>/HR`` + ``LR_bicubic``), a Hugging Face ``<Set>_HR.tar.gz`` (gzip tar, HR
only) and ``DIV2K_valid_HR.zip``. Sizes are deliberately not multiples of the scale.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from _http import FileServer, zip_bytes
from PIL import Image

from srgan import images
from srgan.benchmarks import (
    BASIS_MD5,
    BASIS_SHA256,
    BASIS_TOFU,
    BENCHMARKS,
    EDSR_MD5,
    PUBLISHED_BICUBIC_X4,
    BenchmarkError,
    bicubic_psnr_y,
    fetch_benchmark,
    fetch_benchmarks,
)
from srgan.download import DigestMismatchError, DownloadError
from srgan.sources import sample_dir

FAST = {"retries": 2, "backoff": 0.0, "timeout": 10.0, "progress": False}
SCALE = 4
COLOUR = ["astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg"]
GREY = ["camera.png", "moon.png"]  # real single-channel photos (mode L)
SET5 = ["baby", "bird", "butterfly", "head", "woman"]
SET14 = ["baboon", "barbara", "bridge", "coastguard", "comic", "face", "flowers", "foreman", "lenna",
         "man", "monarch", "pepper", "ppt3", "zebra"]
SET14_GREY = {"bridge", "man"}


# -- tiny archives of the real layouts ---------------------------------------------------------------
@functools.cache
def _photo(name: str) -> np.ndarray:
    with Image.open(sample_dir() / name) as im:
        return np.asarray(im)


def _cut(i: int, grey: bool = False) -> bytes:
    """A small PNG crop of a real photo; sizes 13..19 x 17..25, never all multiples of 4."""
    src = _photo(GREY[i % len(GREY)] if grey else COLOUR[i % len(COLOUR)])
    h, w = 13 + i % 7, 17 + (3 * i) % 9
    y, x = (37 * i) % (src.shape[0] - h), (53 * i) % (src.shape[1] - w)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(src[y:y + h, x:x + w])).save(buf, format="PNG")
    return buf.getvalue()


def _tar(entries: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name in sorted({str(Path(n).parent) for n in entries} - {"."}):  # folder entries, as real tars
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _edsr_hr(set5: list[str] = SET5) -> dict[str, dict[str, bytes]]:
    return {
        "Set5": {s: _cut(i) for i, s in enumerate(set5)},
        "Set14": {s: _cut(100 + i, grey=s in SET14_GREY) for i, s in enumerate(SET14)},
    }


def _edsr_tar(hr: dict[str, dict[str, bytes]]) -> bytes:
    """EDSR's benchmark.tar layout: benchmark/<Set>/HR/<name>.png and LR_bicubic/X<s>/<name>x<s>.png."""
    entries: dict[str, bytes] = {}
    for folder, imgs in hr.items():
        for stem, data in imgs.items():
            entries[f"benchmark/{folder}/HR/{stem}.png"] = data
            entries[f"benchmark/{folder}/LR_bicubic/X4/{stem}x4.png"] = _cut(999)  # ignored: we make our own
    return _tar(entries)


def _md5_table(tar: bytes) -> dict:
    """BENCHMARKS with the EDSR sources' MD5 replaced by the test archive's (in place of the published)."""
    md5 = hashlib.md5(tar).hexdigest()
    return {
        k: dataclasses.replace(
            b, sources=tuple(dataclasses.replace(s, md5=md5) if s.md5 else s for s in b.sources)
        )
        for k, b in BENCHMARKS.items()
    }


def _expected(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    hr = images.mod_crop(images.load_rgb(io.BytesIO(data)), SCALE)
    return hr, images.downscale(hr, SCALE)


def _check_outputs(folder: Path, originals: dict[str, bytes]) -> None:
    assert sorted(p.name for p in (folder / "hr").iterdir()) == sorted(f"{s}.png" for s in originals)
    assert sorted(p.name for p in (folder / "lr").iterdir()) == sorted(f"{s}.png" for s in originals)
    for stem, data in originals.items():
        hr = images.load_rgb(folder / "hr" / f"{stem}.png")
        lr = images.load_rgb(folder / "lr" / f"{stem}.png")
        want_hr, want_lr = _expected(data)
        assert hr.shape[0] % SCALE == 0 and hr.shape[1] % SCALE == 0
        assert lr.shape[:2] == (hr.shape[0] // SCALE, hr.shape[1] // SCALE)
        np.testing.assert_array_equal(hr, want_hr)  # mod-crop of the original, top-left anchored
        np.testing.assert_array_equal(lr, want_lr)  # exactly the training bicubic, not the archive's LR


def _tree(d: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (mtime, inode) of everything under ``d``: any rewrite or replacement shows."""
    return {p.relative_to(d).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino) for p in d.rglob("*")}


@pytest.fixture
def edsr():
    hr = _edsr_hr()
    tar = _edsr_tar(hr)
    with FileServer({"benchmark.tar": tar}) as s:
        yield s, tar, hr


# -- EDSR benchmark.tar: plain tar, published MD5 ------------------------------------------------------
def test_two_sets_from_one_tar_verified_by_md5(edsr, tmp_path):
    server, tar, hr = edsr
    dest, dl = tmp_path / "bench", tmp_path / "downloads"
    got = fetch_benchmarks(["set5", "Set14"], dest, dl, SCALE, server.url, sets=_md5_table(tar), **FAST)
    assert got == {"set5": dest / "set5", "set14": dest / "set14"}
    assert server.requests == [("benchmark.tar", None)]  # one download serves both sets

    for key, folder in (("set5", "Set5"), ("set14", "Set14")):
        _check_outputs(got[key], hr[folder])
        meta = json.loads((got[key] / "set.json").read_text())
        assert meta["name"] == key and meta["scale"] == SCALE and meta["count"] == len(hr[folder])
        arc = meta["archive"]
        assert arc["name"] == "benchmark.tar" and arc["digest"] == BASIS_MD5
        assert arc["origin"] == "https://cv.snu.ac.kr/research/EDSR/benchmark.tar"  # not the mirror
        assert arc["hr_dir"] == f"benchmark/{folder}/HR"
        assert (arc["size"], arc["sha256"], arc["md5"]) == (
            len(tar), hashlib.sha256(tar).hexdigest(), hashlib.md5(tar).hexdigest())
        for stem, info in meta["images"].items():
            assert info["member"] == f"benchmark/{folder}/HR/{stem}.png"
            written = (got[key] / "hr" / f"{stem}.png").read_bytes()
            assert info["hr_sha256"] == hashlib.sha256(written).hexdigest()

    # MD5 verified once, size + SHA-256 recorded for every later run
    rec = json.loads((dl / "benchmark.tar.digest.json").read_text())
    assert rec["basis"] == BASIS_MD5 and rec["sha256"] == hashlib.sha256(tar).hexdigest()
    assert rec["size"] == len(tar)
    # set14 reused it through the record (download.is_verified, which leaves its .sha256 sidecar)
    assert sorted(p.name for p in dl.iterdir()) == [
        "benchmark.tar", "benchmark.tar.digest.json", "benchmark.tar.sha256"]
    assert sorted(p.name for p in dest.iterdir()) == ["set14", "set5"]  # no temp folders left


def test_grey_images_become_rgb(edsr, tmp_path):
    server, tar, hr = edsr
    out = fetch_benchmark("set14", tmp_path / "b", tmp_path / "dl", SCALE, server.url,
                          sets=_md5_table(tar), **FAST)
    meta = json.loads((out / "set.json").read_text())
    for stem in SET14_GREY:
        assert Image.open(io.BytesIO(hr["Set14"][stem])).mode == "L"
        assert meta["images"][stem]["source_mode"] == "L"
        for sub in ("hr", "lr"):
            with Image.open(out / sub / f"{stem}.png") as im:
                assert im.mode == "RGB"
            arr = images.load_rgb(out / sub / f"{stem}.png")
            assert arr.shape[2] == 3
            np.testing.assert_array_equal(arr[..., 0], arr[..., 1])
            np.testing.assert_array_equal(arr[..., 0], arr[..., 2])


def test_second_call_does_no_network_and_no_rewrite(edsr, tmp_path):
    server, tar, _ = edsr
    dest, dl, sets = tmp_path / "b", tmp_path / "dl", _md5_table(tar)
    out = fetch_benchmark("set5", dest, dl, SCALE, server.url, sets=sets, **FAST)
    before, set_json, inode = _tree(out), (out / "set.json").read_bytes(), out.stat().st_ino
    n = len(server.requests)

    assert fetch_benchmark("set5", dest, dl, SCALE, server.url, sets=sets, **FAST) == out
    assert len(server.requests) == n
    assert _tree(out) == before and (out / "set.json").read_bytes() == set_json
    assert out.stat().st_ino == inode  # the folder was not replaced either

    # verified outputs do not need the cached archive any more
    (dl / "benchmark.tar").unlink()
    fetch_benchmark("set5", dest, dl, SCALE, server.url, sets=sets, **FAST)
    assert len(server.requests) == n and _tree(out) == before

    # a damaged output is rebuilt (the archive is downloaded again and checked against its record)
    (out / "lr" / "baby.png").write_bytes(b"not a png")
    fetch_benchmark("set5", dest, dl, SCALE, server.url, sets=sets, **FAST)
    assert len(server.requests) == n + 1
    assert (out / "set.json").read_bytes() == set_json  # deterministic: same content

    # another scale: rebuilt from the cached, verified archive without any request
    fetch_benchmark("set5", dest, dl, 3, server.url, sets=sets, **FAST)
    assert len(server.requests) == n + 1
    meta = json.loads((out / "set.json").read_text())
    assert meta["scale"] == 3
    assert all(w % 3 == 0 and h % 3 == 0 for w, h in (i["hr_size"] for i in meta["images"].values()))


def test_interrupted_transfer_is_resumed(edsr, tmp_path):
    server, tar, hr = edsr
    dest, dl, sets = tmp_path / "b", tmp_path / "dl", _md5_table(tar)
    cut = len(tar) // 3
    server.cut_after["benchmark.tar"] = cut
    with pytest.raises(DownloadError, match="giving up"):
        fetch_benchmark("set5", dest, dl, SCALE, server.url, sets=sets, **{**FAST, "retries": 0})
    assert (dl / "benchmark.tar.part").stat().st_size == cut  # kept apart from the finished name
    assert not (dl / "benchmark.tar").exists() and not (dl / "benchmark.tar.digest.json").exists()
    assert not dest.exists() or not list(dest.iterdir())

    out = fetch_benchmark("set5", dest, dl, SCALE, server.url, sets=sets, **FAST)
    assert server.requests[-1] == ("benchmark.tar", f"bytes={cut}-")
    assert (dl / "benchmark.tar").read_bytes() == tar
    assert sorted(p.name for p in dl.iterdir()) == ["benchmark.tar", "benchmark.tar.digest.json"]
    _check_outputs(out, hr["Set5"])


def test_cut_within_one_call_is_retried_with_range(edsr, tmp_path):
    server, tar, hr = edsr
    server.cut_after["benchmark.tar"] = 1000
    out = fetch_benchmark("set5", tmp_path / "b", tmp_path / "dl", SCALE, server.url,
                          sets=_md5_table(tar), **FAST)
    assert [r for p, r in server.requests if p == "benchmark.tar"] == [None, "bytes=1000-"]
    _check_outputs(out, hr["Set5"])


def test_server_ignoring_range_restarts_from_zero(edsr, tmp_path):
    server, tar, hr = edsr
    server.cut_after["benchmark.tar"] = 5000
    server.ignore_range = True
    out = fetch_benchmark("set5", tmp_path / "b", tmp_path / "dl", SCALE, server.url,
                          sets=_md5_table(tar), **FAST)
    assert server.requests == [("benchmark.tar", None), ("benchmark.tar", "bytes=5000-")]  # got 200
    assert (tmp_path / "dl" / "benchmark.tar").read_bytes() == tar
    _check_outputs(out, hr["Set5"])


def test_complete_part_left_before_the_rename_is_finished(edsr, tmp_path):
    server, tar, hr = edsr
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "benchmark.tar.part").write_bytes(tar)  # a run stopped between the last byte and the rename
    meta = {"url": server.url + "benchmark.tar", "total": len(tar), "validator": None}
    (dl / "benchmark.tar.part.json").write_text(json.dumps(meta))
    out = fetch_benchmark("set5", tmp_path / "b", dl, SCALE, server.url, sets=_md5_table(tar), **FAST)
    assert server.requests == [("benchmark.tar", f"bytes={len(tar)}-")]  # answered 416: nothing to fetch
    assert sorted(p.name for p in dl.iterdir()) == ["benchmark.tar", "benchmark.tar.digest.json"]
    _check_outputs(out, hr["Set5"])


def test_md5_mismatch_fails_and_leaves_nothing(edsr, tmp_path):
    server, tar, _ = edsr
    server.files["Set5_HR.tar.gz"] = _tar({"Set5_HR/baby.png": _cut(0)}, "w:gz")  # a mirror exists...
    dest, dl = tmp_path / "b", tmp_path / "dl"
    with pytest.raises(DigestMismatchError) as err:  # ...the real table's published MD5 is enforced
        fetch_benchmark("set5", dest, dl, SCALE, server.url, **FAST)
    msg = str(err.value)
    assert "benchmark.tar: MD5 mismatch" in msg and EDSR_MD5 in msg and hashlib.md5(tar).hexdigest() in msg
    assert [p for p, _ in server.requests] == ["benchmark.tar"]  # no silent fallback to the mirror
    assert not dl.exists() or list(dl.iterdir()) == []  # no archive, .part, .part.json or record
    assert not dest.exists()


def test_wrong_image_count_is_a_clear_error(tmp_path):
    hr = _edsr_hr(SET5[:4])
    tar = _edsr_tar(hr)
    want = r"holds 4 HR images under benchmark/Set5/HR/, expected 5"
    with FileServer({"benchmark.tar": tar}) as server, pytest.raises(BenchmarkError, match=want):
        fetch_benchmark("set5", tmp_path / "b", tmp_path / "dl", SCALE, server.url,
                        sets=_md5_table(tar), **FAST)
    assert list((tmp_path / "b").iterdir()) == []  # no set5, no set5.tmp-*


def test_failed_rebuild_keeps_previous_folder(edsr, tmp_path):
    server, tar, _ = edsr
    sets = _md5_table(tar)
    out = fetch_benchmark("set5", tmp_path / "b", tmp_path / "dl", SCALE, server.url, sets=sets, **FAST)
    before = _tree(out)
    bad = {**sets, "set5": dataclasses.replace(sets["set5"], count=6)}
    with pytest.raises(BenchmarkError, match="expected 6"):
        fetch_benchmark("set5", tmp_path / "b", tmp_path / "dl", SCALE, server.url, sets=bad, **FAST)
    assert _tree(out) == before
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["set5"]


# -- Hugging Face <Set>_HR.tar.gz: gzip tar, no published digest -> trust on first use -----------------
def test_mirror_fallback_trusted_on_first_use_then_enforced(tmp_path, caplog):
    set5 = {s: _cut(200 + i) for i, s in enumerate(SET5)}
    entries = {f"Set5_HR/{s}.png": d for s, d in set5.items()}
    entries["Set5_HR/._baby.png"] = b"\x00\x05\x16\x07 macOS resource fork"  # junk some tarballs carry
    tgz = _tar(entries, "w:gz")
    dest, dl = tmp_path / "b", tmp_path / "dl"
    with FileServer({"Set5_HR.tar.gz": tgz}) as server:  # benchmark.tar is missing (HTTP 404)
        with caplog.at_level(logging.WARNING, logger="srgan.benchmarks"):
            out = fetch_benchmark("set5", dest, dl, SCALE, server.url, **FAST)
        assert [p for p, _ in server.requests] == ["benchmark.tar", "Set5_HR.tar.gz"]
        assert "trying the next source" in caplog.text
        assert "Set5_HR.tar.gz has no published digest: trusting it on first use" in caplog.text
        _check_outputs(out, set5)

        rec = json.loads((dl / "Set5_HR.tar.gz.digest.json").read_text())
        assert rec["basis"] == BASIS_TOFU
        assert (rec["size"], rec["sha256"]) == (len(tgz), hashlib.sha256(tgz).hexdigest())
        hf = "https://huggingface.co/datasets/eugenesiow/Set5/resolve/main/data/Set5_HR.tar.gz"
        assert rec["origin"] == hf
        arc = json.loads((out / "set.json").read_text())["archive"]
        assert arc["digest"] == BASIS_TOFU and arc["hr_dir"] is None and arc["sha256"] == rec["sha256"]

        n = len(server.requests)
        fetch_benchmark("set5", dest, dl, SCALE, server.url, **FAST)
        assert len(server.requests) == n  # complete and verified: not even the 404 is asked again

        # the upstream file changes: a new download no longer matches what was trusted first
        server.files["Set5_HR.tar.gz"] = _tar({f"Set5_HR/{s}.png": _cut(300 + i) for i, s in enumerate(SET5)},
                                              "w:gz")
        (dl / "Set5_HR.tar.gz").unlink()
        previous = _tree(out)
        with pytest.raises(DigestMismatchError, match="recorded in .*Set5_HR.tar.gz.digest.json"):
            fetch_benchmark("set5", dest, dl, 3, server.url, **FAST)
        assert _tree(out) == previous  # the x4 set built from the trusted file is untouched
        assert not (dl / "Set5_HR.tar.gz").exists() and not (dl / "Set5_HR.tar.gz.part").exists()

        # the trusted file comes back: accepted again (verified against the record, not re-trusted)
        server.files["Set5_HR.tar.gz"] = tgz
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="srgan.benchmarks"):
            fetch_benchmark("set5", dest, dl, 3, server.url, **FAST)
        assert "trusting it on first use" not in caplog.text
        assert json.loads((dl / "Set5_HR.tar.gz.digest.json").read_text()) == rec


def test_tampered_cached_archive_is_downloaded_again(tmp_path):
    tgz = _tar({f"Set5_HR/{s}.png": _cut(400 + i) for i, s in enumerate(SET5)}, "w:gz")
    dest, dl = tmp_path / "b", tmp_path / "dl"
    with FileServer({"Set5_HR.tar.gz": tgz}) as server:
        fetch_benchmark("set5", dest, dl, SCALE, server.url, **FAST)
        (dl / "Set5_HR.tar.gz").write_bytes(b"x" * len(tgz))
        fetch_benchmark("set5", dest, dl, 2, server.url, **FAST)  # new scale: needs the archive
        assert (dl / "Set5_HR.tar.gz").read_bytes() == tgz
        assert [p for p, _ in server.requests].count("Set5_HR.tar.gz") == 2


# -- DIV2K_valid_HR.zip: zip, published size + SHA-256 -------------------------------------------------
def test_div2k_valid_from_zip_with_published_sha256(tmp_path):
    ids = [f"{i:04d}" for i in range(801, 901)]
    originals = {i: _cut(int(i), grey=int(i) % 25 == 0) for i in ids}
    zdata = zip_bytes({"DIV2K_valid_HR/": b"", **{f"DIV2K_valid_HR/{i}.png": d for i, d in originals.items()}})
    src = BENCHMARKS["div2k_valid"].sources[0]
    sets = {"div2k_valid": dataclasses.replace(
        BENCHMARKS["div2k_valid"],
        sources=(dataclasses.replace(src, size=len(zdata), sha256=hashlib.sha256(zdata).hexdigest()),))}
    with FileServer({"DIV2K_valid_HR.zip": zdata}) as server:
        out = fetch_benchmark("DIV2K_VALID", tmp_path / "b", tmp_path / "dl", SCALE, server.url,
                              sets=sets, **FAST)
        assert server.requests == [("DIV2K_valid_HR.zip", None)]
    assert out == tmp_path / "b" / "div2k_valid"
    _check_outputs(out, originals)
    meta = json.loads((out / "set.json").read_text())
    assert meta["count"] == 100 and meta["archive"]["digest"] == BASIS_SHA256
    # the project's own sidecar, no trust-on-first-use record for a published digest
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [
        "DIV2K_valid_HR.zip", "DIV2K_valid_HR.zip.sha256"]


# -- names, Manga109, published figures ----------------------------------------------------------------
def test_unknown_name_lists_the_allowed_ones(tmp_path):
    with pytest.raises(BenchmarkError) as err:
        fetch_benchmark("set6", tmp_path / "b", tmp_path / "dl", SCALE)
    msg = str(err.value)
    assert "'set6'" in msg
    for key in ("set5", "set14", "bsd100", "urban100", "manga109", "div2k_valid"):
        assert key in msg
    with FileServer({}) as server:  # several names: all are checked before any download
        with pytest.raises(BenchmarkError, match="'nope'"):
            fetch_benchmarks(["set5", "nope"], tmp_path / "b", tmp_path / "dl", SCALE, server.url, **FAST)
        assert server.requests == []
    assert not (tmp_path / "b").exists() and not (tmp_path / "dl").exists()


def test_b100_alias_and_bad_scale(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        fetch_benchmark("b100", tmp_path / "b", tmp_path / "dl", 0)
    assert BENCHMARKS["bsd100"].sources[0].hr_dir == "benchmark/B100/HR"


def test_manga109_needs_a_supplied_archive(tmp_path, caplog):
    dl = tmp_path / "dl"
    with pytest.raises(BenchmarkError, match="manga109.org"):
        fetch_benchmark("manga109", tmp_path / "b", dl, SCALE, **FAST)
    originals = {f"Title{i:03d}": _cut(500 + i) for i in range(109)}
    dl.mkdir()
    (dl / "Manga109.zip").write_bytes(zip_bytes({f"Manga109/{s}.png": d for s, d in originals.items()}))
    with caplog.at_level(logging.WARNING, logger="srgan.benchmarks"):
        out = fetch_benchmark("manga109", tmp_path / "b", dl, SCALE, **FAST)
    assert "trusting it on first use" in caplog.text
    _check_outputs(out, originals)
    assert json.loads((dl / "Manga109.zip.digest.json").read_text())["basis"] == BASIS_TOFU


def test_published_bicubic_figures_and_measured_bicubic(edsr, tmp_path):
    assert PUBLISHED_BICUBIC_X4 == {"set5": 28.42, "set14": 26.00, "bsd100": 25.96, "urban100": 23.14,
                                    "manga109": 24.89}
    assert set(PUBLISHED_BICUBIC_X4) <= set(BENCHMARKS)
    server, tar, _ = edsr
    out = fetch_benchmark("set5", tmp_path / "b", tmp_path / "dl", SCALE, server.url,
                          sets=_md5_table(tar), **FAST)
    value = bicubic_psnr_y(out)
    assert math.isfinite(value) and 5.0 < value < 60.0


def test_table_entries_are_consistent():
    counts = {"set5": 5, "set14": 14, "bsd100": 100, "urban100": 100, "manga109": 109, "div2k_valid": 100}
    assert {k: b.count for k, b in BENCHMARKS.items()} == counts
    for key, bset in BENCHMARKS.items():
        assert bset.name == key and bset.sources and bset.citation and bset.licence
        for src in bset.sources:
            assert src.where
            if src.md5:
                assert src.md5 == EDSR_MD5 and src.basis == BASIS_MD5
    assert BENCHMARKS["div2k_valid"].sources[0].basis == BASIS_SHA256
    assert BENCHMARKS["manga109"].sources[0].url is None
