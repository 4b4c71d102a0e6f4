"""Resumable, digest-verified downloads and safe archive extraction.

A download streams into ``<name>.part`` (resumed with an HTTP Range request after an
interruption), is checked against a published size and SHA-256, and only then is renamed to
``<name>`` (atomically, ``os.replace``). A small ``<name>.sha256`` sidecar records that the
finished file was verified, so a later run neither re-downloads nor re-hashes it.

Extraction refuses any entry that would land outside the target folder, checks every entry
before writing anything, and builds the result in a temporary sibling folder that is renamed
into place, so a failure never leaves a half-extracted target behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import requests
import urllib3
from tqdm import tqdm

from .dataio import sha256_file, write_json_atomic

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # 1 MiB: few syscalls, small memory
SIDECAR_SUFFIX = ".sha256"
PART_SUFFIX = ".part"


class FetchError(Exception):
    """Base of every expected failure of the fetch stage (printed as one line, no traceback)."""


class DownloadError(FetchError):
    """A download failed (HTTP error, retries exhausted, ...)."""


class DigestMismatchError(DownloadError):
    """A downloaded file does not have the published size or SHA-256."""


class ArchiveError(FetchError):
    """An archive is unreadable or corrupt."""


class UnsafeArchiveError(ArchiveError):
    """An archive entry would be written outside the target folder."""


@dataclass(frozen=True)
class Archive:
    """A published file: its name (relative to a base URL), size in bytes and SHA-256."""

    name: str
    size: int
    sha256: str


def url_for(base_url: str, name: str) -> str:
    """``base_url`` joined with ``name`` (a missing trailing slash on the base is tolerated)."""
    return base_url.rstrip("/") + "/" + name


# -- verified-file sidecar ------------------------------------------------------------------------
def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + SIDECAR_SUFFIX)


def _record_verified(dest: Path, sha256: str) -> None:
    st = dest.stat()
    # size + mtime tie the record to this exact file: a replaced or touched file is re-hashed
    write_json_atomic(
        _sidecar(dest),
        {"name": dest.name, "sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
    )


def is_verified(dest: Path, size: int, sha256: str) -> bool:
    """True if ``dest`` exists with the expected size and SHA-256.

    Uses the sidecar when it matches the file's current size and mtime; otherwise hashes the
    file (and writes the sidecar if it verifies). Never trusts a file that was not hashed.
    """
    try:
        st = dest.stat()
    except FileNotFoundError:
        return False
    if st.st_size != size:
        return False
    try:
        rec = json.loads(_sidecar(dest).read_text())
        if (
            rec.get("sha256") == sha256
            and rec.get("size") == st.st_size
            and rec.get("mtime_ns") == st.st_mtime_ns
        ):
            return True
    except (OSError, ValueError):
        pass  # missing or unreadable sidecar: fall through to hashing
    if sha256_file(dest) != sha256:
        return False
    _record_verified(dest, sha256)
    return True


# -- download ---------------------------------------------------------------------------------------
# Transient failures worth a retry; anything else (404, 403, ...) fails at once.
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_NET_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)
PART_META_SUFFIX = ".part.json"  # announced length and validator of an unpinned download in progress


class _Retry(Exception):
    """Internal: a transient failure; the caller retries after a backoff (the .part is kept)."""


def _parse_content_range(value: str | None) -> tuple[int | None, int | None] | None:
    """``'bytes 10-99/100'`` -> (10, 100), ``'bytes */100'`` -> (None, 100); None if malformed."""
    if not value or not value.startswith("bytes "):
        return None
    try:
        span, total = value[6:].split("/", 1)
        start = None if span.strip() == "*" else int(span.split("-", 1)[0])
        return start, (None if total.strip() == "*" else int(total))
    except ValueError:
        return None


def _mismatch(
    part: Path, url: str, name: str, what: str, expected: object, actual: object
) -> DigestMismatchError:
    part.unlink(missing_ok=True)
    return DigestMismatchError(
        f"{name}: {what} mismatch: expected {expected}, got {actual} (from {url}); "
        f"the partial download was deleted"
    )


Digests = tuple[str, "str | None"]  # (SHA-256, MD5 or None) hex digests


class _Hashes:
    """SHA-256 and, when asked, MD5 fed in one pass. MD5 only checks a published digest."""

    def __init__(self, with_md5: bool) -> None:
        self._all = [hashlib.sha256()] + ([hashlib.md5(usedforsecurity=False)] if with_md5 else [])

    def update(self, block: bytes) -> None:
        for h in self._all:
            h.update(block)

    def update_from(self, path: Path) -> int:
        """Feed the whole file at ``path``; return its size."""
        size = 0
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                self.update(block)
                size += len(block)
        return size

    def hexdigests(self) -> Digests:
        sha, *md5 = (h.hexdigest() for h in self._all)
        return sha, (md5[0] if md5 else None)


def file_digests(path: Path) -> tuple[int, str, str]:
    """(size, SHA-256, MD5) of a file in one pass."""
    hashes = _Hashes(with_md5=True)
    size = hashes.update_from(path)
    sha256, md5 = hashes.hexdigests()
    assert md5 is not None
    return size, sha256, md5


def _read_part_meta(meta_path: Path | None) -> dict:
    if meta_path is None:
        return {}
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _fetch_part(
    session: requests.Session,
    url: str,
    part: Path,
    size: int | None,
    *,
    name: str,
    timeout: float,
    progress: bool | None,
    meta_path: Path | None = None,
) -> Digests:
    """One request: append to (or restart) ``part`` until it holds the whole file; its digests.

    ``size`` is the published size; None takes the length the server announces, kept with its
    validator (ETag / Last-Modified) in ``meta_path`` so that a resume continues the *same* file
    (``If-Range``: a changed file comes back whole with 200 and the .part restarts). Raises _Retry
    on transient failures (the .part is kept for resuming), DownloadError or DigestMismatchError on
    permanent ones. The digests (the MD5 only for an unpinned download, ``size`` None) are taken
    while the bytes arrive, so the caller verifies without reading the file again.
    """
    hashes = _Hashes(with_md5=size is None)
    meta = _read_part_meta(meta_path)
    expected = size if size is not None else meta.get("total")
    offset = part.stat().st_size if part.exists() else 0
    unknown_origin = size is None and meta.get("url") != url
    if offset and (unknown_origin or (expected is not None and offset > expected)):
        part.unlink()  # cannot be a prefix of the right file
        offset = 0
    if offset and offset == size:  # completed by an earlier run that stopped before the rename
        hashes.update_from(part)
        return hashes.hexdigests()
    # identity encoding: byte offsets must refer to the file itself, not a gzip stream of it
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=timeout)
    except _NET_ERRORS as exc:
        raise _Retry(f"{type(exc).__name__}: {exc}") from exc
    with resp:
        if resp.status_code == 416 and offset:
            cr = _parse_content_range(resp.headers.get("Content-Range"))
            if cr is not None and cr[1] == offset == expected:  # complete: stopped before the rename
                hashes.update_from(part)
                return hashes.hexdigests()
            part.unlink(missing_ok=True)  # server disagrees about our prefix: start over
            raise _Retry("HTTP 416 (range not satisfiable); restarting from byte 0")
        if resp.status_code in _RETRY_STATUS:
            raise _Retry(f"HTTP {resp.status_code}")
        if resp.status_code not in (200, 206):
            raise DownloadError(f"{name}: HTTP {resp.status_code} {resp.reason} for {url}")
        if resp.status_code == 206:
            cr = _parse_content_range(resp.headers.get("Content-Range"))
            if cr is None or cr[0] != offset or (size is None and expected not in (None, cr[1])):
                part.unlink(missing_ok=True)
                raise _Retry(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}; restarting")
            total = cr[1]
        else:
            # 200: the whole file (no Range sent, Range ignored, or If-Range saw a changed file)
            offset = 0
            cl = resp.headers.get("Content-Length")
            total = int(cl) if cl and cl.isdigit() else None
        if size is not None:
            # fail before transferring gigabytes if the server announces another size
            if total is not None and total != size:
                announced = f"{total} bytes (announced by the server)"
                raise _mismatch(part, url, name, "size", f"{size} bytes", announced)
            total = size
        elif total is None:
            raise DownloadError(
                f"{name}: {url} announced no length; a download without a published digest "
                "cannot be checked for completeness"
            )
        elif meta_path is not None and (resp.status_code == 200 or not meta):
            validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
            write_json_atomic(meta_path, {"url": url, "total": total, "validator": validator})
        if offset:
            hashes.update_from(part)  # the resumed prefix is part of the digest
        done = offset
        bar = tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=name, disable=None if progress is None else not progress, leave=False,
        )
        # raw stream without decoding, so what we keep is exactly what was served
        stream = resp.raw.stream(CHUNK, decode_content=False)
        with bar, open(part, "ab" if offset else "wb") as out:
            while True:
                try:
                    block = next(stream)
                except StopIteration:
                    break
                except _NET_ERRORS as exc:  # only network errors are retried, not disk errors
                    why = f"connection lost after {done} of {total} bytes ({type(exc).__name__})"
                    raise _Retry(why) from exc
                done += len(block)
                if done > total:
                    out.close()
                    if size is not None:
                        raise _mismatch(part, url, name, "size", f"{size} bytes", f"more than {size} bytes")
                    part.unlink(missing_ok=True)
                    raise DownloadError(f"{name}: {url} sent more than the {total} bytes it announced")
                out.write(block)
                hashes.update(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
    if done < total:
        raise _Retry(f"connection closed after {done} of {total} bytes")
    return hashes.hexdigests()


def _fetch_with_retries(
    url: str,
    dest: Path,
    size: int | None,
    *,
    retries: int,
    backoff: float,
    timeout: float,
    progress: bool | None,
    session: requests.Session | None,
    meta_path: Path | None = None,
) -> tuple[Path, Digests]:
    """Fetch ``url`` into ``dest.part`` (resumed), retrying transient failures; the .part, its digests.

    Up to ``retries`` consecutive failures without progress are retried with exponential backoff.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    have = part.stat().st_size if part.exists() else 0
    announced = f" ({size} bytes)" if size is not None else ""
    resume = f", resuming at byte {have}" if have else ""
    log.info("downloading %s%s from %s%s", dest.name, announced, url, resume)
    own = session is None
    session = session or requests.Session()
    failures = 0
    try:
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                digests = _fetch_part(session, url, part, size, name=dest.name, timeout=timeout,
                                      progress=progress, meta_path=meta_path)
                return part, digests
            except _Retry as exc:
                now = part.stat().st_size if part.exists() else 0
                # bounded per stall: a failure after real progress does not eat the budget
                failures = 1 if now > before else failures + 1
                if failures > retries:
                    raise DownloadError(
                        f"{dest.name}: giving up after {failures} failed attempts from {url} ({exc}); "
                        f"{now} bytes kept in {part} for the next run"
                    ) from None
                wait = min(backoff * 2 ** (failures - 1), 60.0)
                log.warning("%s: %s; retry %d/%d in %.1fs", dest.name, exc, failures, retries, wait)
                time.sleep(wait)
    finally:
        if own:
            session.close()


def download(
    url: str,
    dest: Path,
    size: int,
    sha256: str,
    *,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    progress: bool | None = None,
    session: requests.Session | None = None,
) -> Path:
    """Download ``url`` to ``dest``, verified against ``size`` and ``sha256``; return ``dest``.

    No network request is made when ``dest`` is already verified. Partial data lives in
    ``dest.part`` and is resumed with HTTP Range (a server answering 200 restarts it). Up to
    ``retries`` consecutive transient failures are retried with exponential backoff; a
    size/digest mismatch deletes the .part and raises DigestMismatchError. ``progress``:
    True/False forces the tqdm bar on/off, None shows it only on a terminal.
    """
    dest = Path(dest)
    sha256 = sha256.lower()
    if is_verified(dest, size, sha256):
        log.debug("%s: already verified", dest)
        return dest
    if dest.exists():
        # a finished-looking file that does not verify is corrupt: never use it
        log.warning("%s does not match its published digest; downloading it again", dest)
        dest.unlink()
        _sidecar(dest).unlink(missing_ok=True)
    part, (actual, _) = _fetch_with_retries(url, dest, size, retries=retries, backoff=backoff,
                                            timeout=timeout, progress=progress, session=session)
    if actual != sha256:
        raise _mismatch(part, url, dest.name, "SHA-256", sha256, actual)
    os.replace(part, dest)
    _record_verified(dest, sha256)
    return dest


def download_unpinned(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    progress: bool | None = None,
    session: requests.Session | None = None,
) -> tuple[int, str, str]:
    """Download ``url`` to ``dest`` without a known SHA-256; return its (size, SHA-256, MD5).

    Resumable like ``download`` (``dest.part``, HTTP Range, bounded retries with backoff); the
    length the server announced and its validator make sure a resume continues the same file.
    With ``md5`` the finished file must match it: otherwise DigestMismatchError and the .part is
    deleted. Without it the caller is trusting the file on first use.
    """
    dest = Path(dest)
    meta_path = dest.with_name(dest.name + PART_META_SUFFIX)
    part, (sha256, got_md5) = _fetch_with_retries(url, dest, None, retries=retries, backoff=backoff,
                                                  timeout=timeout, progress=progress, session=session,
                                                  meta_path=meta_path)
    assert got_md5 is not None  # an unpinned fetch always takes the MD5
    size = part.stat().st_size
    if md5 is not None and got_md5 != md5.lower():
        meta_path.unlink(missing_ok=True)
        raise _mismatch(part, url, dest.name, "MD5", md5.lower(), got_md5)
    os.replace(part, dest)
    meta_path.unlink(missing_ok=True)
    return size, sha256, got_md5


def fetch_archive(
    archive: Archive, base_url: str, download_dir: Path, **kwargs: object
) -> Path:
    """Download (or reuse) ``archive`` from ``base_url`` into ``download_dir``; return its path."""
    return download(
        url_for(base_url, archive.name), Path(download_dir) / archive.name, archive.size, archive.sha256,
        **kwargs,  # type: ignore[arg-type]
    )


# -- safe extraction --------------------------------------------------------------------------------
Selector = Callable[[str], "str | None"]


def _safe_relpath(name: str, archive: Path) -> str:
    """Normalised relative path of an entry name ('' for the root); UnsafeArchiveError if it could escape."""
    norm = name.replace("\\", "/")  # a Windows-made archive may use backslashes
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if norm.startswith("/") or (len(norm) > 1 and norm[0].isalpha() and norm[1] == ":"):
        raise UnsafeArchiveError(
            f"{archive.name}: entry {name!r} has an absolute path; "
            "refused (it would escape the target folder)"
        )
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive.name}: entry {name!r} contains '..'; refused (it would escape the target folder)"
        )
    return "/".join(parts)


def _link_message(archive: Path, name: str, target: str, *, hard: bool = False) -> str:
    # a symlink resolves from its own folder, a tar hard link from the archive root
    base = "" if hard else posixpath.dirname(name.replace("\\", "/"))
    joined = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    where = "points outside the target folder" if (
        target.startswith("/") or joined == ".." or joined.startswith("../")
    ) else "is a link"
    # links are never extracted: image datasets have none, and a link inside the tree could
    # redirect a later entry's write anywhere
    return f"{archive.name}: entry {name!r} {where} (-> {target!r}); refused"


@dataclass
class _Entry:
    name: str  # as stored in the archive
    out: str  # normalised relative output path
    open: Callable[[], BinaryIO]


@contextmanager
def _entries(archive: Path, select: Selector) -> Iterator[list[_Entry]]:
    """Validated regular-file entries of a zip or tar archive that ``select`` keeps."""
    if zipfile.is_zipfile(archive):
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as exc:
            raise ArchiveError(f"{archive.name}: not a readable zip archive: {exc}") from None
        with zf:
            out: list[_Entry] = []
            for info in zf.infolist():
                rel = _safe_relpath(info.filename, archive)  # every entry, selected or not
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    target = zf.read(info).decode("utf-8", "replace")
                    raise UnsafeArchiveError(_link_message(archive, info.filename, target))
                if info.is_dir() or not rel:
                    continue
                dest = select(rel)
                if dest is not None:
                    out.append(_Entry(info.filename, dest, lambda i=info: zf.open(i)))
            yield out
        return
    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{archive.name}: neither a zip nor a readable tar archive: {exc}") from None
    with tf:
        out = []
        try:
            members = tf.getmembers()
        except tarfile.TarError as exc:
            raise ArchiveError(f"{archive.name}: corrupt tar archive: {exc}") from None
        for m in members:
            rel = _safe_relpath(m.name, archive)
            if m.issym() or m.islnk():
                raise UnsafeArchiveError(_link_message(archive, m.name, m.linkname, hard=m.islnk()))
            if m.isdir() or not rel:
                continue
            if not m.isfile():
                raise UnsafeArchiveError(f"{archive.name}: entry {m.name!r} is a device or fifo; refused")
            dest = select(rel)
            if dest is not None:
                out.append(_Entry(m.name, dest, lambda m=m: tf.extractfile(m)))  # type: ignore[misc]
        yield out


_STAGING, _REPLACED = ".tmp-", ".old-"  # name marks of the temporary siblings of a target folder


def staging_dir(target: Path) -> Path:
    """A new empty sibling of ``target`` to build it in, for ``replace_dir``.

    Siblings that a killed earlier run left (``<name>.tmp-*``, ``<name>.old-*``) are removed first;
    callers hold DVC's repository lock (or their own), so none of them is in use.
    """
    for mark in (_STAGING, _REPLACED):
        for p in target.parent.glob(f"{target.name}{mark}*"):
            shutil.rmtree(p, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{target.name}{_STAGING}", dir=target.parent))


def replace_dir(new: Path, target: Path) -> None:
    """Rename directory ``new`` to ``target``; an existing ``target`` is replaced."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{target.name}{_REPLACED}", dir=target.parent))
    os.rename(target, old / target.name)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def safe_extract(archive: Path, target: Path, select: Selector | None = None) -> dict[str, str]:
    """Extract ``archive`` (zip or tar) into directory ``target``; return {relative path: sha256}.

    ``select(entry_path)`` returns the output path (relative to ``target``) of an entry, or
    None to skip it; the default keeps every regular file under its own path. Every entry,
    selected or not, is checked first: an absolute path, a ``..`` component, a link or a
    device raises UnsafeArchiveError and nothing is written. Output goes to a temporary
    sibling of ``target`` that replaces ``target`` only once everything was extracted.
    """
    archive, target = Path(archive), Path(target)
    select = select or (lambda rel: rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _entries(archive, select) as entries:
        seen: dict[str, str] = {}
        for e in entries:
            out = _safe_relpath(e.out, archive)  # the selector's answer obeys the same rules
            if not out:
                raise ArchiveError(f"{archive.name}: entry {e.name!r} maps to an empty path")
            if out in seen:
                raise ArchiveError(
                    f"{archive.name}: entries {seen[out]!r} and {e.name!r} both map to {out!r}"
                )
            seen[out] = e.name
            e.out = out
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}{_STAGING}", dir=target.parent))
        try:
            digests: dict[str, str] = {}
            for e in entries:
                path = tmp / e.out
                path.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with e.open() as src, open(path, "wb") as dst:
                    while block := src.read(CHUNK):
                        h.update(block)
                        dst.write(block)
                digests[e.out] = h.hexdigest()
            replace_dir(tmp, target)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArchiveError(f"{archive.name}: corrupt entry ({exc})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dict(sorted(digests.items()))


def list_members(archive: Path) -> list[str]:
    """Normalised paths of the regular files in a zip or tar archive (every entry is checked)."""
    names: list[str] = []
    with _entries(Path(archive), lambda rel: rel) as entries:
        names = [e.out for e in entries]
    return names
