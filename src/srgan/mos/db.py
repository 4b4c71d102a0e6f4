"""sqlite store of raters and ratings, and of every study version the app served.

WAL mode so readers never block the writer, autocommit so each rating is durable the moment the
request answers (a killed server loses nothing), and UNIQUE(rater, stimulus) so the database
itself, not the app's bookkeeping, guarantees nobody rates a stimulus twice, even under races.
One connection per request: sqlite connections must not be shared between threads.

A rater is known by a secret token the server issues (kept in a cookie); the table holds only
its SHA-256, so a copy of the database does not let anyone act as a rater. The name is a label
for the experimenter, never a credential. Reading ratings (``load_ratings``, for the reports)
opens the file read-only and never runs DDL.

A rating is (study version, stimulus): the app records each version's study.json here when it
starts serving it (``register_study``), so re-preparing the study (new stimuli, new methods) never
makes earlier ratings unattributable, even once the study folder holds another version.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .scale import MAX_SCORE, MIN_SCORE

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS raters (
    id          TEXT PRIMARY KEY,        -- public id: in ratings, the results and the API
    name        TEXT UNIQUE,             -- display label; NULL for anonymous raters
    created_at  TEXT NOT NULL,
    token_hash  TEXT                     -- sha256 of the secret token; NULL: cannot sign in
);
CREATE TABLE IF NOT EXISTS ratings (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    study_id    TEXT NOT NULL,
    rater       TEXT NOT NULL REFERENCES raters(id),
    stimulus    TEXT NOT NULL,
    score       INTEGER NOT NULL
                CHECK (typeof(score) = 'integer' AND score BETWEEN {MIN_SCORE} AND {MAX_SCORE}),
    created_at  TEXT NOT NULL,
    UNIQUE (rater, stimulus)
);
CREATE INDEX IF NOT EXISTS ratings_study ON ratings(study_id);
CREATE TABLE IF NOT EXISTS settings (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (      -- every study version the app served, as it served it
    study_id    TEXT PRIMARY KEY,
    registered_at TEXT NOT NULL,
    meta        TEXT NOT NULL             -- its study.json: stimulus -> image, method, run
);
CREATE TABLE IF NOT EXISTS study_stimuli (
    stimulus    TEXT NOT NULL,
    study_id    TEXT NOT NULL REFERENCES studies(study_id),
    PRIMARY KEY (stimulus, study_id)
);
"""
# After the migration below: a database from before tokens has no token_hash column yet.
TOKEN_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS raters_token ON raters(token_hash)"

TOKEN_BYTES = 15  # 120 bits, 24 base32 characters: unguessable, and still typable as a resume code
TOKEN = re.compile(r"[A-Z2-7]{24}")  # used with fullmatch
LOOKALIKES = str.maketrans("018", "OIB")
SECRET_KEY = "csrf_secret"
BUSY_TIMEOUT_S = 10.0


class RatingsError(Exception):
    """The ratings database is missing, not sqlite, or not a ratings database."""


class DuplicateRating(Exception):
    """This rater already rated this stimulus."""


class NameTaken(Exception):
    """Another rater already uses this name (case-insensitively)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def connect(path: Path) -> sqlite3.Connection:
    """A new autocommit connection with WAL, full fsync and a busy timeout for concurrent raters."""
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    return conn


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT: what is read inside stays true until the write commits."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def init(path: Path) -> None:
    """Create the database file and schema if needed; migrate a database from before tokens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = connect(path)
    except sqlite3.DatabaseError as exc:
        raise RatingsError(f"{path}: not a sqlite database ({exc})") from None
    try:
        conn.executescript(SCHEMA)
        with write_transaction(conn):
            columns = {r[1] for r in conn.execute("PRAGMA table_info(raters)")}
            if "token_hash" not in columns:
                # Raters of the old name-only scheme keep their ratings but cannot sign in again:
                # their name was the only thing needed to act as them.
                conn.execute("ALTER TABLE raters ADD COLUMN token_hash TEXT")
            conn.execute(TOKEN_INDEX)
    except sqlite3.DatabaseError as exc:
        raise RatingsError(f"{path}: not a usable ratings database ({exc})") from None
    finally:
        conn.close()


def app_secret(conn: sqlite3.Connection) -> bytes:
    """The server's HMAC key for CSRF tokens, created once and kept, so a restart keeps forms valid."""
    conn.execute("INSERT OR IGNORE INTO settings(key, value) VALUES (?, ?)",
                 (SECRET_KEY, secrets.token_hex(32)))
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (SECRET_KEY,)).fetchone()
    return bytes.fromhex(row[0])


def normalize_token(text: str) -> str | None:
    """A token as typed (any case, with dashes or spaces) -> canonical form, or None if malformed."""
    # Base32 has no 0, 1 or 8: read as the letters they are mistaken for when copied by eye.
    token = re.sub(r"[\s-]", "", text).upper().translate(LOOKALIKES)
    return token if TOKEN.fullmatch(token) else None


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_rater(conn: sqlite3.Connection, name: str | None) -> tuple[str, str]:
    """A new rater -> (public id, secret token); NameTaken if ``name`` is in use (ASCII case aside)."""
    rid = secrets.token_hex(16)
    token = base64.b32encode(secrets.token_bytes(TOKEN_BYTES)).decode()
    with write_transaction(conn):
        # Checked inside the write transaction: two first visits with one name cannot both pass.
        if name is not None and conn.execute(
            "SELECT 1 FROM raters WHERE name = ? COLLATE NOCASE", (name,)
        ).fetchone():
            raise NameTaken(name)
        conn.execute("INSERT INTO raters(id, name, created_at, token_hash) VALUES (?, ?, ?, ?)",
                     (rid, name, _now(), _token_hash(token)))
    return rid, token


def rater_for_token(conn: sqlite3.Connection, token: str) -> str | None:
    """The rater id a secret token belongs to, or None."""
    row = conn.execute("SELECT id FROM raters WHERE token_hash = ?", (_token_hash(token),)).fetchone()
    return row[0] if row else None


def rater_name(conn: sqlite3.Connection, rater: str) -> str | None:
    """The rater's display name (None for anonymous raters)."""
    row = conn.execute("SELECT name FROM raters WHERE id = ?", (rater,)).fetchone()
    return row[0] if row else None


def rated(conn: sqlite3.Connection, study_id: str, rater: str) -> set[str]:
    """Stimulus ids this rater has rated in this study."""
    rows = conn.execute("SELECT stimulus FROM ratings WHERE study_id = ? AND rater = ?", (study_id, rater))
    return {r[0] for r in rows}


def add_rating(conn: sqlite3.Connection, study_id: str, rater: str, stimulus: str, score: int) -> None:
    """Insert one rating (committed on return outside a transaction); DuplicateRating if it exists."""
    try:
        conn.execute(
            "INSERT INTO ratings(study_id, rater, stimulus, score, created_at) VALUES (?, ?, ?, ?, ?)",
            (study_id, rater, stimulus, int(score), _now()),
        )
    except sqlite3.IntegrityError as exc:
        if "UNIQUE" in str(exc):
            raise DuplicateRating(stimulus) from None
        raise


def ratings(conn: sqlite3.Connection, study_id: str) -> list[tuple[str, str, int]]:
    """All (rater, stimulus, score) of a study, in insertion order."""
    rows = conn.execute("SELECT rater, stimulus, score FROM ratings WHERE study_id = ? ORDER BY id", (study_id,))
    return [(r[0], r[1], int(r[2])) for r in rows]


def register_study(conn: sqlite3.Connection, study_id: str, meta: dict[str, Any]) -> None:
    """Record a study version (its study.json ``meta``) the first time it is served."""
    with write_transaction(conn):
        if conn.execute("SELECT 1 FROM studies WHERE study_id = ?", (study_id,)).fetchone():
            return
        conn.execute("INSERT INTO studies(study_id, registered_at, meta) VALUES (?, ?, ?)",
                     (study_id, _now(), json.dumps(meta, sort_keys=True)))
        conn.executemany("INSERT INTO study_stimuli(stimulus, study_id) VALUES (?, ?)",
                         [(sid, study_id) for sid in meta.get("stimuli", {})])


def versions_with(conn: sqlite3.Connection, stimulus: str) -> set[str]:
    """The registered study versions that hold ``stimulus``."""
    rows = conn.execute("SELECT study_id FROM study_stimuli WHERE stimulus = ?", (stimulus,))
    return {r[0] for r in rows}


def load_ratings(path: Path, study_id: str) -> list[tuple[str, str, int]]:
    """Ratings of a study from the database file at ``path``, opened read-only.

    An empty database (a start aborted before the schema) has no ratings; a missing file, a file
    that is not sqlite, or a sqlite database without a ratings table is a RatingsError.
    """
    with _read_only(path) as conn:
        return ratings(conn, study_id) if conn is not None else []


def load_study_meta(path: Path, study_id: str) -> dict[str, Any] | None:
    """The study.json of a version the app served (None if it never served it), read-only."""
    with _read_only(path) as conn:
        if conn is None or not _has_table(conn, "studies"):
            return None
        row = conn.execute("SELECT meta FROM studies WHERE study_id = ?", (study_id,)).fetchone()
        return json.loads(row[0]) if row else None


def ratings_per_study(path: Path) -> dict[str, int]:
    """How many ratings each study version has, read-only."""
    with _read_only(path) as conn:
        if conn is None:
            return {}
        rows = conn.execute("SELECT study_id, COUNT(*) FROM ratings GROUP BY study_id ORDER BY MIN(id)")
        return {r[0]: int(r[1]) for r in rows}


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection | None]:
    """The ratings database at ``path`` opened read-only (None: an empty database); RatingsError for
    a missing file, a file that is not sqlite, or a sqlite database without a ratings table."""
    path = Path(path)
    if not path.is_file():
        raise RatingsError(f"{path}: no ratings database (nobody has rated this study yet, or a wrong --db)")
    try:
        # mode=ro: sqlite refuses every write, and a missing file is not created.
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise RatingsError(f"{path}: cannot open the ratings database ({exc})") from None
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            yield None
            return
        if "ratings" not in tables:
            raise RatingsError(f"{path}: a sqlite database, but not a ratings database (no ratings table)")
        yield conn
    except sqlite3.DatabaseError as exc:
        raise RatingsError(f"{path}: not a sqlite ratings database ({exc})") from None
    finally:
        conn.close()
