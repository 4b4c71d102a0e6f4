"""MLflow tracking: the only module that imports mlflow.

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

The generator as an MLflow Model: ``log_generator_model`` adds a pyfunc model ``mlflow_model``
(the ``.keras`` file, the ``srgan`` package as code, a tensor signature, the tile/overlap to
run it with) next to the run's ``model/<name>.keras``; ``register_model``, ``promote`` (the
``champion`` alias) and ``resolve_generator`` (path, ``runs:/``, ``models:/``) work with it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import limits
from .config import ROOT, TRAINING_SECTIONS, Config, shared_root
from .errors import ExpectedError

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value is 6000 characters
ARTIFACT_DIR = "mlartifacts"  # beside a sqlite store: where its experiments keep artifacts
KERAS_DIR, KERAS_SUFFIX = "model", ".keras"  # a training run's generator: model/<name>.keras
ASIDE_TAG = "srgan.artifacts_elsewhere"  # on an experiment renamed aside: the folder it points into
# MLflow 3's UI opens an experiment in its GenAI view (traces) unless it is tagged as model training
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# ... and the tag alone does not switch 3.17's UI out of it (measured): a link to the experiment with
# this query does, so the stages and `make ui` print such links (see ui_path)
UI_QUERY = "workflowType=machine_learning"
SYSTEM_METRICS_INTERVAL_S = 10  # CPU/memory sampling of training runs (MLflow's own default interval)
DATASET_LOG_ATTEMPTS = 4  # log_inputs tries when another writer inserted the same dataset first
DATASET_LOG_RETRY_S = 0.2  # back-off between those tries (grows per try)


class ArtifactLocationError(RuntimeError):
    """A run keeps its artifacts in another copy of the project: writing there would change it."""


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


def _readable_artifact_uri(artifact_uri: str) -> str:
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


def _is_unique_violation(err: Exception) -> bool:
    """Whether a store refused an insert because another writer inserted the same row first."""
    text = str(err)
    return any(mark in text for mark in ("UNIQUE constraint failed", "IntegrityError", "duplicate key value"))


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


def _store_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` against the tracking store: a locked sqlite store is waited for (one
    message, up to :func:`lock_wait_s` after MLflow's own timeout), and a store that cannot be used
    becomes a TrackingStoreError naming it and what to do. Each try is one MLflow call, which MLflow
    rolls back when it fails, so trying it again writes nothing twice."""
    db = _sqlite_path(tracking_uri())
    waited_since: float | None = None
    while True:
        try:
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


def _client() -> Any:
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
        _client().search_experiments(max_results=1)  # runs the schema migrations


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
    client = _client()
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
    exp_id = _client().get_run(run_id).info.experiment_id if run_id else experiment_id(experiment)
    return f"{base}/{ui_path(exp_id, run_id)}"


# What a run runs: its code, its params and the pinned environment (paths relative to the repository).
# Not DVC's bookkeeping (dvc.lock, the .gitignore entries it adds), outputs, docs or tests: a
# change there cannot change a run, and counting it made every run of a fresh clone "dirty".
RUN_INPUTS = ("src", "params.yaml", "dvc.yaml", "pyproject.toml", "requirements.lock", "requirements-nodeps.txt")
SOURCE_TYPE_LOCAL = "LOCAL"  # MLflow's source type of a run started by a local script


def git_state(root: Path = ROOT) -> dict[str, str]:
    """Commit hash, and whether the code or params a run depends on (:data:`RUN_INPUTS`, tracked
    changes and new files) differ from it (for lineage tags)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=all", "--", *RUN_INPUTS))
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def source_tags(commit: str) -> dict[str, str]:
    """MLflow's own source tags (the UI's Source column and its commit): the script that runs,
    relative to the repository when inside it, as a local source at ``commit``."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    main = getattr(sys.modules.get("__main__"), "__file__", None) or (sys.argv[0] if sys.argv else "")
    name = "<console>"
    if main:
        path = Path(main).resolve()
        name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    tags = {MLFLOW_SOURCE_NAME: name, MLFLOW_SOURCE_TYPE: SOURCE_TYPE_LOCAL}
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


class Run:
    """One MLflow run, addressed by id (no global 'active run' state, so nesting is explicit)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = _client()
        self._artifacts_checked = False

    def _check_artifact_location(self) -> None:
        """ArtifactLocationError if this run's artifacts live in another copy of the project."""
        if self._artifacts_checked:
            return
        elsewhere = foreign_artifact_root(self.client.get_run(self.run_id).info.artifact_uri)
        if elsewhere is not None:
            raise ArtifactLocationError(
                f"MLflow run {self.run_id} keeps its artifacts in {elsewhere}, another copy of this project: "
                "not writing there (new runs of this copy log beside its own mlflow.db)")
        self._artifacts_checked = True

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; values already logged with the same value are skipped (resume-safe)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        todo = []
        for k, v in params.items():
            s = str(v)[:MAX_PARAM_LEN]
            if k in existing:
                if existing[k] != s:
                    log.warning("param %s already logged as %r, not %r", k, existing[k], s)
                continue
            todo.append(Param(k, s))
        for i in range(0, len(todo), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=todo[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log finite metrics at ``step`` (non-finite values are dropped with a warning)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            v = float(v)
            if not math.isfinite(v):
                log.warning("metric %s=%s is not finite; not logged", k, v)
                continue
            batch.append(Metric(k, v, ts, step or 0))
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._check_artifact_location()
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        self._check_artifact_location()
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self._check_artifact_location()
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._check_artifact_location()
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_dataset(self, name: str, digest: str, source: Path, context: str) -> None:
        """Record a dataset the run read (the runs table's Dataset column): a folder on disk by name,
        content digest and ``context`` (``training`` / ``validation``)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        ds = Dataset(name=name, digest=digest[:36], source_type="local",
                     source=json.dumps({"uri": Path(source).resolve().as_uri()}))
        inputs = [DatasetInput(ds, [InputTag("mlflow.data.context", context)])]
        # MLflow looks the dataset up, then inserts it: two runs logging the same dataset at once
        # (tuning workers on one server) can both miss it, and the second insert then fails. Once
        # the first has committed, a retry finds the row and only links it to this run.
        for attempt in range(DATASET_LOG_ATTEMPTS):
            try:
                self.client.log_inputs(self.run_id, inputs)
                return
            except MlflowException as err:
                if attempt + 1 == DATASET_LOG_ATTEMPTS or not _is_unique_violation(err):
                    raise
                time.sleep(DATASET_LOG_RETRY_S * (attempt + 1))

    @contextmanager
    def system_metrics(self) -> Iterator[None]:
        """Sample CPU, memory and disk into the run (``system/*`` metrics) while the block runs."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                       resume_logging=True, tracking_uri=tracking_uri())
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def end(self, status: str = "FINISHED") -> None:
        """Terminate with FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)


def start_run(
    experiment: str,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
) -> Run:
    """Create a run (nested under ``parent_run_id`` if given) with git lineage tags."""
    exp_id = experiment_id(experiment)
    git = git_state()
    all_tags = {**git, **source_tags(git["git.commit"]),
                **{k: v for k, v in (tags or {}).items() if v is not None}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if run_name:
        all_tags["mlflow.runName"] = run_name
    client = _client()
    run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    return Run(run.info.run_id)


def resume_run(run_id: str) -> Run | None:
    """Reopen an unfinished run (after an interruption); None if it is gone, deleted or FINISHED
    (a finished run is never reopened: its params, curves and model stay as they were)."""
    client = _client()
    try:
        run = client.get_run(run_id)
    except Exception:
        return None
    if run.info.lifecycle_stage != "active" or run.info.status == "FINISHED":
        return None
    elsewhere = foreign_artifact_root(run.info.artifact_uri)
    if elsewhere is not None:
        log.warning("not resuming MLflow run %s: its artifacts are in %s, another copy of this project; "
                    "starting a new run", run_id, elsewhere)
        return None
    client.update_run(run_id, status="RUNNING")
    return Run(run_id)


@contextmanager
def run_context(run: Run, exception_status: dict[type, str] | None = None) -> Iterator[Run]:
    """End ``run`` FINISHED on success, KILLED on Ctrl-C, FAILED on any error.

    ``exception_status`` maps other exception types to a status (e.g. a pruned trial -> KILLED).
    """
    try:
        yield run
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException as exc:
        status = next((s for t, s in (exception_status or {}).items() if isinstance(exc, t)), "FAILED")
        run.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        run.end(status)
        raise
    else:
        run.end("FINISHED")


# DVC's environment of a stage command -> the run tags that record it
DVC_ENV_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev", "DVC_STAGE": "dvc.stage"}


def config_tags(cfg: Config, manifest_digest: str | None) -> dict[str, str]:
    """Lineage tags: params digest, data manifest digest, the DVC experiment and stage."""
    tags = {"params.digest": cfg.digest(),
            # what shaped the model (not data.*, tune.*, study.*): how the study finds a cell's run
            "params.training_digest": cfg.digest(TRAINING_SECTIONS),
            **{tag: os.environ[var] for var, tag in DVC_ENV_TAGS.items() if os.environ.get(var)},
            # what this process runs with (train.onednn may be overridden by the environment)
            "env.TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")}
    if manifest_digest:
        tags["data.manifest_digest"] = manifest_digest
    return tags


def log_to_run(run_id: str, metrics: dict[str, float], artifacts: list[Path] | None = None,
               artifact_path: str | None = None) -> None:
    """Add metrics and files to an existing (possibly finished) run."""
    run = Run(run_id)
    run.log_metrics(metrics)
    try:
        for p in artifacts or []:
            p = Path(p)
            if p.is_dir():
                run.log_artifacts(p, artifact_path)
            else:
                run.log_artifact(p, artifact_path)
    except ArtifactLocationError as exc:  # the metrics are in this store; the files would land elsewhere
        log.warning("%s; files not logged: %s", exc, ", ".join(str(p) for p in artifacts or []))


def download_model(run_id: str, dst: Path | None = None) -> Path:
    """Download the generator .keras artifact of a run (``model/*.keras``); returns the local path."""
    import mlflow

    client = _client()
    base = _readable_artifact_uri(client.get_run(run_id).info.artifact_uri)
    files = [a.path for a in mlflow.artifacts.list_artifacts(artifact_uri=f"{base}/{KERAS_DIR}")
             if a.path.endswith(KERAS_SUFFIX)]
    if not files:
        raise FileNotFoundError(f"MLflow run {run_id} has no {KERAS_DIR}/*{KERAS_SUFFIX} artifact")
    name = files[0].rsplit("/", 1)[-1]
    dst = Path(dst or tempfile.mkdtemp(prefix="srgan-model-"))
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{KERAS_DIR}/{name}", dst_path=str(dst))
    return Path(local)


def download_artifact(run_id: str, artifact_path: str, dst: Path | None = None) -> Path | None:
    """Download one artifact file of a run (e.g. ``eval/per_image.csv``); None when it has none."""
    import mlflow

    base = _readable_artifact_uri(_client().get_run(run_id).info.artifact_uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="srgan-artifact-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{artifact_path}", dst_path=str(dst)))
    except (OSError, mlflow.exceptions.MlflowException):  # no such artifact (file stores raise OSError)
        return None


def child_runs(experiment: str, parent_run_id: str) -> list[dict[str, Any]]:
    """The runs nested under ``parent_run_id`` (MLflow's parent tag), as :func:`search_runs` rows."""
    return search_runs(experiment, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def process_id() -> str:
    """This process as host:pid (recorded on runs, so a later call can tell a dead one)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_is_dead(worker: str) -> bool:
    """``worker`` (host:pid) names a process of this host that no longer runs."""
    host, _, pid = worker.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:  # a zombie child is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return False


# -- the generator as an MLflow Model ------------------------------------------------------------

MODEL_ARTIFACT = "mlflow_model"  # the MLflow Model's name (artifact path) in a training run
MODEL_TYPE = "srgan-generator"
CHAMPION = "champion"  # registry alias of the version to serve
DEFAULT_MODEL_NAME = "srgan-generator"  # registered model name of the pipeline's generator
PACKAGE_DIR = Path(__file__).resolve().parent  # the srgan package: code_paths of the MLflow Model
PIXEL_MAX = 255.0  # served input values are 8-bit levels, 0..255
# What the served model imports (srgan.tracking/models/inference and their imports), pinned to
# this environment; given explicitly because MLflow would otherwise load the model (TensorFlow) in
# a subprocess to guess them. tensorflow-cpu and tensorflow are alternatives (README: GPU machines).
MODEL_REQUIREMENTS = ("mlflow", ("tensorflow-cpu", "tensorflow"), "keras", "numpy", "pydantic", "pyyaml")
RUNS_URI = re.compile(r"^runs:/([0-9A-Za-z_-]+)(?:/model)?/?$")
MODELS_URI = re.compile(r"^models:/([^/@]+)(?:@([^/@]+)|/([0-9]+))/?$")


MAX_PIXELS_PARAM = "max_pixels"  # the served model's size limit: model config key and request param
SCORING_APP_MODULE = "mlflow.pyfunc.scoring_server.app"  # what `mlflow models serve` imports (uvicorn)
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # MLflow's request timeout; set by `models serve -t`
MAX_ERROR_CHARS = 300  # an MLflow error message kept for the client (after the input echo is cut)
HTTP_BAD_REQUEST, HTTP_TOO_LARGE, HTTP_GATEWAY_TIMEOUT = 400, 413, 504


def _signature(max_pixels: int = limits.SERVE_MAX_PIXELS) -> Any:
    """A batch of equal-size RGB images (N x H x W x 3) in 0..255 -> uint8 N x sH x sW x 3, and the
    ``max_pixels`` param (LR pixels per request, all images together) with its default stated.

    MLflow checks a tensor's dtype exactly, so one float32 input takes both kinds of image: uint8
    images cast exactly, float images on the 0..255 scale; JSON numbers parse to it either way.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, 3))]),
                          outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          params=ParamSchema([ParamSpec(MAX_PIXELS_PARAM, "long", int(max_pixels))]))


def _pip_requirements() -> list[str]:
    from importlib import metadata

    out = []
    for dists in MODEL_REQUIREMENTS:
        for dist in (dists,) if isinstance(dists, str) else dists:
            try:
                out.append(f"{dist}=={metadata.version(dist)}")
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def as_uint8_batch(data: Any) -> np.ndarray:
    """Model input -> uint8 N x H x W x 3: one H x W x 3 image or a batch; uint8 as is, other
    numbers must be finite 8-bit levels in [0, 255] (rounded to the nearest level, as the LR
    input of ``inference.upscale`` is 8-bit). An image of fractions within [0, 1] is refused rather
    than read as near-black 8-bit levels."""
    arr = _image_batch(data)
    if arr.dtype == np.uint8:
        return arr
    finite = np.isfinite(arr)
    if not finite.all() or arr.min() < 0 or arr.max() > PIXEL_MAX:
        got = (f"got values from {float(arr.min()):g} to {float(arr.max()):g}" if finite.all()
               else "got NaN or infinite values")
        raise ValueError(f"pixel values must be 8-bit levels in [0, {PIXEL_MAX:g}], {got} "
                         f"(a [0, 1] float image: multiply by {PIXEL_MAX:g})")
    if arr.max() <= 1 and (arr != np.rint(arr)).any():
        raise ValueError(f"pixel values are fractions within [0, 1]: this model takes 8-bit levels "
                         f"0..{PIXEL_MAX:g}; multiply a [0, 1] image by {PIXEL_MAX:g}")
    return np.rint(arr).astype(np.uint8)


def _image_batch(data: Any) -> np.ndarray:
    """``data`` as an N x H x W x 3 numeric array (one H x W x 3 image gets N = 1), else ValueError
    naming the shape or dtype (never the values)."""
    arr = np.asarray(data)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise ValueError(f"expected RGB images N x H x W x 3 (or one H x W x 3), got shape {arr.shape}")
    if not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"expected numeric pixel values, got dtype {arr.dtype}")
    return arr


def _request_error(message: str, status: int = HTTP_BAD_REQUEST) -> Exception:
    """An MlflowException that MLflow's scoring server answers with ``status`` and ``message``."""
    from mlflow.exceptions import MlflowException

    exc = MlflowException.invalid_parameter_value(message)
    if status != HTTP_BAD_REQUEST:
        exc.get_http_status_code = lambda: status  # e.g. 413: MLflow's error codes have no such status
    return exc


class GeneratorPyfunc:
    """The pyfunc model behind ``mlflow_model``: LR images -> SR images through the project's own
    tiled inference (``inference.upscale``), so a large image never needs more memory than a tile.

    Bounded, for a server: a request of more than ``max_pixels`` LR pixels (all its images) is
    refused before any work with a message naming the limit; a request may lower it with the
    ``max_pixels`` param, never raise it. In `mlflow models serve` the work also stops at MLflow's
    request timeout (the client has had its 504 by then), and :func:`_guard_scoring_server` checks
    each request's size and nesting before MLflow parses it.
    """

    def __init__(self, keras_path: str | Path, tile: int, overlap: int, scale: int,
                 max_pixels: int = limits.SERVE_MAX_PIXELS):
        from . import inference, models  # TensorFlow only where a model is loaded

        self.model = models.load_generator(keras_path)  # safe mode: registered layers only
        self.tile, self.overlap, self.scale = int(tile), int(overlap), int(scale)
        self.max_pixels = int(max_pixels)
        if self.max_pixels < 1:
            raise ValueError(f"{MAX_PIXELS_PARAM} must be >= 1, got {max_pixels}")
        got = inference.infer_scale(self.model)
        if got != self.scale:
            raise ValueError(f"{keras_path}: the generator upscales x{got}, the model was logged as x{self.scale}")

    def limit(self, params: dict[str, Any] | None) -> int:
        """This request's pixel limit: its ``max_pixels`` param (MLflow fills in the signature's
        default when a request has none), capped at the model's own: a request may lower it, never
        raise it."""
        asked = (params or {}).get(MAX_PIXELS_PARAM)
        if asked is None:
            return self.max_pixels
        if int(asked) < 1:
            raise _request_error(f"params {MAX_PIXELS_PARAM} must be >= 1, got {asked}")
        return min(int(asked), self.max_pixels)

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        from . import inference

        limit = self.limit(params)
        try:
            arr = _image_batch(data)
            n, h, w, _ = arr.shape
            too_big = limits.pixel_limit_error(w, h, limit, count=n, raise_hint=(
                f"the limit is {MAX_PIXELS_PARAM}, LR pixels per request (all its images together): "
                "send smaller or fewer images"))
            if too_big:
                raise _request_error(too_big)
            batch = as_uint8_batch(arr)
        except ValueError as exc:
            raise _request_error(str(exc)) from None
        check = _deadline_check()
        return np.stack([inference.upscale(self.model, lr, self.scale, tile=self.tile, overlap=self.overlap,
                                           check=check) for lr in batch])


# When the request being served started (set by the guarded invocations, which runs the model in
# the same thread): the model's deadline then matches the server's, which counts from the request.
_REQUEST = threading.local()


def _deadline_check() -> Any:
    """In a scoring server (MLflow sets its request timeout in the environment): a check that stops
    the tiles once the server has answered 504, as nobody will read the result; else None."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return None
    timeout = float(text)
    deadline = (getattr(_REQUEST, "started", None) or time.monotonic()) + timeout

    def check() -> None:
        if time.monotonic() > deadline:
            raise _request_error(f"stopped after the server's request timeout of {timeout:g} s ({TIMEOUT_ENV}, "
                                 "`mlflow models serve -t`): send a smaller image or raise the timeout",
                                 HTTP_GATEWAY_TIMEOUT)

    return check


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> GeneratorPyfunc:
    """MLflow's loader-module entry point (``mlflow.pyfunc.load_model``, ``mlflow models serve``):
    ``data_path`` is the model's copy of the .keras file, ``model_config`` the logged
    tile/overlap/scale/max_pixels (a model logged before max_pixels existed gets the default)."""
    cfg = model_config or {}
    model = GeneratorPyfunc(data_path, cfg["tile"], cfg["overlap"], cfg["scale"],
                            cfg.get(MAX_PIXELS_PARAM, limits.SERVE_MAX_PIXELS))
    if SCORING_APP_MODULE in sys.modules:  # loaded by `mlflow models serve`'s app (being imported)
        _guard_scoring_server(model.max_pixels)
    return model


def _guard_scoring_server(max_pixels: int) -> None:
    """Check each request before MLflow's scoring server parses it, and keep its errors to the point.

    MLflow's scoring server (``mlflow.pyfunc.scoring_server.invocations``, called per request) reads
    the body, ``json.loads`` it, casts it to the signature and only then calls the model. That parse
    is where a big or hostile request costs: ~100 bytes of Python lists per number, and JSON nested
    100,000 deep is a RecursionError, i.e. a 500. Its error messages also repeat the input (the
    parsed array, or the whole body for bad JSON). So, in the scoring server's own process, each
    request first passes :func:`_check_request` (one pass over the bytes, nothing parsed) and any
    MlflowException it ends in is re-raised with the input cut out (:func:`_without_input`).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    original = scoring_server.invocations
    if getattr(original, "srgan_guard", False):
        return

    def invocations(data: Any, content_type: Any, model: Any, input_schema: Any) -> Any:
        _REQUEST.started = time.monotonic()
        try:
            _check_request(data, content_type, max_pixels)
            return original(data, content_type, model, input_schema)
        except MlflowException as exc:
            clean = _request_error(_without_input(exc.message), exc.get_http_status_code())
            clean.error_code = exc.error_code
            raise clean from None
        finally:
            _REQUEST.started = None

    invocations.srgan_guard = True  # type: ignore[attr-defined]
    scoring_server.invocations = invocations
    log.info("requests limited to %s LR pixels, JSON nesting to %d", f"{max_pixels:,}", limits.SERVE_MAX_JSON_DEPTH)


BODY_SLACK_BYTES = 64 * 1024  # room for the JSON keys and params around the pixels
JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')  # a JSON string literal (its brackets are not nesting)


def _check_request(data: Any, content_type: Any, max_pixels: int) -> None:
    """Refuse a request body that cannot hold an allowed image (413) or JSON nested deeper than an
    image batch (400), before anything is parsed."""
    size = len(data) if isinstance(data, (bytes, bytearray, str)) else 0
    cap = max_pixels * limits.SERVE_BODY_BYTES_PER_PIXEL + BODY_SLACK_BYTES
    if size > cap:
        raise _request_error(
            f"request body of {size / 1e6:.1f} MB is over this server's {cap / 1e6:.1f} MB "
            f"({limits.SERVE_BODY_BYTES_PER_PIXEL} bytes per pixel of its limit of {max_pixels:,} LR pixels "
            f"per request, {MAX_PIXELS_PARAM}): send smaller or fewer images", HTTP_TOO_LARGE)
    if "json" in str(content_type or "").lower() and size:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        depth = _json_depth(raw)
        if depth > limits.SERVE_MAX_JSON_DEPTH:
            raise _request_error(f"JSON nested {depth} levels deep; a request is nested at most "
                                 f"{limits.SERVE_MAX_JSON_DEPTH} ({{\"inputs\": N x H x W x 3}} is 5)")


def _json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in JSON ``raw`` (brackets inside strings do not count):
    vectorised, no recursion, so 100,000 levels cost what 100,000 bytes cost."""
    text = np.frombuffer(JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    step = np.zeros(text.shape, np.int32)
    step[(text == ord("[")) | (text == ord("{"))] = 1
    step[(text == ord("]")) | (text == ord("}"))] = -1
    return int(np.cumsum(step).max(initial=0))


def _without_input(message: str) -> str:
    """MLflow's error message with the copy of the input it adds cut out, on one line.

    The scoring server prefixes ``Failed to predict data '<the input>'. \nError: `` to a model's
    error, schema enforcement says ``Failed to enforce schema of data '<the input>' with schema
    ...'. Error: ``, and a JSON error ends with ``Input: <the whole body>``.
    """
    text = str(message)
    if text.startswith("Failed to predict data '") and "\nError: " in text:
        text = text.split("\nError: ", 1)[1]
    if text.startswith("Failed to enforce schema of data '") and "'. Error: " in text:
        text = "the input does not match the model's signature: " + text.rsplit("'. Error: ", 1)[1]
    text = text.split("\nInput:", 1)[0]
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def log_generator_model(run_id: str, keras_path: Path, tile: int, overlap: int, scale: int,
                        max_pixels: int = limits.SERVE_MAX_PIXELS) -> str:
    """Log ``keras_path`` as run ``run_id``'s MLflow Model ``mlflow_model``; returns its ``models:/`` URI.

    A pyfunc model loaded by this module (``loader_module``), so the flavour needs no pickled code:
    the .keras file as data, the srgan package as ``code_paths`` (a serving process imports it from
    there), the signature of ``_signature``, and ``tile``/``overlap``/``scale``/``max_pixels`` as its
    model config (overridable when loading, and when serving with ``SERVING_MODEL_CONFIG``). The run
    keeps its ``model/<name>.keras`` for the project's scripts.
    """
    import mlflow
    from mlflow.models import Model

    Run(run_id)._check_artifact_location()  # the model's files would go beside the run's
    client = _client()
    run = client.get_run(run_id)
    config = {"tile": int(tile), "overlap": int(overlap), "scale": int(scale), MAX_PIXELS_PARAM: int(max_pixels)}
    # Created explicitly in the run's experiment: without an active run MLflow would file the
    # model under the default experiment (and its artifact location).
    logged = mlflow.initialize_logged_model(name=MODEL_ARTIFACT, source_run_id=run_id,
                                            experiment_id=run.info.experiment_id, model_type=MODEL_TYPE,
                                            params={k: str(v) for k, v in config.items()})
    with warnings.catch_warnings():
        # No input example on purpose: MLflow would load and run the model (TensorFlow, and the
        # code copy first on sys.path) in this process to validate it; the signature says it all.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        info = Model.log(artifact_path=None, name=MODEL_ARTIFACT, flavor=mlflow.pyfunc, run_id=run_id,
                         model_id=logged.model_id, loader_module=__name__, data_path=str(keras_path),
                         code_paths=[str(PACKAGE_DIR)], signature=_signature(max_pixels),
                         pip_requirements=_pip_requirements(), model_config=config)
    return info.model_uri


def _run_model_id(client: Any, run: Any) -> str:
    """Id of the newest ready ``mlflow_model`` logged by ``run``."""
    outputs = run.outputs.model_outputs if run.outputs else []
    found = [m for m in (client.get_logged_model(o.model_id) for o in outputs)
             if m.name == MODEL_ARTIFACT and str(m.status) == "READY"]
    if not found:
        raise LookupError(f"MLflow run {run.info.run_id} has no {MODEL_ARTIFACT!r} model "
                          "(log it with tracking.log_generator_model)")
    return max(found, key=lambda m: m.creation_timestamp).model_id


def register_model(run_id: str, name: str = DEFAULT_MODEL_NAME) -> str:
    """Register run ``run_id``'s ``mlflow_model`` as a new version of ``name``; returns the version.

    The run's metrics as they are now (e.g. the evaluate stage's ``eval/...``, logged after the
    model) are attached to the model first, so the registry shows them with the version.
    """
    import mlflow
    from mlflow.entities import Metric

    client = _client()
    run = client.get_run(run_id)
    model_id = _run_model_id(client, run)
    batch = []
    for key in run.data.metrics:
        last = max(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        # the run's own point (same timestamp and step), so the run's history gains no duplicate
        batch.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id))
    for i in range(0, len(batch), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=batch[i : i + 1000])
    version = mlflow.register_model(f"models:/{model_id}", name).version
    log.info("registered %s of run %s as %s version %s", MODEL_ARTIFACT, run_id, name, version)
    return str(version)


def set_champion(name: str, version: str | int) -> None:
    """Point the ``champion`` alias of registered model ``name`` at ``version``."""
    _client().set_registered_model_alias(name, CHAMPION, str(version))


def promote(experiment: str, metric: str, name: str = DEFAULT_MODEL_NAME, higher_is_better: bool = True) -> str:
    """Set ``champion`` on the version of ``name`` whose run is the best FINISHED run of ``experiment``
    by the run metric ``metric`` (ties: the newer version); returns that version.

    Only registered runs compete: a run without a version of ``name`` cannot be served by alias.
    """
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r}")
    best: tuple[tuple[float, int], str] | None = None
    for mv in _model_versions(client, name):
        try:
            run = client.get_run(mv.run_id)
        except Exception:  # noqa: BLE001 - a deleted run's version cannot be the champion
            log.debug("model %s version %s: run %s is gone", name, mv.version, mv.run_id)
            continue
        value = run.data.metrics.get(metric)
        if (run.info.experiment_id != exp.experiment_id or run.info.status != "FINISHED"
                or value is None or not math.isfinite(value)):
            continue
        key = (value if higher_is_better else -value, int(mv.version))
        if best is None or key > best[0]:
            best = (key, str(mv.version))
    if best is None:
        raise LookupError(f"no FINISHED run of experiment {experiment!r} with metric {metric!r} "
                          f"has a version of registered model {name!r}")
    set_champion(name, best[1])
    log.info("%s@%s -> version %s (%s %s)", name, CHAMPION, best[1], metric,
             best[0][0] if higher_is_better else -best[0][0])
    return best[1]


def _model_versions(client: Any, name: str) -> list[Any]:
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def _model_version(client: Any, spec: str) -> Any:
    """The registry entry of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    from mlflow.exceptions import MlflowException

    m = MODELS_URI.match(spec)
    if not m:
        raise ValueError(f"{spec}: expected models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, version = m.groups()
    try:
        return (client.get_model_version_by_alias(name, alias) if alias
                else client.get_model_version(name, version))
    except MlflowException as exc:
        raise FileNotFoundError(f"{spec}: no such registered model version ({exc.message})") from None


def resolve_generator(spec: str | Path, dst: Path | None = None) -> Path:
    """A local ``.keras`` generator for ``spec``: a file path (checked), ``runs:/<run id>[/model]``
    (the run's ``model/*.keras``), or ``models:/<name>@<alias>`` / ``models:/<name>/<version>``
    (the registered MLflow Model's copy), downloaded into ``dst`` (default: a new temp folder)."""
    import mlflow

    text = str(spec)
    if text.startswith("runs:/"):
        m = RUNS_URI.match(text)
        if not m:
            raise ValueError(f"{text}: expected runs:/<run id> or runs:/<run id>/model")
        return download_model(m.group(1), dst)
    if text.startswith("models:/"):
        client = _client()
        mv = _model_version(client, text)
        source = client.get_model_version_download_uri(mv.name, mv.version)
        dst = Path(dst or tempfile.mkdtemp(prefix="srgan-model-"))
        # only the model's data folder (the .keras file), not its code and environment files
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/data",
                                                         dst_path=str(dst)))
        found = sorted(local.rglob(f"*{KERAS_SUFFIX}"))
        if len(found) != 1:
            raise FileNotFoundError(f"{text}: expected one {KERAS_SUFFIX} file in the model, found {len(found)}")
        return found[0]
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"{text}: no such generator file")
    return path


def generator_run_id(spec: str | Path) -> str | None:
    """The MLflow run a generator spec comes from (``runs:/`` or the registered version's run), else None."""
    text = str(spec)
    if text.startswith("runs:/"):
        m = RUNS_URI.match(text)
        return m.group(1) if m else None
    if text.startswith("models:/"):
        return _model_version(_client(), text).run_id
    return None


def search_runs(experiment: str, filter_string: str = "") -> list[dict[str, Any]]:
    """Runs of an experiment as plain dicts: id, name, status, params, metrics, tags."""
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    out = []
    page_token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=filter_string,
                                  max_results=500, page_token=page_token)
        for r in page:
            out.append({
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "status": r.info.status,
                "start_time": r.info.start_time,
                "params": dict(r.data.params),
                "metrics": dict(r.data.metrics),
                "tags": dict(r.data.tags),
            })
        page_token = page.token
        if not page_token:
            break
    return out


def search_runs_by_tags(tags: dict[str, str]) -> list[str]:
    """Ids of runs (any experiment) whose tags match all of ``tags``."""
    client = _client()
    exps = [e.experiment_id for e in client.search_experiments()]
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return [r.info.run_id for r in client.search_runs(exps, filter_string=flt)]


def end_if_running(run_id: str, status: str = "KILLED") -> bool:
    """End a run left RUNNING by a dead process; returns whether it was running."""
    client = _client()
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - gone or deleted: nothing to end
        return False
    if run.info.status != "RUNNING":
        return False
    client.set_terminated(run_id, status=status)
    return True


def running_runs_with_tag(key: str) -> list[tuple[str, dict[str, str]]]:
    """(run id, tags) of RUNNING runs, in any experiment, that carry tag ``key``."""
    client = _client()
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return []
    runs = client.search_runs(exps, filter_string=f"attributes.status = 'RUNNING' and tags.`{key}` != ''")
    return [(r.info.run_id, dict(r.data.tags)) for r in runs]


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric of a run."""
    return [(m.step, m.value) for m in _client().get_metric_history(run_id, key)]
