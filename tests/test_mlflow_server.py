"""Tracking server: a real `mlflow server` on a free port; a tiny training logs to it over HTTP and
everything is read back through the server (run, params, metric curves, the model, the image grids).

The training test uses a server whose artifacts are uploaded and downloaded *through* it into
--artifacts-destination (SQL backend, no --default-artifact-root): what remote machines need, they
only know the URL. A lighter test (no training) runs the exact command of `make mlflow-server`.
"""

from __future__ import annotations

import io
import re
import shlex
import subprocess

import numpy as np
import pytest
from _servers import VENV_BIN, free_port, mlflow_server, mlflow_server_cmd
from conftest import tiny_config

from srgan.config import ROOT


def makefile_server_cmd(port: int) -> list[str]:
    """`make mlflow-server`'s command (as `make -n` prints it), on ``port``."""
    out = subprocess.run(["make", "-n", "-s", "mlflow-server"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = re.sub(r"\\\n\s*", " ", out.stdout).splitlines()
    cmd = next(shlex.split(line) for line in lines if re.search(r"mlflow server\b", line))
    assert cmd[0].endswith("/mlflow") and cmd[1] == "server", cmd
    cmd[0] = str(VENV_BIN / "mlflow")  # the recipe's .venv/bin/mlflow is relative to the repository
    i = cmd.index("--port")
    cmd[i + 1] = str(port)
    return cmd


@pytest.fixture
def restore_mlflow_uri():
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


@pytest.mark.slow
def test_training_logs_to_a_tracking_server(processed_dir, tmp_path, monkeypatch, restore_mlflow_uri):
    from mlflow import MlflowClient
    from PIL import Image

    from srgan.experiment import phase_params, run_training
    from srgan.tracking.mlflow_model import MODEL_CONFIG_KEYS
    from srgan.trainer import TrainData

    server_root = tmp_path / "server"  # the server's working folder (its db and artifact store)
    port = free_port()
    with mlflow_server(server_root, mlflow_server_cmd(server_root, port), port) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # fail fast if the server dies
        cfg = tiny_config()
        data = TrainData.load(processed_dir, cfg.train.val_images)
        model_path = tmp_path / "client" / "generator.keras"
        run_id, result = run_training(cfg, "gan", data, model_path)

        client = MlflowClient(tracking_uri=url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["adv.loss"] == cfg.adv.loss
        # what the phase reads, plus the MLflow Model's config (MLflow logs it onto the source run)
        assert set(run.data.params) == set(phase_params(cfg, "gan")) | set(MODEL_CONFIG_KEYS)
        assert run.data.tags["params.digest"] == cfg.digest()
        assert run.data.metrics["val_psnr_y"] == pytest.approx(result.val["val_psnr_y"])
        assert [m.step for m in client.get_metric_history(run_id, "g_mse")] == [2, 4]
        assert [m.step for m in client.get_metric_history(run_id, "d_loss")] == [2, 4]
        exp = client.get_experiment(run.info.experiment_id)
        assert exp.name == cfg.tracking.experiment

        # artifacts, read back through the client
        assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/generator.keras"]
        pngs = sorted(a.path for a in client.list_artifacts(run_id, "validation"))
        assert pngs == ["validation/step_0000004.png"]
        got = client.download_artifacts(run_id, "model/generator.keras", str(tmp_path / "dl"))
        assert open(got, "rb").read() == model_path.read_bytes()
        grid = np.asarray(Image.open(io.BytesIO(open(
            client.download_artifacts(run_id, pngs[-1], str(tmp_path / "dl")), "rb").read())))
        lr, hr = data.valid[0].lr, data.valid[0].hr
        assert grid.shape == (hr.shape[0], 4 * hr.shape[1] + 3 * 4, 3) and lr.shape[0] * 4 == hr.shape[0]
        assert "config/params.json" in {a.path for a in client.list_artifacts(run_id, "config")}

        # the run's copy and the MLflow Model's data, both uploaded byte for byte
        stored = list((server_root / "mlartifacts").rglob("generator.keras"))
        assert len(stored) == 2 and all(p.read_bytes() == model_path.read_bytes() for p in stored)
        # uploaded through the server: clients need no access to the server's file system
        assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri


@pytest.mark.slow
def test_make_mlflow_server_command_serves_runs_and_artifacts(tmp_path, monkeypatch, restore_mlflow_uri):
    """`make mlflow-server`'s command (started in an empty folder, on a free port) accepts a run with
    params, a metric curve, an image and a file from this project's tracking module."""
    from mlflow import MlflowClient

    from srgan import tracking

    server_root, port = tmp_path / "server", free_port()
    with mlflow_server(server_root, makefile_server_cmd(port), port) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        run = tracking.start_run("srgan", run_name="smoke", tags={"kind": "smoke"})
        run.log_params({"adv.loss": "hinge"})
        for step in (1, 2, 3):
            run.log_metrics({"g_mse": 1.0 / step}, step=step)
        run.log_image(np.full((8, 8, 3), 200, np.uint8), "validation/step_0000003.png")
        (tmp_path / "note.txt").write_text("hello")
        run.log_artifact(tmp_path / "note.txt", "notes")
        run.end()

        client = MlflowClient(tracking_uri=url)
        got = client.get_run(run.run_id)
        assert got.info.status == "FINISHED" and got.data.params == {"adv.loss": "hinge"}
        assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "g_mse")] == \
            [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
        assert [a.path for a in client.list_artifacts(run.run_id, "validation")] == ["validation/step_0000003.png"]
        note = client.download_artifacts(run.run_id, "notes/note.txt", str(tmp_path / "dl"))
        assert open(note).read() == "hello"


@pytest.mark.slow  # several processes
def test_runs_logging_one_dataset_at_once_all_record_it(tmp_path, monkeypatch, restore_mlflow_uri):
    """Tuning workers on one server log the same training set at the same moment: MLflow looks the
    dataset up and then inserts it, so without a retry all but one fail with a UNIQUE violation
    (seen in CI: two PostgreSQL-coordinated workers). Every run must end up linked to one dataset."""
    import threading

    from mlflow import MlflowClient

    from srgan import tracking

    server_root, port = tmp_path / "server", free_port()
    with mlflow_server(server_root, mlflow_server_cmd(server_root, port), port) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        runs = [tracking.start_run("srgan", run_name=f"worker-{i}") for i in range(8)]
        start, errors = threading.Barrier(len(runs)), []

        def log(run: tracking.Run) -> None:
            start.wait()
            try:
                run.log_dataset("sample/train", "cfedd2ad71c7", tmp_path, "training")
            except Exception as err:  # noqa: BLE001 - collected and asserted below
                errors.append(err)

        threads = [threading.Thread(target=log, args=(run,)) for run in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        client = MlflowClient(tracking_uri=url)
        for run in runs:
            inputs = client.get_run(run.run_id).inputs.dataset_inputs
            assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("sample/train", "cfedd2ad71c7")]
