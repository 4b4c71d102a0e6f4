"""The MLflow store: where it is, its schema created once, a locked or unusable sqlite store, and
experiments (with links into the UI).

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, otherwise ``sqlite:///<repo>/mlflow.db`` so that
``mlflow ui`` started at the repository root shows every run. ``<repo>`` is the original repository
also when DVC runs a stage in a temporary copy (``dvc exp run --temp/--queue``, see
``config.shared_root``): runs outlive the copy. The sqlite schema is created by one
process under a file lock before any writer starts: several processes migrating a fresh sqlite store
at once corrupt it.

A copied or moved project: MLflow stores absolute ``file://`` artifact locations in the database
(relative ones are resolved against the working directory when an experiment is created), so the
copy's ``mlflow.db`` still points into the original folder. When the store is a sqlite file, its
artifacts belong in the ``mlartifacts`` folder beside it; an experiment found pointing into another
folder's ``mlartifacts`` is renamed aside (its runs stay readable) and a new experiment of the same
name is created here, runs of such an experiment are never resumed or written to, and their
artifacts are read from this folder's copy when it has one.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import signal
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .. import limits
from ..config import shared_root
from ..errors import ExpectedError

log = logging.getLogger(__package__)  # "srgan.tracking": the package's one logger, as before the split

ARTIFACT_DIR = "mlartifacts"  # beside a sqlite store: where its experiments keep artifacts
ASIDE_TAG = "srgan.artifacts_elsewhere"  # on an experiment renamed aside: the folder it points into
# MLflow 3's UI opens an experiment in its GenAI view (traces) unless it is tagged as model training
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# ... and the tag alone does not switch 3.17's UI out of it (measured): a link to the experiment with
# this query does, so the stages and `make ui` print such links (see ui_path)
UI_QUERY = "workflowType=machine_learning"


def tracking_uri() -> str:
    """The tracking URI every process of this project uses."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{shared_root() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite store, else the server decides."""
    db = _sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / ARTIFACT_DIR).resolve().as_uri()


def _file_uri_path(uri: str) -> Path | None:
    """The local path of a ``file:`` URI, else None."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "file":
        return None
    return Path(urllib.request.url2pathname(parsed.path))


def foreign_artifact_root(location: str | None, uri: str | None = None) -> Path | None:
    """The ``mlartifacts`` folder of *another* project folder that ``location`` lies in, when the
    store ``uri`` (default: this project's) is a sqlite file: a location copied along with the
    database from the original project. None for this store's own folder, for non-file locations,
    for servers and for locations that are not under an ``mlartifacts`` folder (set up by hand)."""
    own = artifact_root(uri or tracking_uri())
    path = _file_uri_path(location) if location else None
    if own is None or path is None:
        return None
    own_path = _file_uri_path(own)
    path = path.resolve()
    if own_path is not None and path.is_relative_to(own_path):
        return None
    return next((folder for folder in (path, *path.parents) if folder.name == ARTIFACT_DIR), None)


def readable_artifact_uri(artifact_uri: str) -> str:
    """Where to read artifacts stored at ``artifact_uri``: in a copied or moved project, this
    folder's own copy of them (same sub-path under its mlartifacts) when it has one."""
    old = foreign_artifact_root(artifact_uri)
    own = _file_uri_path(artifact_root(tracking_uri()) or "")
    src = _file_uri_path(artifact_uri)
    if old is None or own is None or src is None:
        return artifact_uri
    local = own / src.resolve().relative_to(old)
    return local.as_uri() if local.exists() else artifact_uri


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on a sqlite store (a file beside it) across processes; no-op for servers."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(str(db) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- a locked or unusable sqlite store ---------------------------------------------------------------
LOCKED = "database is locked"  # sqlite's words when another process holds the lock
# sqlite's words for a store that cannot be used as it is -> what to do about it
UNUSABLE = {
    "file is not a database": "move it aside (mv {db} {db}.broken) and run again to start a new store, "
                              "or restore it from a backup",
    "database disk image is malformed": "move it aside (mv {db} {db}.broken) and run again to start a new "
                                        "store, or restore it from a backup",
    "attempt to write a readonly database": "make it (and its folder) writable, or point MLFLOW_TRACKING_URI "
                                            "at a writable store",
    "unable to open database file": "check that its folder exists and is writable, or point "
                                    "MLFLOW_TRACKING_URI elsewhere",
}
LOCK_RETRY_S = 1.0  # pause between tries while a store stays locked (each try waits MLflow's 20 s anyway)
MLFLOW_BUSY_TIMEOUT_S = 20  # MLflow's own sqlite busy timeout (its sessions' PRAGMA busy_timeout)


class TrackingStoreError(ExpectedError):
    """The MLflow store cannot be used: locked for longer than the wait, or not a usable database."""


def lock_wait_s() -> float:
    """How long to wait for a locked sqlite store, beyond MLflow's own busy timeout (seconds):
    ``$SRGAN_MLFLOW_LOCK_WAIT_S``, else :data:`limits.MLFLOW_LOCK_WAIT_S`."""
    text = os.environ.get(limits.MLFLOW_LOCK_WAIT_ENV)
    if text is None:
        return limits.MLFLOW_LOCK_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise TrackingStoreError(f"{limits.MLFLOW_LOCK_WAIT_ENV}={text!r}: expected a number of seconds >= 0")
    return value


class _LockReported(logging.Filter):
    """Drops MLflow's own log records about a locked store (a traceback per try in the store's
    session code, a warning per sample in the system-metrics thread): this module reports the
    lock once, with what it does about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return LOCKED not in text


for _name in ("mlflow.store.db.utils", "mlflow.system_metrics.system_metrics_monitor"):
    logging.getLogger(_name).addFilter(_LockReported())


INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM that arrive during the block take effect right after it (main thread).
    Raised inside one of MLflow's store calls, their KeyboardInterrupt-like exceptions pass MLflow's
    ``except Exception`` rollback, so the process kept sqlite's write lock and then waited on itself
    to close the run (a killed training hung instead of ending KILLED)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in INTERRUPTS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)  # delivered to the restored handler now


def _store_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` against the tracking store: a locked sqlite store is waited for (one
    message, up to :func:`lock_wait_s` after MLflow's own timeout), and a store that cannot be used
    becomes a TrackingStoreError naming it and what to do. Each try is one MLflow call, which MLflow
    rolls back when it fails, so trying it again writes nothing twice."""
    db = _sqlite_path(tracking_uri())
    waited_since: float | None = None
    while True:
        try:
            with signals_held():
                result = fn(*args, **kwargs)
        except Exception as exc:  # MLflow and SQLAlchemy raise several types for these
            if db is None:
                raise
            text = str(exc)
            advice = next((todo for mark, todo in UNUSABLE.items() if mark in text), None)
            if advice is not None:
                reason = next(mark for mark in UNUSABLE if mark in text)
                raise TrackingStoreError(f"MLflow store {db} cannot be used ({reason}): "
                                         + advice.format(db=db)) from None
            if LOCKED not in text:
                raise
            now = time.monotonic()
            if waited_since is None:
                waited_since = now
                log.warning("MLflow store %s is locked by another process (a writer, an open sqlite3 shell?): "
                            "waiting up to %g s more for it (%s)", db, lock_wait_s(), limits.MLFLOW_LOCK_WAIT_ENV)
            elif now - waited_since >= lock_wait_s():
                raise TrackingStoreError(
                    f"MLflow store {db} stayed locked by another process for over "
                    f"{now - waited_since + MLFLOW_BUSY_TIMEOUT_S:.0f} s: "
                    f"end what holds it (fuser {db}) and run again, or wait longer with "
                    f"{limits.MLFLOW_LOCK_WAIT_ENV}=<seconds>") from None
            time.sleep(LOCK_RETRY_S)
            continue
        if waited_since is not None:
            log.warning("MLflow store %s is free again after %.0f s; continuing", db, time.monotonic() - waited_since)
        return result


class _WaitingClient:
    """An ``MlflowClient`` whose every call goes through :func:`_store_call`."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return _store_call(attr, *args, **kwargs)

        return call


def get_client() -> Any:
    """An ``MlflowClient`` of :func:`tracking_uri` whose every call waits out a locked store (for
    this package's modules: the rest of the project goes through their functions)."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # creating the client opens the store (and a new one's schema): waited for like every call
    return _WaitingClient(_store_call(mlflow.MlflowClient, tracking_uri=uri))


def ensure_store() -> None:
    """Create the tracking store's schema from one process (file lock) before parallel writers."""
    uri = tracking_uri()
    if _sqlite_path(uri) is None:
        return
    with _store_lock(uri):
        get_client().search_experiments(max_results=1)  # runs the schema migrations


def _set_aside(client: Any, exp: Any, elsewhere: Path) -> str:
    """Rename an experiment whose artifacts live in another project folder; returns the new name.

    Its id, runs and metrics stay; only new runs need a location in this folder, and MLflow can
    neither change an experiment's location nor hold two experiments of one name.
    """
    base = f"{exp.name} (artifacts in {elsewhere})"
    name, n = base, 1
    while client.get_experiment_by_name(name) is not None:
        n += 1
        name = f"{base} {n}"
    client.rename_experiment(exp.experiment_id, name)
    client.set_experiment_tag(exp.experiment_id, ASIDE_TAG, str(elsewhere))
    log.warning("experiment %r keeps its artifacts in %s, another copy of this project: renamed it to %r; "
                "new runs go to a new %r under %s", exp.name, elsewhere, name, exp.name,
                artifact_root(tracking_uri()))
    return name


def experiment_id(name: str) -> str:
    """Id of experiment ``name``, created (with a local artifact root) if missing, or if the one
    found keeps its artifacts in another copy of the project (see the module docstring)."""
    ensure_store()
    uri = tracking_uri()
    client = get_client()
    with _store_lock(uri):  # one process sets a stale experiment aside, the others then see the new one
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            elsewhere = foreign_artifact_root(exp.artifact_location, uri)
            if elsewhere is None:
                if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # stores made before the tag
                    client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                return exp.experiment_id
            _set_aside(client, exp, elsewhere)
        try:
            return client.create_experiment(name, artifact_location=artifact_root(uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # another process (e.g. a tracking server's client) created it meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


def ui_path(experiment_id: str, run_id: str | None = None) -> str:
    """The ``mlflow ui`` page (after its base URL) of an experiment's runs table, or of one run, in
    the UI's model-training view."""
    run = f"/runs/{run_id}" if run_id else ""
    return f"#/experiments/{experiment_id}{run}?{UI_QUERY}"


def ui_link(experiment: str, run_id: str | None = None, base: str = "http://127.0.0.1:5000") -> str:
    """``ui_path`` as a full link for the local `make ui` server (or ``base``): of ``run_id`` (its own
    experiment), else of the runs table of ``experiment``."""
    exp_id = get_client().get_run(run_id).info.experiment_id if run_id else experiment_id(experiment)
    return f"{base}/{ui_path(exp_id, run_id)}"
