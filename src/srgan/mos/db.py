"""sqlite store of raters and ratings.

WAL mode so readers never block the writer, autocommit so each rating is durable the moment the
request answers (a killed server loses nothing), and UNIQUE(rater, stimulus) so the database
itself, not the app's bookkeeping, guarantees nobody rates a stimulus twice, even under races.
One connection per request: sqlite connections must not be shared between threads.
"""

from __future__ import annotations

import secrets
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
    id          TEXT PRIMARY KEY,
    name        TEXT UNIQUE,             -- NULL for anonymous (cookie-only) raters
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ratings (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    study_id    TEXT NOT NULL,
    rater       TEXT NOT NULL REFERENCES raters(id),
    stimulus    TEXT NOT NULL,
    score       INTEGER NOT NULL CHECK (typeof(score) = 'integer' AND score BETWEEN 1 AND 5),
    created_at  TEXT NOT NULL,
    UNIQUE (rater, stimulus)
);
CREATE INDEX IF NOT EXISTS ratings_study ON ratings(study_id);
"""


class DuplicateRating(Exception):
    """This rater already rated this stimulus."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def connect(path: Path) -> sqlite3.Connection:
    """A new autocommit connection with WAL, full fsync and a busy timeout for concurrent raters."""
    conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def init(path: Path) -> None:
    """Create the database file and schema if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    try:
        conn.executescript(SCHEMA)
    finally:
        conn.close()


def rater_for_name(conn: sqlite3.Connection, name: str | None) -> str:
    """The rater id for ``name`` (created on first use), or a new anonymous rater if None."""
    if name is None:
        rid = secrets.token_hex(16)
        conn.execute("INSERT INTO raters(id, name, created_at) VALUES (?, NULL, ?)", (rid, _now()))
        return rid
    # INSERT OR IGNORE then SELECT: two first visits with the same name at once get one rater.
    conn.execute("INSERT OR IGNORE INTO raters(id, name, created_at) VALUES (?, ?, ?)",
                 (secrets.token_hex(16), name, _now()))
    return conn.execute("SELECT id FROM raters WHERE name = ?", (name,)).fetchone()[0]


def rater_exists(conn: sqlite3.Connection, rater: str) -> bool:
    return conn.execute("SELECT 1 FROM raters WHERE id = ?", (rater,)).fetchone() is not None


def rater_name(conn: sqlite3.Connection, rater: str) -> str | None:
    row = conn.execute("SELECT name FROM raters WHERE id = ?", (rater,)).fetchone()
    return row[0] if row else None


def rated(conn: sqlite3.Connection, study_id: str, rater: str) -> set[str]:
    """Stimulus ids this rater has rated in this study."""
    rows = conn.execute("SELECT stimulus FROM ratings WHERE study_id = ? AND rater = ?", (study_id, rater))
    return {r[0] for r in rows}


def add_rating(conn: sqlite3.Connection, study_id: str, rater: str, stimulus: str, score: int) -> None:
    """Insert one rating (committed on return); DuplicateRating if it exists already."""
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


def load_ratings(path: Path, study_id: str) -> list[tuple[str, str, int]]:
    """Ratings of a study from the database file at ``path`` ([] if there is none yet)."""
    if not Path(path).exists():
        return []
    conn = connect(path)
    try:
        conn.executescript(SCHEMA)  # an empty file from an aborted start still reads as "no ratings"
        return ratings(conn, study_id)
    finally:
        conn.close()
