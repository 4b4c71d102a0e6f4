"""Files: atomic writes, JSON, CSV, hashing and the manifest (no TensorFlow here; images: ``images``).

Every output of the project is written through :func:`atomic_write` (a temp file in the same
folder, fsync, rename), so a kill at any moment leaves the previous file or the new one, never a
half-written file that looks whole.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

CHUNK = 1 << 20  # bytes read at a time when hashing / copying
MANIFEST_NAME = "manifest.json"  # data/processed/manifest.json, written last by preprocess
SUMMARY_NAME = "summary.json"  # reports/<stage>/summary.json of a training stage: run id, steps, metrics
HISTORY_NAME = "history.csv"  # reports/<stage>/history.csv: the training curves


# --------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", replace: bool = True,
                 **open_kw: Any) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on success it is fsynced and renamed onto
    ``path``, on any error (or a kill) it is removed and ``path`` is untouched.

    ``replace=False``: FileExistsError, and ``path`` untouched, if ``path`` exists when the file is
    put in place, however late another process created it (see :func:`place_new`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        if replace:
            os.replace(tmp, path)
        else:
            place_new(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# errnos of file systems without hard links (FAT, some network shares): place_new claims the name instead
NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS})


def place_new(tmp: Path, path: Path) -> None:
    """Move the finished file ``tmp`` to ``path`` only if ``path`` does not exist: FileExistsError
    otherwise. One atomic step (a hard link, which fails on an existing name, then the temp name
    is dropped), so two writers racing for one name never replace each other's file, unlike a
    check followed by a rename. Where hard links are not supported, the name is claimed with an
    exclusive create first (a kill between claim and rename can leave that empty file there)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))  # FileExistsError if taken
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path beside ``path`` with the same suffix (for writers that want a file name, such
    as Keras' ``Model.save``); renamed onto ``path`` when the block succeeds, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write pretty, key-sorted JSON atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_csv_atomic(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]],
                     fieldnames: Sequence[str] | None = None, float_format: str | None = None) -> None:
    """Write dict rows as CSV atomically (columns: ``fieldnames`` or the union of the rows' keys)."""
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames))
    w.writeheader()
    for r in rows:
        if float_format:
            r = {k: (format(v, float_format) if isinstance(v, float) else v) for k, v in r.items()}
        w.writerow(r)
    write_text_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- reading
class DataFileError(ValueError):
    """A project file exists but cannot be read (corrupt JSON, wrong shape)."""


def read_json(path: str | os.PathLike[str], default: Any = None, *, strict: bool = False) -> Any:
    """JSON content of ``path``; ``default`` if it does not exist.

    A file that exists but does not parse gives ``default`` too, unless ``strict`` (then a
    DataFileError naming the file): most callers treat a damaged bookkeeping file as absent.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        if strict:
            raise DataFileError(f"{path}: not readable JSON ({exc})") from None
        return default


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings; [] if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """SHA-256 of the canonical (sorted, compact) JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------- processed data
def read_manifest(processed_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """data/processed/manifest.json ({} when absent or damaged: then the data is incomplete)."""
    data = read_json(Path(processed_dir) / MANIFEST_NAME, {})
    return data if isinstance(data, dict) else {}
