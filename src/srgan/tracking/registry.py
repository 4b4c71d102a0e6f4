"""The model registry: register a run's MLflow Model (with the run's metrics), promote the best
version to the ``champion`` alias, and resolve a generator spec (a path, ``runs:/``, ``models:/``)
to a local ``.keras`` file."""

from __future__ import annotations

import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from .mlflow_model import MODEL_ARTIFACT
from .runs import KERAS_SUFFIX, download_model
from .store import get_client

log = logging.getLogger(__package__)  # "srgan.tracking": the package's one logger, as before the split

CHAMPION = "champion"  # registry alias of the version to serve
DEFAULT_MODEL_NAME = "srgan-generator"  # registered model name of the pipeline's generator
RUNS_URI = re.compile(r"^runs:/([0-9A-Za-z_-]+)(?:/model)?/?$")
MODELS_URI = re.compile(r"^models:/([^/@]+)(?:@([^/@]+)|/([0-9]+))/?$")


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

    client = get_client()
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
    get_client().set_registered_model_alias(name, CHAMPION, str(version))


def promote(experiment: str, metric: str, name: str = DEFAULT_MODEL_NAME, higher_is_better: bool = True) -> str:
    """Set ``champion`` on the version of ``name`` whose run is the best FINISHED run of ``experiment``
    by the run metric ``metric`` (ties: the newer version); returns that version.

    Only registered runs compete: a run without a version of ``name`` cannot be served by alias.
    """
    client = get_client()
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
        client = get_client()
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
        return _model_version(get_client(), text).run_id
    return None

