"""MLflow tracking: the only module that imports mlflow.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, otherwise ``sqlite:///<repo>/mlflow.db`` so that
``mlflow ui`` started at the repository root shows every run. ``<repo>`` is the original repository
also when DVC runs a stage in a temporary copy (``dvc exp run --temp/--queue``, see
``config.shared_root``): runs outlive the copy. The sqlite schema is created by one
process under a file lock before any writer starts: several processes migrating a fresh sqlite store
at once corrupt it.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .config import ROOT, TRAINING_SECTIONS, Config, shared_root

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value is 6000 characters


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
    return (db.parent / "mlartifacts").resolve().as_uri()


def _client():
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def ensure_store() -> None:
    """Create the tracking store's schema from one process (file lock) before parallel writers."""
    uri = tracking_uri()
    db = _sqlite_path(uri)
    if db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(str(db) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _client().search_experiments(max_results=1)  # runs the schema migrations
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def experiment_id(name: str) -> str:
    """Id of experiment ``name``, created (with a local artifact root) if missing."""
    ensure_store()
    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(tracking_uri()))
    except Exception:  # another process created it between our get and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_state(root: Path = ROOT) -> dict[str, str]:
    """Commit hash and whether the work tree has uncommitted changes (for lineage tags)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


class Run:
    """One MLflow run, addressed by id (no global 'active run' state, so nesting is explicit)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = _client()

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
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

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
    all_tags = {**git_state(), **{k: v for k, v in (tags or {}).items() if v is not None}}
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
    for p in artifacts or []:
        p = Path(p)
        if p.is_dir():
            run.log_artifacts(p, artifact_path)
        else:
            run.log_artifact(p, artifact_path)


def download_model(run_id: str, dst: Path | None = None) -> Path:
    """Download the generator .keras artifact of a run (``model/*.keras``); returns the local path."""
    import mlflow

    client = _client()
    files = [a.path for a in client.list_artifacts(run_id, "model") if a.path.endswith(".keras")]
    if not files:
        raise FileNotFoundError(f"MLflow run {run_id} has no model/*.keras artifact")
    dst = Path(dst or tempfile.mkdtemp(prefix="srgan-model-"))
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=files[0], dst_path=str(dst))
    return Path(local)


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
