"""Export a trained generator as a TensorFlow SavedModel, ONNX or LiteRT (TFLite) file, checked.

Every format goes through Keras' own ``Model.export`` (``tf_saved_model``, ``onnx``, ``litert``)
with the signature ``lr``: float32 (batch, height, width, 3) in [0, 1], batch and size dynamic
unless ``input_size`` fixes the spatial size (the batch stays dynamic). The artifact is then
loaded back with the runtime a consumer would use (``tf.saved_model.load`` and its serving
signature, onnxruntime, the LiteRT interpreter) and run on crops of a real photograph; its largest
absolute difference from the Keras model must stay within the format's tolerance
(:data:`TOLERANCES`), else nothing is written.

Output folder ``out``: the artifact (``saved_model/``, ``generator.onnx`` or ``generator.tflite``)
and ``export.json`` (format, file, size, tolerance, max abs diff, input sizes, times, versions).
It is built in a temp folder beside ``out`` and renamed into place at the end, so ``out`` is
either the previous export or the new one, never half of one.

What each format needs and handles (measured figures: the report of issue 15, item 2):

* ``savedmodel``: TensorFlow only. Same kernels as Keras, so the output is equal up to round-off.
* ``onnx``: Keras converts through ``tf2onnx`` (+ ``onnx``); checked with ``onnxruntime``.
* ``litert``: TensorFlow's converter, builtin op set only (no TF Select / Flex ops: the standard
  LiteRT runtime, ``ai-edge-litert``, has no Flex delegate and neither has ``tf.lite.Interpreter``
  in the ``tensorflow-cpu`` wheel, so such a file would not run elsewhere); checked with
  ``ai-edge-litert`` (or ``tf.lite.Interpreter`` when that is absent).

The generator's bicubic skip (``model.generator.bicubic_skip: true``) exports in every format now
that ``BicubicUpsample`` is a fixed convolution. Its earlier form, ``keras.ops.image.resize``,
could not: that op checks its output size in Python, so it cannot be traced with a dynamic input
size (any format; ``input_size`` works around it), and ResizeBicubic is not a LiteRT builtin op.
Layers like it still get those one-line errors.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from srgan import dataio, limits, quiet
from srgan.errors import ExpectedError

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("savedmodel", "onnx", "litert")
KERAS_FORMAT = {"savedmodel": "tf_saved_model", "onnx": "onnx", "litert": "litert"}
ARTIFACT = {"savedmodel": "saved_model", "onnx": "generator.onnx", "litert": "generator.tflite"}
EXPORT_JSON = "export.json"
INPUT_NAME = "lr"  # the signature's input name, as in models.build_generator

# Largest allowed |exported - Keras| on [0, 1] outputs, per format: the largest difference measured
# (issue 15 item 2: briefly trained 8x32 generators with and without the bicubic skip and the
# paper's 16x64 with BN, crops of 40x56 and 176x176 px) times a margin of >= 10. SavedModel runs
# TF's own kernels in a traced graph (BN folded, other fusion), measured <= 4.8e-7; onnxruntime's
# convolutions sum in another order, <= 1.2e-6; LiteRT's XNNPACK too, and its error grows with
# depth, <= 5.3e-6 on the 16x64. Even 1e-4 is 1/40 of one 8-bit level, so an exported model's
# uint8 output can differ only where Keras' own output lies within 1e-4 of a rounding edge.
TOLERANCES: dict[str, float] = {"savedmodel": 1e-5, "onnx": 1e-4, "litert": 1e-4}

MIN_SCALE = 2  # a generator upscales: x1 is some other image-to-image model
ONNX_OPSET = 17  # Resize "cubic" needs >= 11; 17 is well inside what onnxruntime >= 1.14 runs

# The packages each format needs: (import name, pip name) for the converter and for the check.
# The versions are the ones this module was tested with (TF 2.21, Keras 3.15, numpy 2).
REQUIREMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "savedmodel": (),
    "onnx": (("tf2onnx", "tf2onnx==1.17.0"), ("onnx", "onnx==1.23.2"),
             ("onnxruntime", "onnxruntime==1.32.0")),
    "litert": (),  # the converter is TensorFlow's; the interpreter: see LITERT_RUNTIME
}
LITERT_RUNTIME = ("ai_edge_litert", "ai-edge-litert==2.3.0")
# Imported before the load timer starts, so load_seconds is the artifact's load, not the import.
RUNTIME_MODULES = {"savedmodel": "tensorflow", "onnx": "onnxruntime", "litert": "ai_edge_litert.interpreter"}

# Test photo: a real photograph shipped in scikit-image's wheel, crops at two odd sizes (h, w)
# to show the signature really is size-dynamic (and non-square to catch swapped axes); the first
# size runs as a batch of two different crops to show the batch dimension is dynamic too.
TEST_PHOTO = "astronaut.png"
TEST_SIZES: tuple[tuple[int, int], ...] = ((40, 56), (29, 35))

# Ops a format's converter or runtime cannot take, and what in a Keras model makes them.
OP_SOURCES = {"ResizeBicubic": "a bicubic keras.ops.image.resize"}
SYMBOLIC_BOOL = "symbolic `tf.Tensor` as a Python `bool`"  # TF's words for a Python branch on a traced value
TRACE_ERROR = re.compile(r"Exception encountered when calling (\w+)\.call\(\)")
TFLITE_SELECT_OPS = re.compile(r"TF Select ops: ([\w, ]+)")


class ExportError(ExpectedError):
    """An export that cannot be made or does not check out; the message is one line (``<fmt>: ...``
    for a format's converter or runtime)."""


@dataclass
class ExportResult:
    """What ``export.json`` records about one export."""

    format: str
    file: str  # artifact path relative to the output folder
    size_bytes: int
    tolerance: float
    max_abs_diff: float
    input_sizes: list[list[int]]  # (batch, h, w, 3) of each check run
    signature: list[int | None]  # the exported input shape; None = dynamic
    input_name: str  # the tensor names in the artifact, as its runtime reports them
    output_name: str
    scale: int
    model: str
    export_seconds: float
    load_seconds: float  # the artifact into its runtime (LiteRT allocates on the first run)
    check_seconds: float  # running every check batch, first-call set-up included
    runtime: str
    test_image: str
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def missing_packages(fmt: str) -> list[str]:
    """pip requirement strings of the packages ``fmt`` needs that are not installed ([] if none)."""
    check_format(fmt)
    missing = [pip for mod, pip in REQUIREMENTS[fmt] if importlib.util.find_spec(mod) is None]
    if fmt == "litert" and importlib.util.find_spec(LITERT_RUNTIME[0]) is None and not _tf_lite_interpreter():
        missing.append(LITERT_RUNTIME[1])
    return missing


def check_format(fmt: str) -> str:
    """``fmt`` if it is a known format, else a ExportError listing them."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return fmt


def parse_size(text: str, max_pixels: int = limits.EXPORT_MAX_PIXELS) -> tuple[int, int]:
    """``HxW`` (e.g. ``176x176``) -> (h, w), both >= 1 and h x w at most ``max_pixels``: the check
    runs the Keras model and the export on that size, so it costs memory per pixel."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or min(int(m[1]), int(m[2])) < 1:
        raise ExportError(f"--input-size {text!r}: expected HxW with positive integers, e.g. 176x176")
    h, w = int(m[1]), int(m[2])
    too_big = limits.pixel_limit_error(w, h, max_pixels, raise_hint=(
        "checking the export runs the model on that size; raise --max-pixels to export it"))
    if too_big:
        raise ExportError(f"--input-size {too_big}")
    return h, w


def check_batches(input_size: tuple[int, int] | None = None, image: str | os.PathLike[str] | None = None,
                 ) -> list[np.ndarray]:
    """float32 NHWC batches in [0, 1] cut from a real photo (default: scikit-image's astronaut).

    Dynamic export (``input_size`` None): a batch of 2 crops of TEST_SIZES[0], then 1 crop of each
    further size. Fixed size: a batch of 2 crops of ``input_size`` up to
    :data:`limits.EXPORT_BATCH_CHECK_PIXELS` per crop, one crop above it (the photo is enlarged
    first if it is smaller than the crops need).
    """
    from PIL import Image

    from srgan import images

    photo = images.load_rgb(image if image is not None else _skimage_photo())
    sizes = [input_size] if input_size else list(TEST_SIZES)
    h0, w0 = sizes[0]
    pair = h0 * w0 <= limits.EXPORT_BATCH_CHECK_PIXELS  # a second crop only where it is cheap
    # the second crop comes from the upper-left quadrant: the photo must be twice that size
    reach = 2 if pair else 1
    need_h, need_w = max(h for h, _ in sizes) * reach, max(w for _, w in sizes) * reach
    if photo.shape[0] < need_h or photo.shape[1] < need_w:
        f = max(need_h / photo.shape[0], need_w / photo.shape[1])
        size = (int(np.ceil(photo.shape[1] * f)), int(np.ceil(photo.shape[0] * f)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC))
    batches = []
    for i, (h, w) in enumerate(sizes):
        # Crops from the centre and from an upper-left quadrant: two different picture contents.
        cy, cx = (photo.shape[0] - h) // 2, (photo.shape[1] - w) // 2
        crops = [photo[cy:cy + h, cx:cx + w]]
        if i == 0 and pair:
            qy, qx = (photo.shape[0] // 2 - h) // 2, (photo.shape[1] // 2 - w) // 2
            crops.append(photo[qy:qy + h, qx:qx + w])
        batches.append(np.stack(crops).astype(np.float32) / 255.0)
    return batches


def export(model_path: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str], *,
           input_size: tuple[int, int] | None = None, tolerance: float | None = None,
           image: str | os.PathLike[str] | None = None) -> ExportResult:
    """Export the ``.keras`` generator at ``model_path`` as ``fmt`` into folder ``out``, checked.

    Raises ExportError (one line, prefixed ``<fmt>:``) when a package is missing, the converter or
    runtime fails, or the exported output differs from Keras' by more than ``tolerance`` (default
    :data:`TOLERANCES`); ``out`` is then left as it was.
    """
    check_format(fmt)
    tol = TOLERANCES[fmt] if tolerance is None else float(tolerance)
    out = Path(out).absolute()  # the temp folder goes beside it, so it needs a real name
    _check_replaceable(out)
    if not Path(model_path).is_file():  # before TensorFlow is imported: a typo fails fast
        raise ExportError(f"generator {model_path} not found")
    missing = missing_packages(fmt)
    if missing:
        raise ExportError(f"{fmt}: needs packages that are not installed: pip install {' '.join(missing)}")
    model = _load(model_path, input_size)
    _check_float32(model, fmt)
    batches = check_batches(input_size, image)
    refs = _reference(model, model_path, batches)
    scale = refs[0].shape[1] // batches[0].shape[1]

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of this pid's earlier, killed run
    tmp.mkdir(parents=True)
    try:
        artifact = tmp / ARTIFACT[fmt]
        _import_runtime(fmt)
        t0 = time.perf_counter()
        _keras_export(model, fmt, artifact, input_size)
        t1 = time.perf_counter()
        run, runtime, input_name, output_name = _LOADERS[fmt](artifact)
        t2 = time.perf_counter()
        diff = _max_diff(fmt, run, batches, refs)
        t3 = time.perf_counter()
        if not diff <= tol:  # also catches NaN
            raise ExportError(f"{fmt}: exported model differs from the Keras model by {diff:.3g} "
                              f"(> tolerance {tol:g}) on {_describe(batches)}")
        result = ExportResult(
            format=fmt, file=ARTIFACT[fmt], size_bytes=_size(artifact), tolerance=tol,
            max_abs_diff=diff, input_sizes=[list(x.shape) for x in batches],
            signature=[None, *(input_size or (None, None)), 3], input_name=input_name,
            output_name=output_name, scale=int(scale), model=str(model_path),
            export_seconds=round(t1 - t0, 3), load_seconds=round(t2 - t1, 3),
            check_seconds=round(t3 - t2, 3), runtime=runtime,
            test_image=str(image) if image is not None else f"skimage/data/{TEST_PHOTO}",
            versions=_versions(fmt, runtime),
        )
        dataio.write_json_atomic(tmp / EXPORT_JSON, result.to_dict())
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


# --------------------------------------------------------------------------- steps
def _skimage_photo() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / TEST_PHOTO


def _import_runtime(fmt: str) -> None:
    try:
        importlib.import_module(RUNTIME_MODULES[fmt])
    except ImportError:
        pass  # litert without ai-edge-litert: tf.lite.Interpreter (missing_packages checked that)


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a non-empty folder that is not an earlier export (or is a file)."""
    if out.is_file():
        raise ExportError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_JSON).is_file():
        raise ExportError(f"--out {out} is a non-empty folder without {EXPORT_JSON}: not replacing it; "
                          "give a new or empty folder")


def _load(model_path: str | os.PathLike[str], input_size: tuple[int, int] | None = None) -> Any:
    """The Keras model at ``model_path``, checked to be an image-to-image generator: one (batch, h,
    w, 3) input, one (batch, h', w', 3) output, and a size that ``input_size`` may use."""
    from srgan import models  # registers the custom layers

    path = Path(model_path)
    try:
        model = models.load_generator(path)
    except Exception as exc:  # noqa: BLE001 - any load failure is one clear message
        raise ExportError(f"cannot load generator {path}: {type(exc).__name__}: {_first_line(exc)}") from None
    shape = tuple(model.inputs[0].shape) if len(model.inputs) == 1 else ()
    if len(shape) != 4 or shape[-1] != 3:
        raise ExportError(f"{path}: not a generator with one (batch, h, w, 3) input (inputs: "
                          f"{[tuple(t.shape) for t in model.inputs]})")
    outputs = [tuple(t.shape) for t in model.outputs]
    if len(outputs) != 1 or len(outputs[0]) != 4 or outputs[0][-1] != 3:
        shown = outputs[0][1:] if len(outputs) == 1 else outputs
        raise ExportError(f"{path}: not a generator: it maps a {shape[1:]} image to {shown}, not to an RGB "
                          "image (batch, h, w, 3)")
    fixed = shape[1:3]
    if None not in fixed and fixed != tuple(input_size or ()):
        asked = f"--input-size {input_size[0]}x{input_size[1]}" if input_size else "any input size"
        raise ExportError(f"{path}: takes only {fixed[0]}x{fixed[1]} inputs, not {asked} (a generator of "
                          f"this project takes any size): export it with --input-size {fixed[0]}x{fixed[1]}")
    return model


def _reference(model: Any, path: str | os.PathLike[str], batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The Keras model's outputs on the check batches, which must be the same integer upscale
    (>= x2) of each; one ExportError line otherwise."""
    refs = []
    for x in batches:
        try:
            y = np.asarray(model(x, training=False), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - Keras raises many types for an input it cannot take
            raise ExportError(f"{path}: the model cannot run on {_describe([x])}: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from None
        n, h, w, _ = x.shape
        sh, sw = (y.shape[1] / h, y.shape[2] / w) if y.ndim == 4 else (0, 0)
        if y.ndim != 4 or y.shape[0] != n or y.shape[3] != 3 or sh != sw or sh != int(sh):
            raise ExportError(f"{path}: maps {_describe([x])} to {'x'.join(map(str, y.shape))}: not an "
                              "integer RGB upscale")
        if sh < MIN_SCALE:
            raise ExportError(f"{path}: does not upscale (x{sh:g}: its output is the size of its input), so "
                              "it is not a super-resolution generator; nothing exported")
        refs.append(y)
    return refs


def _check_float32(model: Any, fmt: str) -> None:
    # Keras exports ONNX only from float32 models, and a mixed-precision graph would not be the
    # float32 artifact the signature promises.
    odd = sorted({layer.dtype_policy.name for layer in model.layers} - {"float32"})
    if odd:
        raise ExportError(f"{fmt}: the generator has layers with dtype policy {odd}; export needs a "
                          "float32 model (rebuild it in float32 and copy the weights over)")


def _keras_export(model: Any, fmt: str, artifact: Path, input_size: tuple[int, int] | None) -> None:
    """``model.export`` with the ``lr`` signature; converter failures become one-line ExportErrors."""
    import tensorflow as tf

    h, w = input_size or (None, None)
    signature = [tf.TensorSpec((None, h, w, 3), tf.float32, name=INPUT_NAME)]
    kwargs: dict[str, Any] = {}
    if fmt == "onnx":
        kwargs["opset_version"] = ONNX_OPSET
    elif fmt == "litert":
        # Builtin ops only: TF Select ops need the Flex delegate, which LiteRT runtimes lack.
        kwargs["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}
    with _captured_output() as output, warnings.catch_warnings():
        # Keras' tf2onnx numpy-2 patch probes np.object, which numpy 2 answers with a FutureWarning.
        warnings.filterwarnings("ignore", message=r".*np\.object.*", category=FutureWarning)
        try:
            model.export(str(artifact), format=KERAS_FORMAT[fmt], input_signature=signature,
                         verbose=False, **kwargs)
            error = None
        except Exception as exc:  # noqa: BLE001 - converters raise many types; each becomes one line
            error = exc
    if output.text:
        log.debug("%s converter output:\n%s", fmt, output.text)
    if error is not None:
        raise ExportError(_explain(fmt, error, dynamic=input_size is None, output=output.text)) from None
    if not artifact.exists():
        raise ExportError(f"{fmt}: the converter reported success but wrote no {artifact.name}")


def _explain(fmt: str, exc: BaseException, *, dynamic: bool, output: str = "") -> str:
    """One line saying what failed and what to do, for a converter exception (and its ``output``)."""
    text = f"{exc}\n{output}"
    layer = TRACE_ERROR.search(text)
    if layer:
        cause = _first_line(getattr(exc, "__cause__", None) or exc, skip=TRACE_ERROR)
        if dynamic and SYMBOLIC_BOOL in text:
            return (f"{fmt}: cannot trace layer {layer[1]} with a dynamic input size: it branches in "
                    "Python on the size (as keras.ops.image.resize does); export a fixed size with "
                    "--input-size HxW (e.g. the tile window, tile + 2 x overlap)")
        hint = "; try a fixed --input-size HxW" if dynamic else ""
        return f"{fmt}: cannot trace layer {layer[1]}: {cause}{hint}"
    select = TFLITE_SELECT_OPS.search(text)
    if select:
        ops = [o.strip() for o in select[1].split(",") if o.strip()]
        named = ", ".join(f"{o} (from {OP_SOURCES[o]})" if o in OP_SOURCES else o for o in ops)
        verb, it = ("is", "it") if len(ops) == 1 else ("are", "they")
        return (f"{fmt}: {named} {verb} not in LiteRT's builtin op set; {it} would need TF Select "
                "(the Flex delegate), which LiteRT runtimes do not include")
    return f"{fmt}: the converter failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException, skip: re.Pattern[str] | None = None) -> str:
    """The first informative line of an exception message (converters print pages)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(exc).splitlines()]
    lines = [ln for ln in lines if ln and not (skip and skip.search(ln))]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


class _Output:
    """Text a block wrote to the process's stdout/stderr (filled in when the block ends)."""

    text = ""


@contextmanager
def _captured_output() -> Iterator[_Output]:
    """Send file descriptors 1 and 2 to a temp file for the block.

    TF's MLIR converter and tf2onnx write pages straight to the C-level stderr (and Keras' tf2onnx
    patch a FutureWarning): captured, so a failure is the one line this module makes of it.
    """
    result = _Output()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as f:
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield result
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            result.text = f.read().decode(errors="replace")


Runner = Callable[[np.ndarray], np.ndarray]
Loaded = tuple[Runner, str, str, str]  # run, runtime name, input tensor name, output tensor name


def _load_savedmodel(path: Path) -> Loaded:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    serve = loaded.signatures["serving_default"]
    (output_name,) = serve.structured_outputs  # Keras names the single output "output_0"

    def run(x: np.ndarray) -> np.ndarray:
        return serve(**{INPUT_NAME: tf.constant(x)})[output_name].numpy()

    return run, "tensorflow", INPUT_NAME, output_name


def _load_onnx(path: Path) -> Loaded:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnx: onnxruntime cannot load the converted model: {_first_line(exc)}") from None
    name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    return (lambda x: session.run(None, {name: x})[0]), "onnxruntime", name, output_name


def _tf_lite_interpreter() -> Any:
    """tf.lite.Interpreter when this TensorFlow still has it (deprecated for ai-edge-litert)."""
    import tensorflow as tf

    return getattr(getattr(tf, "lite", None), "Interpreter", None)


def _load_litert(path: Path) -> Loaded:
    try:
        from ai_edge_litert.interpreter import Interpreter

        runtime = "ai-edge-litert"
    except ImportError:
        Interpreter, runtime = _tf_lite_interpreter(), "tf.lite.Interpreter"
    try:
        interp = Interpreter(model_path=str(path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"litert: the interpreter cannot load the converted model: "
                          f"{_first_line(exc)}") from None
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]

    def run(x: np.ndarray) -> np.ndarray:
        # Tensors are sized at conversion for a 1x1 input; resize to this batch before each run.
        interp.resize_tensor_input(inp["index"], list(x.shape), strict=True)
        with quiet.native_stderr_held():  # the first allocation prints LiteRT's XNNPACK delegate notice
            interp.allocate_tensors()
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return interp.get_tensor(outp["index"]).copy()

    return run, runtime, inp["name"], outp["name"]


_LOADERS: dict[str, Callable[[Path], Loaded]] = {
    "savedmodel": _load_savedmodel, "onnx": _load_onnx, "litert": _load_litert,
}


def _max_diff(fmt: str, run: Runner, batches: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> float:
    """Largest |exported - Keras| over all test batches (shape mismatches are errors)."""
    worst = 0.0
    for x, ref in zip(batches, refs):
        try:
            y = np.asarray(run(x))
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"{fmt}: running the exported model on {_describe([x])} failed: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from None
        if y.shape != ref.shape:
            raise ExportError(f"{fmt}: exported model gives shape {y.shape} for {x.shape}, Keras {ref.shape}")
        worst = max(worst, float(np.max(np.abs(y.astype(np.float64) - ref))))
    return worst


def _describe(batches: Sequence[np.ndarray]) -> str:
    return ", ".join("x".join(map(str, x.shape)) for x in batches)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _versions(fmt: str, runtime: str) -> dict[str, str]:
    names = ["tensorflow-cpu", "tensorflow", "keras", "numpy"]
    names += [pip.split("==")[0] for _, pip in REQUIREMENTS[fmt]]
    if runtime == "ai-edge-litert":
        names.append("ai-edge-litert")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if fmt == "onnx":
        found["onnx_opset"] = str(ONNX_OPSET)
    return found


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder onto ``out`` (an earlier export there is replaced)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)  # a directory cannot be renamed onto a non-empty one: move the old aside
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_export(out: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``export.json`` of an export folder."""
    return json.loads((Path(out) / EXPORT_JSON).read_text())
