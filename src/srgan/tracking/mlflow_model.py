"""The generator as an MLflow Model: ``log_generator_model`` adds a pyfunc model ``mlflow_model``
(the ``.keras`` file, the ``srgan`` package as code, a tensor signature, the tile/overlap to run it
with) next to the run's ``model/<name>.keras``, and ``GeneratorPyfunc`` serves it, bounded by
``max_pixels`` and, in `mlflow models serve`, guarded before MLflow parses a request.

MLflow loads the model through its ``loader_module``, which is the package ``srgan.tracking`` (as it
was before the package was split into modules, so models logged either way load with either code):
the package's ``_load_pyfunc`` is :func:`load_pyfunc` here.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .. import limits
from .runs import Run
from .store import get_client

log = logging.getLogger(__package__)  # "srgan.tracking": the package's one logger, as before the split

MODEL_ARTIFACT = "mlflow_model"  # the MLflow Model's name (artifact path) in a training run
MODEL_TYPE = "srgan-generator"
LOADER_MODULE = __package__  # what MLflow imports to load the model: srgan.tracking (its _load_pyfunc)
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the srgan package: code_paths of the MLflow Model
PIXEL_MAX = 255.0  # served input values are 8-bit levels, 0..255
# What the served model imports (srgan.tracking/models/inference and their imports), pinned to
# this environment; given explicitly because MLflow would otherwise load the model (TensorFlow) in
# a subprocess to guess them. tensorflow-cpu and tensorflow are alternatives (README: GPU machines).
MODEL_REQUIREMENTS = ("mlflow", ("tensorflow-cpu", "tensorflow"), "keras", "numpy", "pydantic", "pyyaml")


MAX_PIXELS_PARAM = "max_pixels"  # the served model's size limit: model config key and request param
# The model config (overridable at load time). MLflow also logs it as params of the source run.
MODEL_CONFIG_KEYS = ("tile", "overlap", "scale", MAX_PIXELS_PARAM)
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
        from .. import inference, models  # TensorFlow only where a model is loaded

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
        from .. import inference

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


def load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> GeneratorPyfunc:
    """MLflow's loader-module entry point, as ``srgan.tracking._load_pyfunc`` (``mlflow.pyfunc.load_model``,
    ``mlflow models serve``):
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

    A pyfunc model loaded by this package (``loader_module``), so the flavour needs no pickled code:
    the .keras file as data, the srgan package as ``code_paths`` (a serving process imports it from
    there), the signature of ``_signature``, and ``tile``/``overlap``/``scale``/``max_pixels`` as its
    model config (overridable when loading, and when serving with ``SERVING_MODEL_CONFIG``). The run
    keeps its ``model/<name>.keras`` for the project's scripts.
    """
    import mlflow
    from mlflow.models import Model

    Run(run_id).check_artifact_location()  # the model's files would go beside the run's
    client = get_client()
    run = client.get_run(run_id)
    config = dict(zip(MODEL_CONFIG_KEYS, map(int, (tile, overlap, scale, max_pixels)), strict=True))
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
                         model_id=logged.model_id, loader_module=LOADER_MODULE, data_path=str(keras_path),
                         code_paths=[str(PACKAGE_DIR)], signature=_signature(max_pixels),
                         pip_requirements=_pip_requirements(), model_config=config)
    return info.model_uri

