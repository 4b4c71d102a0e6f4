"""src/export.py and srgan.export: real converters and runtimes on tiny generators.

Each format that is installed must reproduce the Keras output within its tolerance, checked here
with the runtime loaded directly (not through the module's own check) on a crop size and batch
the export never saw. A format whose packages are missing is skipped with the pip line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from srgan import export, images, models
from srgan.config import ROOT, GeneratorConfig, section
from srgan.export import ExportError

SCALE = 4
FIXED_SIZE = (24, 32)  # (h, w) for fixed-size exports: small and non-square
FRESH_SIZE = (23, 31)  # a crop size the export's own check does not use: shows the size is dynamic
FRESH_BATCH = 3



@keras.saving.register_keras_serializable(package="srgan_test_export")
class ResizeUp(keras.layers.Layer):
    """What BicubicUpsample was before it became a convolution: ``keras.ops.image.resize``, which
    branches in Python on the output size (no dynamic-size trace) and is ResizeBicubic (no LiteRT
    builtin op). Here to keep those export errors tested whatever models.py holds."""

    def __init__(self, scale: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = int(scale)

    def call(self, inputs):
        shape = ops.shape(inputs)
        size = (shape[1] * self.scale, shape[2] * self.scale)
        return ops.image.resize(inputs, size, interpolation="bicubic", antialias=False)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        s = self.scale
        return (b, None if h is None else h * s, None if w is None else w * s, c)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}


def _graph_ops(layer: keras.layers.Layer) -> set[str]:
    """TF op types of ``layer`` traced on a small static input."""
    import tensorflow as tf

    fn = tf.function(lambda x: layer(x)).get_concrete_function(tf.TensorSpec((1, 8, 8, 3), tf.float32))
    return {op.type for op in fn.graph.get_operations()}


# The bicubic skip is exportable in every format once BicubicUpsample is a fixed convolution; while
# it was a ResizeBicubic it failed as ResizeUp does (see test_resize_op_*).
SKIP_IS_RESIZE = "ResizeBicubic" in _graph_ops(models.BicubicUpsample(SCALE))


def _tiny(skip: bool, path: Path) -> Path:
    """A 1-block, 4-filter generator saved as .keras; its output conv gets random weights (with the
    skip it starts at zero, which would leave the whole conv path out of the comparison)."""
    model = models.build_generator(section(GeneratorConfig, blocks=1, filters=4, bicubic_skip=skip), SCALE)
    kernel = model.get_layer("output_conv").kernel
    kernel.assign(np.random.default_rng(0).normal(0.0, 0.05, kernel.shape).astype(np.float32))
    return models.save_generator(model, path)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(False, tmp_path_factory.mktemp("plain") / "g.keras")


@pytest.fixture(scope="module")
def with_skip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(True, tmp_path_factory.mktemp("skip") / "g.keras")


def _need(fmt: str) -> None:
    missing = export.missing_packages(fmt)
    if missing:
        pytest.skip(f"{fmt} export needs: pip install {' '.join(missing)}")


def _photo_batch(h: int, w: int, n: int) -> np.ndarray:
    """``n`` different h x w crops of a real photo (scikit-image's coffee), float32 in [0, 1]."""
    import skimage

    photo = images.load_rgb(Path(skimage.__file__).parent / "data" / "coffee.png")
    crops = [photo[60 + 37 * i:60 + 37 * i + h, 90 + 53 * i:90 + 53 * i + w] for i in range(n)]
    return np.stack(crops).astype(np.float32) / 255.0


def _run_artifact(fmt: str, path: Path, x: np.ndarray) -> np.ndarray:
    """Run an exported file with its runtime, the way a consumer elsewhere would."""
    if fmt == "savedmodel":
        import tensorflow as tf

        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return next(iter(serve(lr=tf.constant(x)).values())).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interp = Interpreter(model_path=str(path))
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], list(x.shape), strict=True)
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    return interp.get_tensor(out["index"])


def _keras(model_path: Path, x: np.ndarray) -> np.ndarray:
    return np.asarray(models.load_generator(model_path)(x, training=False))


def _assert_export(fmt: str, model_path: Path, out: Path, size: tuple[int, int] | None) -> None:
    result = export.export(model_path, fmt, out, input_size=size)
    tol = export.TOLERANCES[fmt]
    assert result.max_abs_diff <= tol
    meta = export.read_export(out)
    assert meta == json.loads(json.dumps(result.to_dict()))
    assert meta["format"] == fmt and meta["scale"] == SCALE and meta["tolerance"] == tol
    assert meta["signature"] == [None, *(size or (None, None)), 3]
    assert meta["size_bytes"] > 0 and meta["versions"]["keras"] and meta["input_sizes"]
    assert sorted(p.name for p in out.iterdir()) == sorted([export.ARTIFACT[fmt], export.EXPORT_JSON])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    # Independent check: the runtime itself, a batch and crop size the export's check never ran.
    x = _photo_batch(*(size or FRESH_SIZE), FRESH_BATCH)
    y = _run_artifact(fmt, out / meta["file"], x)
    ref = _keras(model_path, x)
    assert y.shape == ref.shape == (FRESH_BATCH, x.shape[1] * SCALE, x.shape[2] * SCALE, 3)
    assert float(np.max(np.abs(y - ref))) <= tol


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_plain_generator_exports_with_dynamic_size(fmt: str, plain: Path, tmp_path: Path) -> None:
    _need(fmt)
    _assert_export(fmt, plain, tmp_path / fmt, None)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_bicubic_skip_dynamic_size(fmt: str, with_skip: Path, tmp_path: Path) -> None:
    _need(fmt)
    if SKIP_IS_RESIZE:  # the resize-based BicubicUpsample
        _assert_untraceable(fmt, with_skip, tmp_path, "BicubicUpsample")
    else:
        _assert_export(fmt, with_skip, tmp_path / fmt, None)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_bicubic_skip_fixed_size(fmt: str, with_skip: Path, tmp_path: Path) -> None:
    _need(fmt)
    if SKIP_IS_RESIZE and fmt == "litert":
        _assert_not_builtin(with_skip, tmp_path)
    else:
        _assert_export(fmt, with_skip, tmp_path / fmt, FIXED_SIZE)


@pytest.fixture(scope="module")
def resize_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lr = keras.Input((None, None, 3), name="lr")
    out = keras.layers.Conv2D(3, 3, padding="same", name="conv")(ResizeUp(SCALE, name="up")(lr))
    return models.save_generator(keras.Model(lr, out), tmp_path_factory.mktemp("resize") / "r.keras")


def _assert_untraceable(fmt: str, model_path: Path, tmp_path: Path, layer: str) -> None:
    with pytest.raises(ExportError) as err:
        export.export(model_path, fmt, tmp_path / fmt)
    msg = str(err.value)
    assert msg.startswith(f"{fmt}: cannot trace layer {layer} with a dynamic input size"), msg
    assert "--input-size" in msg
    assert "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def _assert_not_builtin(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError) as err:
        export.export(model_path, "litert", tmp_path / "litert", input_size=FIXED_SIZE)
    msg = str(err.value)
    assert msg.startswith("litert: ResizeBicubic (from a bicubic keras.ops.image.resize) is not in LiteRT's "
                          "builtin op set"), msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_resize_op_cannot_be_traced_with_dynamic_size(fmt: str, resize_model: Path, tmp_path: Path) -> None:
    _need(fmt)
    _assert_untraceable(fmt, resize_model, tmp_path, "ResizeUp")


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_resize_op_with_fixed_size(fmt: str, resize_model: Path, tmp_path: Path,
                                   capfd: pytest.CaptureFixture) -> None:
    """A static-size ResizeBicubic: TF runs it, ONNX as Resize mode=cubic (matching TF within the
    tolerance); LiteRT has no builtin bicubic resize: one clear line, the converter's pages hidden."""
    _need(fmt)
    if fmt != "litert":
        _assert_export(fmt, resize_model, tmp_path / fmt, FIXED_SIZE)
        return
    capfd.readouterr()
    _assert_not_builtin(resize_model, tmp_path)
    assert "TF Select" not in "".join(capfd.readouterr())


def test_failed_export_leaves_the_previous_one(plain: Path, with_skip: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    export.export(plain, "savedmodel", out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ExportError, match="differs from the Keras model"):
        export.export(plain, "savedmodel", out, tolerance=-1.0)  # no diff can pass: the check fails
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    export.export(plain, "savedmodel", out)  # an earlier export is replaced
    assert export.read_export(out)["format"] == "savedmodel"


def test_refuses_to_replace_a_foreign_folder(plain: Path, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="non-empty folder"):
        export.export(plain, "savedmodel", tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_missing_converter_names_the_pip_line(plain: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    with pytest.raises(ExportError) as err:
        export.export(plain, "onnx", tmp_path / "onnx")
    assert str(err.value) == "onnx: needs packages that are not installed: pip install tf2onnx==1.17.0"
    assert not (tmp_path / "onnx").exists()


def test_parse_size() -> None:
    assert export.parse_size("176x128") == (176, 128)
    for bad in ("176", "0x4", "ax4", "-1x4"):
        with pytest.raises(ExportError, match="HxW"):
            export.parse_size(bad)


# --------------------------------------------------------------------------- CLI (subprocess)
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, str(ROOT / "src/export.py"), *args],
                          check=False, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def cli_here(capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """src/export.py's ``main`` in this process (TensorFlow already loaded, so no start-up per call),
    for the failures: its exit code and everything written to stdout/stderr, native output included."""
    import export as export_script  # src/ is on the test path

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")

    def run(*args: str) -> subprocess.CompletedProcess:
        capfd.readouterr()
        with pytest.raises(SystemExit) as stopped:
            export_script.main(list(args))
        out = capfd.readouterr()
        return subprocess.CompletedProcess(args, stopped.value.code, out.out, out.err)

    return run


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_cli_bad_model_path(tmp_path: Path, cli_here) -> None:
    line = _one_error_line(cli_here("--model", str(tmp_path / "nope.keras"), "--format", "onnx",
                                     "--out", str(tmp_path / "out")))
    assert line == f"error: generator {tmp_path / 'nope.keras'} not found"
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_format(plain: Path, tmp_path: Path, cli_here) -> None:
    line = _one_error_line(cli_here("--model", str(plain), "--format", "tflite", "--out", str(tmp_path / "out")))
    assert line == "error: unknown format 'tflite'; choose one of: savedmodel, onnx, litert"


def test_cli_corrupt_model(tmp_path: Path, cli_here) -> None:
    bad = tmp_path / "g.keras"
    bad.write_bytes(b"not a keras archive")
    line = _one_error_line(cli_here("--model", str(bad), "--format", "savedmodel",
                                     "--out", str(tmp_path / "out")))
    assert line.startswith(f"error: cannot load generator {bad}: ")
    assert not (tmp_path / "out").exists()


def test_cli_converter_failure_is_one_line(resize_model: Path, tmp_path: Path) -> None:
    """src/export.py itself (ResizeUp registered first, as a project layer would be)."""
    _need("litert")
    code = ("import runpy, sys; sys.path[:0] = [sys.argv[1]]; import test_export; "
            "sys.argv[:3] = [sys.argv[2]]; runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(ROOT / "src/export.py"),
         "--model", str(resize_model), "--format", "litert", "--out", str(tmp_path / "out"),
         "--input-size", "x".join(map(str, FIXED_SIZE))],
        check=False, capture_output=True, text=True, env=env, timeout=600)
    line = _one_error_line(proc)
    assert line.startswith("error: litert: ResizeBicubic (from a bicubic keras.ops.image.resize)")
    assert "TF Select ops" not in proc.stderr  # the converter's own pages are captured, not printed
    assert not (tmp_path / "out").exists()


def test_cli_exports(plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _cli("--model", str(plain), "--format", "savedmodel", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    meta = export.read_export(out)
    assert f"max abs diff {meta['max_abs_diff']:.3g}" in proc.stdout and "savedmodel:" in proc.stdout
    assert (out / "saved_model" / "saved_model.pb").is_file()


# --------------------------------------------------------------------------- GitHub issue 28 items 2, 3
def test_input_size_has_a_stated_bound() -> None:
    """`--input-size 100000x100000` was killed by the kernel (~22 GB, exit 137, no message)."""
    from srgan import limits

    side = int(limits.EXPORT_MAX_PIXELS ** 0.5)
    assert export.parse_size(f"{side}x{side}") == (side, side)
    with pytest.raises(ExportError) as err:
        export.parse_size(f"{side + 1}x{side + 1}")
    msg = str(err.value)
    assert msg.startswith(f"--input-size {side + 1}x{side + 1} is ") and "over the limit of 4 MP" in msg, msg
    assert "--max-pixels" in msg
    assert export.parse_size("3000x3000", max_pixels=9_000_000) == (3000, 3000)  # the flag raises it


def test_the_check_of_a_large_fixed_size_is_one_crop() -> None:
    """The check ran a batch of two crops of the fixed size (and enlarged the photo to twice it)."""
    from srgan import limits

    small = export.check_batches((24, 32))
    assert [b.shape for b in small] == [(2, 24, 32, 3)]  # small sizes still show a dynamic batch
    side = int(limits.EXPORT_BATCH_CHECK_PIXELS ** 0.5) + 1
    (big,) = export.check_batches((side, side))
    assert big.shape == (1, side, side, 3)


def test_cli_huge_input_size_is_one_line_at_once(plain: Path, tmp_path: Path) -> None:
    import time

    t0 = time.time()
    line = _one_error_line(_cli("--model", str(plain), "--format", "savedmodel", "--out", str(tmp_path / "o"),
                                "--input-size", "100000x100000"))
    assert "100000x100000" in line and "over the limit" in line and "--max-pixels" in line, line
    assert time.time() - t0 < 60 and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Keras model that is not a generator: a classifier with a fixed 32x32 input."""
    x = keras.Input((32, 32, 3))
    y = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3)(x)))
    return models.save_generator(keras.Model(x, y), tmp_path_factory.mktemp("clf") / "clf.keras")


@pytest.fixture(scope="module")
def same_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image-to-image model that does not upscale (x1)."""
    x = keras.Input((None, None, 3))
    return models.save_generator(keras.Model(x, keras.layers.Conv2D(3, 3, padding="same")(x)),
                                 tmp_path_factory.mktemp("x1") / "x1.keras")


def test_cli_a_classifier_is_one_error_line(classifier: Path, tmp_path: Path, cli_here) -> None:
    """It printed a 33-line traceback although the help promises one `error:` line."""
    line = _one_error_line(cli_here("--model", str(classifier), "--format", "savedmodel",
                                     "--out", str(tmp_path / "o")))
    assert "not a generator" in line and "(10,)" in line, line
    assert not (tmp_path / "o").exists()


def test_a_model_that_does_not_upscale_is_refused(same_size: Path, tmp_path: Path) -> None:
    """It was exported as "x1" without a word."""
    with pytest.raises(ExportError, match="does not upscale"):
        export.export(same_size, "savedmodel", tmp_path / "o")
    assert list(tmp_path.iterdir()) == []
