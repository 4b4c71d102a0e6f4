"""srgan.download against a real local HTTP server: resume, verification, safe extraction."""

from __future__ import annotations

import hashlib
import io
import json
import random
import socket
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from _http import FileServer

from srgan.download import (
    ArchiveError,
    DigestMismatchError,
    DownloadError,
    UnsafeArchiveError,
    download,
    is_verified,
    list_members,
    safe_extract,
)

NAME = "blob.zip"
BLOB = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(BLOB).hexdigest()
FAST = {"retries": 3, "backoff": 0.0, "timeout": 10.0, "progress": False}


@pytest.fixture
def server():
    with FileServer({NAME: BLOB}) as s:
        yield s


def _get(server: FileServer, dl: Path, **kw) -> Path:
    opts = {**FAST, **kw}
    sha = opts.pop("sha", SHA)
    size = opts.pop("size", len(BLOB))
    return download(server.url + NAME, dl / NAME, size, sha, **opts)


def test_clean_download_verifies_and_records(server, tmp_path):
    dest = _get(server, tmp_path)
    assert dest.read_bytes() == BLOB
    assert not (tmp_path / (NAME + ".part")).exists()
    rec = json.loads((tmp_path / (NAME + ".sha256")).read_text())
    assert rec["sha256"] == SHA and rec["size"] == len(BLOB)
    assert server.requests == [(NAME, None)]


def test_second_call_does_no_network(server, tmp_path):
    _get(server, tmp_path)
    _get(server, tmp_path)
    assert len(server.requests) == 1


def test_cut_connection_is_resumed_with_range(server, tmp_path):
    server.cut_after[NAME] = 100_000
    dest = _get(server, tmp_path)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHA
    assert [r for _, r in server.requests] == [None, "bytes=100000-"]


def test_interrupted_run_resumes_on_next_run(server, tmp_path):
    server.cut_after[NAME] = 123_456
    with pytest.raises(DownloadError, match="giving up"):
        _get(server, tmp_path, retries=0)
    part = tmp_path / (NAME + ".part")
    assert part.stat().st_size == 123_456  # partial data kept apart from the finished name
    assert not (tmp_path / NAME).exists()
    _get(server, tmp_path)
    assert server.requests[-1] == (NAME, "bytes=123456-")
    assert (tmp_path / NAME).read_bytes() == BLOB and not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.cut_after[NAME] = 50_000
    server.ignore_range = True
    dest = _get(server, tmp_path)
    assert dest.read_bytes() == BLOB
    assert server.requests[1] == (NAME, "bytes=50000-")  # asked to resume, got the whole file


def test_digest_mismatch_is_clear_and_leaves_nothing(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(DigestMismatchError) as err:
        _get(server, tmp_path, sha=wrong)
    msg = str(err.value)
    assert NAME in msg and wrong in msg and SHA in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no finished file, .part or sidecar


def test_size_mismatch_fails_before_transfer(server, tmp_path):
    with pytest.raises(DigestMismatchError, match="size mismatch"):
        _get(server, tmp_path, size=len(BLOB) - 1)
    assert list(tmp_path.iterdir()) == []


def test_resume_of_wrong_prefix_fails_verification(server, tmp_path):
    # a corrupt .part (left by anything) must not end up as a finished file
    (tmp_path / (NAME + ".part")).write_bytes(b"x" * 1000)
    with pytest.raises(DigestMismatchError):
        _get(server, tmp_path)
    assert list(tmp_path.iterdir()) == []
    _get(server, tmp_path)  # and the next run starts clean
    assert (tmp_path / NAME).read_bytes() == BLOB


def test_unverified_or_modified_file_is_not_trusted(server, tmp_path):
    dest = tmp_path / NAME
    dest.write_bytes(b"y" * len(BLOB))  # right size, wrong content, no sidecar
    assert not is_verified(dest, len(BLOB), SHA)
    _get(server, tmp_path)
    assert dest.read_bytes() == BLOB and len(server.requests) == 1
    # tampering after verification: the sidecar no longer matches the file's mtime
    dest.write_bytes(b"z" * len(BLOB))
    assert not is_verified(dest, len(BLOB), SHA)
    _get(server, tmp_path)
    assert dest.read_bytes() == BLOB and len(server.requests) == 2


def test_matching_file_without_sidecar_is_hashed_not_downloaded(server, tmp_path):
    (tmp_path / NAME).write_bytes(BLOB)  # e.g. copied in by hand
    _get(server, tmp_path)
    assert server.requests == []
    assert (tmp_path / (NAME + ".sha256")).exists()


def test_http_404_fails_without_retrying(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(server.url + "missing.zip", tmp_path / "missing.zip", 1, SHA, **FAST)
    assert len(server.requests) == 1


def test_connection_refused_is_retried_then_bounded(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="giving up after 3 failed attempts"):
        download(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", 1, SHA, **{**FAST, "retries": 2})


# -- safe extraction --------------------------------------------------------------------------------
def _zip(path: Path, entries: list[tuple[str, bytes]], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _tar(
    path: Path, entries: list[tuple[str, bytes]], links: dict[str, tuple[bytes, str]] | None = None
) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return path


def test_safe_extract_zip_and_tar(tmp_path):
    entries = [("d/a.png", b"aa"), ("d/sub/b.png", b"bb")]
    for arc in (_zip(tmp_path / "ok.zip", entries), _tar(tmp_path / "ok.tar.gz", entries)):
        target = tmp_path / f"out-{arc.name}"
        digests = safe_extract(arc, target)
        assert digests == {n: hashlib.sha256(d).hexdigest() for n, d in entries}
        assert (target / "d/sub/b.png").read_bytes() == b"bb"
        assert list_members(arc) == ["d/a.png", "d/sub/b.png"]


def test_safe_extract_selects_and_replaces_existing_target(tmp_path):
    arc = _zip(tmp_path / "a.zip", [("top/1.png", b"1"), ("top/2.png", b"2"), ("top/x.txt", b"x")])
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.png").write_bytes(b"old")
    got = safe_extract(arc, target, lambda rel: rel.split("/")[-1] if rel.endswith(".png") else None)
    assert sorted(got) == ["1.png", "2.png"]
    assert sorted(p.name for p in target.iterdir()) == ["1.png", "2.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "out"]  # no temp dirs left


GOOD = [("d/good.png", b"ok")]


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: _zip(p / "a.zip", GOOD + [("../evil.png", b"x")]), "'..'"),
        (lambda p: _zip(p / "a.zip", GOOD + [("d/../../evil.png", b"x")]), "'..'"),
        (lambda p: _zip(p / "a.zip", GOOD + [("/tmp/evil.png", b"x")]), "absolute"),
        (lambda p: _zip(p / "a.zip", GOOD + [("..\\evil.png", b"x")]), "'..'"),
        (lambda p: _zip(p / "a.zip", GOOD, {"d/link": "../../evil.png"}), "points outside"),
        (lambda p: _tar(p / "a.tgz", GOOD + [("../evil.png", b"x")]), "'..'"),
        (lambda p: _tar(p / "a.tgz", GOOD + [("/evil.png", b"x")]), "absolute"),
        (lambda p: _tar(p / "a.tgz", GOOD, {"d/link": (tarfile.SYMTYPE, "/etc/passwd")}), "points outside"),
        (lambda p: _tar(p / "a.tgz", GOOD, {"d/link": (tarfile.SYMTYPE, "../../x")}), "points outside"),
        (lambda p: _tar(p / "a.tgz", GOOD, {"d/hard": (tarfile.LNKTYPE, "../x")}), "points outside"),
    ],
)
def test_escaping_entries_are_refused_and_nothing_extracted(tmp_path, make, needle):
    work = tmp_path / "work"
    work.mkdir()
    arc = make(tmp_path)
    target = work / "out"
    with pytest.raises(UnsafeArchiveError, match=needle) as err:
        safe_extract(arc, target)
    assert arc.name in str(err.value)
    assert list(work.iterdir()) == []  # no target, no temp dir, nothing half-extracted
    assert not (tmp_path / "evil.png").exists()


def test_non_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not an archive at all")
    with pytest.raises(ArchiveError, match="bad.zip"):
        safe_extract(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
