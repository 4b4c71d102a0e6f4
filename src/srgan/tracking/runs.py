"""MLflow runs: start, resume and end them (``Run``: params, metrics, tags, datasets, system
metrics, artifacts), their lineage tags (git, MLflow's source tags, params digests, the DVC
experiment), downloads of their files, searches, and the identity of the process that runs one.

Runs are addressed by id, never through MLflow's global "active run". A run whose artifacts live in
another copy of the project (see :mod:`srgan.tracking.store`) is never resumed or written to.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..config import ROOT, TRAINING_SECTIONS, Config
from .store import experiment_id, foreign_artifact_root, get_client, readable_artifact_uri, tracking_uri

log = logging.getLogger(__package__)  # "srgan.tracking": the package's one logger, as before the split

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value is 6000 characters
KERAS_DIR, KERAS_SUFFIX = "model", ".keras"  # a training run's generator: model/<name>.keras
SYSTEM_METRICS_INTERVAL_S = 10  # CPU/memory sampling of training runs (MLflow's own default interval)
DATASET_LOG_ATTEMPTS = 4  # log_inputs tries when another writer inserted the same dataset first
DATASET_LOG_RETRY_S = 0.2  # back-off between those tries (grows per try)


class ArtifactLocationError(RuntimeError):
    """A run keeps its artifacts in another copy of the project: writing there would change it."""


def _is_unique_violation(err: Exception) -> bool:
    """Whether a store refused an insert because another writer inserted the same row first."""
    text = str(err)
    return any(mark in text for mark in ("UNIQUE constraint failed", "IntegrityError", "duplicate key value"))


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
        self.client = get_client()
        self._artifacts_checked = False

    def check_artifact_location(self) -> None:
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
        self.check_artifact_location()
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        self.check_artifact_location()
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self.check_artifact_location()
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.check_artifact_location()
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
    client = get_client()
    run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    return Run(run.info.run_id)


def resume_run(run_id: str) -> Run | None:
    """Reopen an unfinished run (after an interruption); None if it is gone, deleted or FINISHED
    (a finished run is never reopened: its params, curves and model stay as they were)."""
    client = get_client()
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

    client = get_client()
    base = readable_artifact_uri(client.get_run(run_id).info.artifact_uri)
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

    base = readable_artifact_uri(get_client().get_run(run_id).info.artifact_uri)
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


def search_runs(experiment: str, filter_string: str = "") -> list[dict[str, Any]]:
    """Runs of an experiment as plain dicts: id, name, status, params, metrics, tags."""
    client = get_client()
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
    client = get_client()
    exps = [e.experiment_id for e in client.search_experiments()]
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return [r.info.run_id for r in client.search_runs(exps, filter_string=flt)]


def end_if_running(run_id: str, status: str = "KILLED") -> bool:
    """End a run left RUNNING by a dead process; returns whether it was running."""
    client = get_client()
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
    client = get_client()
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return []
    runs = client.search_runs(exps, filter_string=f"attributes.status = 'RUNNING' and tags.`{key}` != ''")
    return [(r.info.run_id, dict(r.data.tags)) for r in runs]


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric of a run."""
    return [(m.step, m.value) for m in get_client().get_metric_history(run_id, key)]
