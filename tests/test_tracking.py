"""srgan.tracking: the generator as an MLflow Model (log, register, promote, resolve) in a real sqlite
store, and a copied project that must log into its own folder (GitHub issue 15 item 1, 17 item 8)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from srgan import tracking

SCALE, TILE, OVERLAP = 4, 8, 4  # tiles of 8 LR px: a 20x13 image is 6 windows, the tiled path
METRIC = "eval/valid/psnr_y"


@pytest.fixture
def restore_mlflow_uri():
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def tiny_generator(path: Path, seed: int = 0) -> Path:
    """A 1-block generator whose (normally zero-initialised) output conv is random, so its output
    is not plain bicubic; saved as .keras."""
    from srgan import models
    from srgan.config import GeneratorConfig, section

    g = models.build_generator(section(GeneratorConfig, blocks=1, filters=4), SCALE)
    last = g.get_layer("output_conv")
    rng = np.random.default_rng(seed)
    last.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in last.get_weights()])
    return models.save_generator(g, path)


def log_tiny_generator(folder: Path, experiment: str, value: float, seed: int = 0,
                       status: str = "FINISHED", metric: str = METRIC) -> tuple[str, Path]:
    """A training-like run: ``model/g.keras``, the MLflow Model, then an eval metric (as the evaluate
    stage logs it, after the model); returns (run id, .keras path)."""
    keras_path = tiny_generator(folder / f"g{seed}" / "g.keras", seed)
    run = tracking.start_run(experiment, run_name=f"run{seed}")
    run.log_artifact(keras_path, "model")
    tracking.log_generator_model(run.run_id, keras_path, TILE, OVERLAP, SCALE)
    run.log_metrics({metric: value})
    run.end(status)
    return run.run_id, keras_path


def lr_image(h: int = 20, w: int = 13, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_generator_model_register_promote_resolve(tmp_path, mlflow_uri, restore_mlflow_uri, monkeypatch):
    import mlflow

    monkeypatch.setattr(sys, "path", list(sys.path))  # loading the pyfunc prepends its code folder

    from srgan import inference, models

    worse, _ = log_tiny_generator(tmp_path, "exp", 30.0, seed=1)
    best, best_path = log_tiny_generator(tmp_path, "exp", 31.0, seed=2)
    failed, _ = log_tiny_generator(tmp_path, "exp", 99.0, seed=3, status="FAILED")  # never champion
    versions = {r: tracking.register_model(r, "gen") for r in (worse, best, failed)}
    assert versions == {worse: "1", best: "2", failed: "3"}

    # the run's metrics, logged after the model, are attached to the registered model
    client = mlflow.MlflowClient()
    source = client.get_model_version("gen", "2").source
    logged = client.get_logged_model(source.removeprefix("models:/"))
    assert {m.key: m.value for m in logged.metrics}[METRIC] == 31.0
    assert [m.value for m in client.get_metric_history(best, METRIC)] == [31.0]  # no duplicate point

    assert tracking.promote("exp", METRIC, "gen") == "2"
    assert str(client.get_model_version_by_alias("gen", tracking.CHAMPION).version) == "2"
    assert tracking.promote("exp", METRIC, "gen", higher_is_better=False) == "1"
    tracking.set_champion("gen", 2)
    with pytest.raises(LookupError, match="no FINISHED run"):
        tracking.promote("exp", "eval/missing", "gen")

    # every spelling of the generator resolves to the same .keras bytes
    for spec in ("models:/gen@champion", "models:/gen/2", f"runs:/{best}", f"runs:/{best}/model", best_path):
        assert tracking.resolve_generator(spec).read_bytes() == best_path.read_bytes(), spec
    assert tracking.generator_run_id("models:/gen@champion") == best
    assert tracking.generator_run_id(f"runs:/{best}/model") == best
    assert tracking.generator_run_id(best_path) is None
    for bad, err in (("models:/gen@nope", FileNotFoundError), ("models:/nope/1", FileNotFoundError),
                     ("models:/gen", ValueError), ("runs:/abc/other", ValueError),
                     (tmp_path / "missing.keras", FileNotFoundError)):
        with pytest.raises(err):
            tracking.resolve_generator(bad)

    # the pyfunc flavour runs the tiled inference with the logged tile/overlap, uint8 or float input
    served = mlflow.pyfunc.load_model("models:/gen@champion")
    lr = lr_image()
    expected = inference.upscale(models.load_generator(best_path), lr, SCALE, tile=TILE, overlap=OVERLAP)
    out = served.predict(lr[None].astype(np.float32))
    assert out.dtype == np.uint8 and out.shape == (1, 20 * SCALE, 13 * SCALE, 3)
    np.testing.assert_array_equal(out[0], expected)
    with pytest.raises(Exception, match="dtype"):  # the signature is enforced: float32 only
        served.predict(lr[None])
    assert served.metadata.get_input_schema().inputs[0].shape == (-1, -1, -1, 3)


def test_as_uint8_batch():
    img = lr_image(3, 4)
    assert tracking.as_uint8_batch(img).shape == (1, 3, 4, 3)
    np.testing.assert_array_equal(tracking.as_uint8_batch(img.astype(np.float32) + 0.4)[0], img)
    for bad in (img[..., :2], img.astype(np.float32) * 2, np.full((2, 2, 3), np.nan), np.zeros((0, 2, 3))):
        with pytest.raises(ValueError):
            tracking.as_uint8_batch(bad)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_copied_project_logs_into_the_copy(tmp_path, monkeypatch, restore_mlflow_uri):
    """Issue 17 item 8: mlflow.db stores absolute artifact locations; a copy must not write into A."""
    import mlflow

    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    note = tmp_path / "note.txt"
    note.write_text("hello")
    fake_model = tmp_path / "g.keras"
    fake_model.write_bytes(b"stands in for model/<name>.keras")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{a / 'mlflow.db'}")
    old = tracking.start_run("exp", run_name="in A")
    old.log_artifact(note, "notes")
    old.log_artifact(fake_model, "model")
    old.end()
    unfinished = tracking.start_run("exp", run_name="killed in A")  # left RUNNING, as after a kill

    shutil.copytree(a, b)
    before = _snapshot(a)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{b / 'mlflow.db'}")
    new = tracking.start_run("exp", run_name="in B")
    new.log_artifact(note, "notes")
    new.log_image(np.zeros((4, 4, 3), np.uint8), "validation/x.png")
    new.end()

    client = mlflow.MlflowClient()
    info = client.get_run(new.run_id).info
    assert info.artifact_uri.startswith((b / "mlartifacts").as_uri() + "/")
    assert (b / "mlartifacts" / new.run_id / "artifacts" / "notes" / "note.txt").read_text() == "hello"
    exp = client.get_experiment_by_name("exp")
    assert exp.artifact_location == (b / "mlartifacts").as_uri()
    aside = client.get_experiment(client.get_run(old.run_id).info.experiment_id)
    assert aside.name.startswith("exp (artifacts in ") and aside.tags[tracking.ASIDE_TAG] == str(a / "mlartifacts")

    # runs made in A: not resumed, no files written for them, their metrics still logged here
    assert tracking.resume_run(unfinished.run_id) is None
    tracking.log_to_run(old.run_id, {"eval/x": 1.0}, [note], "eval")
    assert client.get_run(old.run_id).data.metrics["eval/x"] == 1.0
    with pytest.raises(tracking.ArtifactLocationError, match="another copy"):
        tracking.Run(old.run_id).log_artifact(note, "more")
    assert _snapshot(a) == before  # A untouched

    # a moved project (A gone) still reads A's runs' artifacts from its own copy
    shutil.rmtree(a)
    assert tracking.download_model(old.run_id, tmp_path / "dl").read_bytes() == fake_model.read_bytes()


@pytest.mark.slow  # several processes
def test_compare_promote_sets_the_champion_by_a_lower_is_better_metric(tmp_path, mlflow_uri, restore_mlflow_uri):
    """``python src/compare.py --promote eval/valid/niqe`` as the README runs it after a study (here
    without one): the lower NIQE wins; an unknown metric is one line naming it, exit status 1."""
    import os
    import subprocess

    import mlflow

    from srgan.config import ROOT

    niqe = "eval/valid/niqe"
    runs = [log_tiny_generator(tmp_path, "srgan", v, seed=s, metric=niqe)[0] for s, v in ((1, 14.2), (2, 12.9))]
    for r in runs:
        tracking.register_model(r, tracking.DEFAULT_MODEL_NAME)

    def compare(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "src" / "compare.py"), *flags, "--out",
                               str(tmp_path / "reports" / "compare")], check=False, capture_output=True, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, cwd=tmp_path)

    ok = compare("--promote", niqe)
    assert ok.returncode == 0, ok.stderr
    assert f"{tracking.DEFAULT_MODEL_NAME}@champion -> version 2" in ok.stdout
    champion = mlflow.MlflowClient().get_model_version_by_alias(tracking.DEFAULT_MODEL_NAME, tracking.CHAMPION)
    assert champion.run_id == runs[1]
    bad = compare("--promote", "eval/valid/nope")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --promote eval/valid/nope")
    assert mlflow.MlflowClient().get_model_version_by_alias(tracking.DEFAULT_MODEL_NAME, tracking.CHAMPION).run_id == runs[1]
    nothing = compare()
    assert nothing.returncode == 1 and "no study yet" in nothing.stderr


def test_a_signal_during_a_store_call_takes_effect_right_after_it():
    """SIGTERM raised inside an MLflow store call skipped MLflow's rollback (it catches Exception),
    left sqlite's write lock held and the killed run hung closing itself: every store call now holds
    Ctrl-C/SIGTERM until it returns, then they act as usual."""
    import os
    import signal
    import time

    from srgan.tracking import store

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        finished = []
        with pytest.raises(Stop):
            with store.signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # delivered meanwhile: unheld, Stop would be raised here
                finished.append("the call")
        assert finished == ["the call"]
        assert signal.getsignal(signal.SIGTERM) is stop  # the handler is back
        with store.signals_held():  # and a block without a signal raises nothing
            finished.append("again")
        assert finished == ["the call", "again"]
    finally:
        signal.signal(signal.SIGTERM, previous)
