"""MLflow tracking: the only package that imports mlflow. One module per job:

- :mod:`.store`: where the store is (``MLFLOW_TRACKING_URI``, else ``<repo>/mlflow.db``), its schema
  created once, a locked sqlite store waited for and an unusable one named in one line, experiments
  (model-training kind, set aside when their artifacts are in another copy of the project), UI links;
- :mod:`.runs`: runs (start, resume, end, params, metrics, datasets, system metrics, artifacts),
  lineage tags (git, MLflow source tags, params digests, the DVC experiment), downloads, searches,
  the process that runs one;
- :mod:`.mlflow_model`: the generator as a pyfunc MLflow Model, bounded by ``max_pixels`` and guarded
  in `mlflow models serve`;
- :mod:`.registry`: ``register_model``, ``promote`` (the ``champion`` alias), ``resolve_generator``
  (path, ``runs:/``, ``models:/``).

The rest of the project uses the names re-exported here (``from srgan import tracking;
tracking.start_run(...)``), never the modules' own.
"""

from __future__ import annotations

from .mlflow_model import (
    BODY_SLACK_BYTES,
    HTTP_BAD_REQUEST,
    HTTP_GATEWAY_TIMEOUT,
    HTTP_TOO_LARGE,
    JSON_STRING,
    LOADER_MODULE,
    MAX_ERROR_CHARS,
    MAX_PIXELS_PARAM,
    MODEL_ARTIFACT,
    MODEL_REQUIREMENTS,
    MODEL_TYPE,
    PACKAGE_DIR,
    PIXEL_MAX,
    SCORING_APP_MODULE,
    TIMEOUT_ENV,
    GeneratorPyfunc,
    as_uint8_batch,
    load_pyfunc,
    log_generator_model,
)
from .registry import (
    CHAMPION,
    DEFAULT_MODEL_NAME,
    MODELS_URI,
    RUNS_URI,
    generator_run_id,
    promote,
    register_model,
    resolve_generator,
    set_champion,
)
from .runs import (
    DATASET_LOG_ATTEMPTS,
    DATASET_LOG_RETRY_S,
    DVC_ENV_TAGS,
    KERAS_DIR,
    KERAS_SUFFIX,
    MAX_PARAM_LEN,
    RUN_INPUTS,
    SOURCE_TYPE_LOCAL,
    SYSTEM_METRICS_INTERVAL_S,
    ArtifactLocationError,
    Run,
    child_runs,
    config_tags,
    download_artifact,
    download_model,
    end_if_running,
    git_state,
    log_to_run,
    metric_history,
    process_id,
    process_is_dead,
    resume_run,
    run_context,
    running_runs_with_tag,
    search_runs,
    search_runs_by_tags,
    source_tags,
    start_run,
)
from .store import (
    ARTIFACT_DIR,
    ASIDE_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    LOCK_RETRY_S,
    LOCKED,
    MLFLOW_BUSY_TIMEOUT_S,
    UI_QUERY,
    UNUSABLE,
    TrackingStoreError,
    artifact_root,
    ensure_store,
    experiment_id,
    foreign_artifact_root,
    lock_wait_s,
    tracking_uri,
    ui_link,
    ui_path,
)

# MLflow's loader-module protocol: a model logged with loader_module="srgan.tracking" (LOADER_MODULE)
# is loaded by calling this module's ``_load_pyfunc``; the name is MLflow's, the function lives in
# mlflow_model.
_load_pyfunc = load_pyfunc

__all__ = [  # the public names of every module above
    "ARTIFACT_DIR", "ASIDE_TAG", "BODY_SLACK_BYTES", "CHAMPION", "DATASET_LOG_ATTEMPTS",
    "DATASET_LOG_RETRY_S", "DEFAULT_MODEL_NAME", "DVC_ENV_TAGS", "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG", "HTTP_BAD_REQUEST", "HTTP_GATEWAY_TIMEOUT", "HTTP_TOO_LARGE", "JSON_STRING",
    "KERAS_DIR", "KERAS_SUFFIX", "LOADER_MODULE", "LOCKED", "LOCK_RETRY_S", "MAX_ERROR_CHARS",
    "MAX_PARAM_LEN", "MAX_PIXELS_PARAM", "MLFLOW_BUSY_TIMEOUT_S", "MODELS_URI", "MODEL_ARTIFACT",
    "MODEL_REQUIREMENTS", "MODEL_TYPE", "PACKAGE_DIR", "PIXEL_MAX", "RUNS_URI", "RUN_INPUTS",
    "SCORING_APP_MODULE", "SOURCE_TYPE_LOCAL", "SYSTEM_METRICS_INTERVAL_S", "TIMEOUT_ENV", "UI_QUERY",
    "UNUSABLE", "ArtifactLocationError", "GeneratorPyfunc", "Run", "TrackingStoreError", "artifact_root",
    "as_uint8_batch", "child_runs", "config_tags", "download_artifact", "download_model",
    "end_if_running", "ensure_store", "experiment_id", "foreign_artifact_root", "generator_run_id",
    "git_state", "load_pyfunc", "lock_wait_s", "log_generator_model", "log_to_run", "metric_history",
    "process_id", "process_is_dead", "promote", "register_model", "resolve_generator", "resume_run",
    "run_context", "running_runs_with_tag", "search_runs", "search_runs_by_tags", "set_champion",
    "source_tags", "start_run", "tracking_uri", "ui_link", "ui_path",
]
