"""The training loop on a tiny model with real TensorFlow, real tf.data and a real MLflow store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY, tiny_config
from srgan import config, tracking
from srgan.config import ROOT


def _client(uri):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_training_run_is_logged_to_mlflow(processed_dir, mlflow_uri, tmp_path):
    from srgan import models
    from srgan.experiment import run_training
    from srgan.trainer import TrainData

    cfg = tiny_config()
    data = TrainData.load(processed_dir, cfg.train.val_images)
    model_path = tmp_path / "models" / "generator.keras"
    run_id, result = run_training(cfg, data, model_path, tmp_path / "ckpt", tmp_path / "reports")
    assert result.step == result.total_steps == 10

    run = _client(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["adv.loss"] == "modified" and run.data.params["train.gan_steps"] == "4"
    assert len(run.data.params) == len(cfg.flat())
    for key in ("g_mse", "g_vgg", "g_adv", "g_total", "d_loss", "d_real", "d_fake", "lr",
                "val_psnr_y", "val_ssim_y", "bicubic_psnr_y", "val_psnr_y_gain", "steps_per_s"):
        assert key in run.data.metrics, key
    steps = [m.step for m in _client(mlflow_uri).get_metric_history(run_id, "g_mse")]
    assert steps == [2, 4, 6, 8, 10]
    tags = run.data.tags
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert tags["params.digest"] == cfg.digest()
    assert tags["data.manifest_digest"] == data.manifest_digest
    arts = {a.path for a in _client(mlflow_uri).list_artifacts(run_id, "validation")}
    assert arts == {"validation/step_0000005.png", "validation/step_0000010.png"}
    assert [a.path for a in _client(mlflow_uri).list_artifacts(run_id, "model")] == ["model/generator.keras"]

    # the saved generator reloads in safe mode and reproduces the trained model's output
    g = models.load_generator(model_path)
    lr = data.valid[0][1][None].astype("float32") / 255
    assert g(lr).shape == (1, lr.shape[1] * 4, lr.shape[2] * 4, 3)
    hist = (tmp_path / "reports" / "history.csv").read_text().splitlines()
    assert hist[0].startswith("step,") and len(hist) == 1 + 6  # 5 log steps + validation at 5
    summary = json.loads((tmp_path / "reports" / "train_summary.json").read_text())
    assert summary["run_id"] == run_id and np.isfinite(summary["val_psnr_y"])


@pytest.mark.slow
def test_nan_loss_stops_with_clear_error_and_failed_run(processed_dir, mlflow_uri, tmp_path):
    from srgan.experiment import run_training
    from srgan.trainer import NonFiniteLossError, TrainData

    # an absurd learning rate blows the weights up within a few steps
    cfg = tiny_config(**{"train.lr_pretrain": 1e30, "train.lr_schedule_pretrain": "constant"})
    data = TrainData.load(processed_dir, 1)
    with pytest.raises(NonFiniteLossError, match=r"step \d+: non-finite loss"):
        run_training(cfg, data, tmp_path / "g.keras", tmp_path / "ckpt")
    assert not (tmp_path / "g.keras").exists()
    runs = tracking.search_runs(cfg.tracking.experiment)
    assert [r["status"] for r in runs] == ["FAILED"]
    assert "NonFiniteLossError" in runs[0]["tags"]["error"]


def _write_params(path: Path, **overrides) -> Path:
    data = json.loads(json.dumps(TINY))
    for k, v in overrides.items():
        config.set_dotted(data, k, v)
    config.from_dict(data)  # validate
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_killed_training_resumes_from_checkpoint(processed_dir, mlflow_uri, tmp_path):
    """SIGKILL mid-run, run again: it continues from the checkpointed step to the same final step."""
    params = _write_params(tmp_path / "params.yaml", **{
        "train.pretrain_steps": 40, "train.gan_steps": 20, "train.checkpoint_every": 5,
        "train.log_every": 5, "train.val_every": 30})
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), "--params", str(params),
           "--processed", str(processed_dir), "--models", str(tmp_path / "models"),
           "--reports", str(tmp_path / "reports")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    ckpt = tmp_path / "models" / "checkpoints"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        # The state file names the last *completed* checkpoint (TF rewrites it atomically after
        # the data and index files). A ckpt-N.index alone may belong to a save still in progress,
        # which a kill legitimately discards.
        state = ckpt / "checkpoint"
        latest = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', state.read_text(), re.M) \
            if state.exists() else None
        if latest and int(latest.group(1)) >= 10:
            proc.send_signal(signal.SIGKILL)
            killed_after = int(latest.group(1))
            break
        time.sleep(0.2)
    proc.wait()
    assert killed_after is not None, "the run ended before it could be killed:\n" + proc.stdout.read()
    assert not (tmp_path / "models" / "generator.keras").exists()

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    log = out.stdout + out.stderr
    resumed = int(log.split("resumed from checkpoint at step ")[1].split()[0])
    assert resumed >= killed_after and resumed < 60
    summary = json.loads((tmp_path / "reports" / "train_summary.json").read_text())
    assert summary["resumed_from"] == resumed and summary["total_steps"] == 60
    assert (tmp_path / "models" / "generator.keras").exists()
    # one MLflow run across both processes, finished, with the curve continuing after the resume
    runs = tracking.search_runs("srgan")
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED"
    steps = [s for s, _ in tracking.metric_history(runs[0]["run_id"], "g_mse")]
    assert max(steps) == 60 and resumed + 5 in steps
    # train.onednn (default true) reached TensorFlow unless the environment set it explicitly
    assert runs[0]["tags"]["env.TF_ENABLE_ONEDNN_OPTS"] == os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1")


def test_lr_schedules():
    from srgan.trainer import lr_schedule

    cfg = tiny_config(**{"train.lr_decay_every": 0, "train.lr_decay_factor": 0.1})
    assert lr_schedule(1e-3, 100, "constant", cfg) == 1e-3
    step = lr_schedule(1e-3, 100, "step", cfg)
    assert float(step(49)) == pytest.approx(1e-3) and float(step(50)) == pytest.approx(1e-4)
    cos = lr_schedule(1e-3, 100, "cosine", cfg)
    assert float(cos(0)) == pytest.approx(1e-3) and float(cos(100)) == pytest.approx(0.0, abs=1e-9)


def test_image_grid_layout():
    from srgan.trainer import image_grid

    lr = np.zeros((4, 5, 3), np.uint8)
    hr = np.full((16, 20, 3), 7, np.uint8)
    grid = image_grid(lr, hr, hr, hr)
    assert grid.shape == (16, 4 * 20 + 3 * 4, 3)
    assert (grid[:, :20] == 0).all() and (grid[:, 20:24] == 255).all() and (grid[:, -20:] == 7).all()
