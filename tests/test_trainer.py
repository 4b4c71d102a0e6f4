"""Training phases on a tiny model with real TensorFlow, real tf.data and a real MLflow store:
logging, resume after a kill, never reopening a finished run, and damaged checkpoints."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config, write_params
from srgan import dataio, images, tracking
from srgan.config import ROOT


def _client(uri):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_pretrain_then_gan_runs_are_logged_to_mlflow(processed_dir, mlflow_uri, tmp_path, monkeypatch):
    from srgan import models

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # MLflow's own override: the runs are short
    from srgan.experiment import phase_params, run_training
    from srgan.trainer import TrainData

    cfg = tiny_config()
    data = TrainData.load(processed_dir, cfg.train.val_images)
    srresnet = tmp_path / "models" / "srresnet.keras"
    pre_id, pre = run_training(cfg, "pretrain", data, srresnet, tmp_path / "ckpt", tmp_path / "reports" / "pretrain")
    assert pre.step == pre.total_steps == 6
    run_id, result = run_training(cfg, "gan", data, tmp_path / "models" / "generator.keras", tmp_path / "ckpt",
                                  tmp_path / "reports" / "train", init_generator=srresnet, data_offset=6)
    assert result.step == result.total_steps == 4

    client = _client(mlflow_uri)
    pre_run, run = client.get_run(pre_id), client.get_run(run_id)
    assert pre_run.info.status == run.info.status == "FINISHED"
    assert pre_run.data.tags["phase"] == "pretrain" and run.data.tags["phase"] == "gan"
    # each run logs exactly the params its phase reads
    assert pre_run.data.params == {k: str(v) for k, v in phase_params(cfg, "pretrain").items()}
    assert "adv.loss" not in pre_run.data.params and "pretrain.steps" in pre_run.data.params
    assert run.data.params["adv.loss"] == "modified" and run.data.params["gan.steps"] == "4"
    assert not any(k.startswith(("tune.", "data.")) for k in run.data.params)
    for key in ("g_mse", "g_vgg", "g_adv", "g_total", "d_loss", "d_real", "d_fake", "lr",
                "val_psnr_y", "val_ssim_y", "bicubic_psnr_y", "val_psnr_y_gain", "steps_per_s"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(pre_id, "g_mse")] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(run_id, "g_adv")] == [2, 4]
    tags = run.data.tags
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert tags["params.digest"] == cfg.digest() and tags["adv.loss"] == "modified"
    assert tags["data.manifest_digest"] == data.manifest_digest
    arts = {a.path for a in client.list_artifacts(pre_id, "validation")}
    assert arts == {"validation/step_0000005.png", "validation/step_0000006.png"}
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/generator.keras"]
    assert [a.path for a in client.list_artifacts(pre_id, "model")] == ["model/srresnet.keras"]
    # what mlflow ui needs: the model-training view, the Dataset column, the system metrics charts
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
    for r in (pre_run, run):
        inputs = {(d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
                  for d in r.inputs.dataset_inputs}
        assert inputs == {("sample/train", data.manifest_digest[:36], "training"),
                          ("sample/valid", data.manifest_digest[:36], "validation")}, inputs
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(r.data.metrics)

    # the adversarial phase started from the SRResNet: its first validation is near the SRResNet's
    # and both saved generators reload in safe mode
    g, s = models.load_generator(tmp_path / "models" / "generator.keras"), models.load_generator(srresnet)
    lr = data.valid[0].lr[None].astype("float32") / 255
    assert g(lr).shape == s(lr).shape == (1, lr.shape[1] * 4, lr.shape[2] * 4, 3)
    hist = (tmp_path / "reports" / "pretrain" / "history.csv").read_text().splitlines()
    assert hist[0].startswith("step,") and len(hist) == 1 + 4  # logs at 2, 4, 6 + validation at 5
    summary = json.loads((tmp_path / "reports" / "train" / "summary.json").read_text())
    assert summary["run_id"] == run_id and np.isfinite(summary["val_psnr_y"])


def test_gan_phase_starts_from_the_srresnet_weights(processed_dir, pretrained):
    from srgan import models
    from srgan.trainer import Trainer, TrainStateError, prepare_runtime

    cfg = tiny_config()
    rt = prepare_runtime(cfg)
    path = pretrained / "models" / "srresnet.keras"
    t = Trainer(cfg, "gan", rt, init_generator=path)
    for a, b in zip(t.G.get_weights(), models.load_generator(path).get_weights()):
        np.testing.assert_array_equal(a, b)
    wider = tiny_config(**{"model.generator.filters": 8})
    with pytest.raises(TrainStateError, match="does not have the architecture of model.generator"):
        Trainer(wider, "gan", rt, init_generator=path)


@pytest.mark.slow
def test_nan_loss_stops_with_clear_error_and_failed_run(processed_dir, mlflow_uri, tmp_path):
    from srgan.experiment import run_training
    from srgan.trainer import NonFiniteLossError, TrainData

    # an absurd learning rate blows the weights up within a few steps
    cfg = tiny_config(**{"pretrain.lr": 1e30, "pretrain.lr_schedule": "constant"})
    data = TrainData.load(processed_dir, 1)
    with pytest.raises(NonFiniteLossError, match=r"step \d+: non-finite loss"):
        run_training(cfg, "pretrain", data, tmp_path / "g.keras", tmp_path / "ckpt")
    assert not (tmp_path / "g.keras").exists()
    runs = tracking.search_runs(cfg.tracking.experiment)
    assert [r["status"] for r in runs] == ["FAILED"]
    assert "NonFiniteLossError" in runs[0]["tags"]["error"]


def _stage_cmd(params: Path, processed: Path, tmp_path: Path) -> list[str]:
    return [sys.executable, str(ROOT / "src" / "pretrain.py"), "--params", str(params),
            "--processed", str(processed), "--model", str(tmp_path / "models" / "srresnet.keras"),
            "--checkpoints", str(tmp_path / "models" / "checkpoints"), "--reports", str(tmp_path / "reports")]


def _ckpt_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "models" / "checkpoints").glob("pretrain-*"))


@pytest.mark.slow
def test_killed_training_resumes_with_its_run_and_its_curve(processed_dir, mlflow_uri, tmp_path):
    """SIGKILL mid-run; DVC deletes the stage's outs (the curve) before re-running it; run again:
    it continues from the checkpoint, in the same MLflow run, and the curve before the kill is kept."""
    params = write_params(tmp_path / "params.yaml", **{
        "pretrain.steps": 60, "train.checkpoint_every": 5, "train.log_every": 5, "train.val_every": 30})
    cmd = _stage_cmd(params, processed_dir, tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        # an index file is renamed into place last: it names a complete checkpoint
        steps = [int(p.name.split("-")[1].split(".")[0]) for d in _ckpt_dirs(tmp_path) for p in d.glob("ckpt-*.index")]
        if steps and max(steps) >= 10:
            proc.send_signal(signal.SIGKILL)
            killed_after = max(steps)
            break
        time.sleep(0.2)
    proc.wait()
    assert killed_after is not None, "the run ended before it could be killed:\n" + proc.stdout.read()
    assert not (tmp_path / "models" / "srresnet.keras").exists()
    (tmp_path / "reports" / "history.csv").unlink()  # what `dvc repro` does to a stage's outs

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    log = out.stdout + out.stderr
    resumed = int(log.split("resumed from checkpoint at step ")[1].split()[0])
    assert killed_after <= resumed < 60
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["resumed_from"] == resumed and summary["total_steps"] == 60
    # one MLflow run across both processes, finished, with the curve continuing after the resume
    runs = tracking.search_runs("srgan")
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED"
    steps = [s for s, _ in tracking.metric_history(runs[0]["run_id"], "g_mse")]
    assert max(steps) == 60 and resumed + 5 in steps
    # the history file has the steps before the kill too, each once
    hist = [int(float(r["step"])) for r in dataio.read_csv(tmp_path / "reports" / "history.csv")]
    assert hist[:2] == [5, 10] and hist[-1] == 60 and len(hist) == len(set(hist))
    # train.onednn (default true) reached TensorFlow unless the environment set it explicitly
    assert runs[0]["tags"]["env.TF_ENABLE_ONEDNN_OPTS"] == os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1")

    # a param change trains in a new folder and a new run: the finished run is never reopened
    finished = runs[0]
    write_params(params, **{"pretrain.steps": 12, "train.checkpoint_every": 5, "train.log_every": 5})
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = {r["run_id"]: r for r in tracking.search_runs("srgan")}
    assert len(runs) == 2 and runs[finished["run_id"]]["status"] == "FINISHED"
    assert runs[finished["run_id"]]["params"] == finished["params"]  # untouched
    assert max(s for s, _ in tracking.metric_history(finished["run_id"], "g_mse")) == 60
    assert len(_ckpt_dirs(tmp_path)) == 2  # the old params' checkpoints are kept for a revert


def _trained_state(processed_dir: Path, root: Path, steps: int = 6):
    """A finished-looking but unmarked pretrain state folder with checkpoints at 2, 4 and 6."""
    from srgan.state import TrainState, training_digest
    from srgan.trainer import PHASE_PARAMS, TrainData, train

    cfg = tiny_config(**{"pretrain.steps": steps})
    data = TrainData.load(processed_dir, 1)
    state = TrainState(root, "pretrain", training_digest(cfg, "pretrain", PHASE_PARAMS["pretrain"], data.manifest_digest))
    train(cfg, "pretrain", data, state)
    return cfg, data, state


def _flip_block(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flipped_data", "truncated_data", "empty_index", "garbage_state_file"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(processed_dir, tmp_path, caplog, damage):
    from srgan.state import TrainState
    from srgan.trainer import Trainer, prepare_runtime

    cfg, data, state = _trained_state(processed_dir, tmp_path)
    assert state.checkpoints() == [6, 4, 2]
    newest = state.dir / "ckpt-6"
    if damage == "flipped_data":
        _flip_block(newest.with_suffix(".data-00000-of-00001"))
    elif damage == "truncated_data":
        data_file = newest.with_suffix(".data-00000-of-00001")
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 3])
    elif damage == "empty_index":
        newest.with_suffix(".index").write_bytes(b"")
    else:  # TensorFlow's own `checkpoint` state file and our state.json: neither is needed to resume
        (state.dir / "checkpoint").write_text("garbage\x00\x01")
        (state.dir / "state.json").write_text("{not json")
    rt = prepare_runtime(cfg)
    again = TrainState(tmp_path, "pretrain", state.digest)
    with caplog.at_level(logging.WARNING):
        step = again.restore(Trainer(cfg, "pretrain", rt))
    if damage == "garbage_state_file":
        assert step == 6
        assert "state.json is damaged" in caplog.text
    else:
        assert step == 4, caplog.text
        assert f"checkpoint {newest} is damaged" in caplog.text


def test_every_checkpoint_damaged_restarts_from_zero_with_a_warning(processed_dir, tmp_path, caplog):
    from srgan.state import TrainState
    from srgan.trainer import Trainer, prepare_runtime

    cfg, data, state = _trained_state(processed_dir, tmp_path)
    for idx in state.dir.glob("*.index"):
        idx.write_bytes(b"\x00" * 10)
    rt = prepare_runtime(cfg)
    with caplog.at_level(logging.WARNING):
        assert TrainState(tmp_path, "pretrain", state.digest).restore(Trainer(cfg, "pretrain", rt)) == 0
    assert "no intact checkpoint" in caplog.text


def test_a_completed_training_is_never_resumed_and_old_params_are_kept(processed_dir, tmp_path):
    from srgan.state import TrainState

    cfg, data, state = _trained_state(processed_dir, tmp_path)
    state.bind_run("run-a")
    assert TrainState(tmp_path, "pretrain", state.digest).run_id == "run-a"  # unfinished: resumable
    state.mark_complete()
    fresh = TrainState(tmp_path, "pretrain", state.digest)
    assert fresh.run_id is None and fresh.checkpoints() == []  # finished: start afresh, new run
    other = TrainState(tmp_path, "pretrain", "f" * 64)  # another digest: another folder
    assert other.dir != fresh.dir and fresh.dir.exists()
    for i in range(TrainState.KEEP_FOLDERS + 2):
        TrainState(tmp_path, "pretrain", f"{i:x}" * 64)
    assert len(list(tmp_path.glob("pretrain-*"))) == TrainState.KEEP_FOLDERS


def test_lr_schedules():
    from srgan.trainer import lr_schedule

    phase = tiny_config(**{"gan.steps": 100, "gan.lr": 1e-3, "gan.lr_decay_every": 0,
                           "gan.lr_decay_factor": 0.1}).gan
    assert lr_schedule(phase.model_copy(update={"lr_schedule": "constant"})) == 1e-3
    step = lr_schedule(phase.model_copy(update={"lr_schedule": "step"}))
    assert float(step(49)) == pytest.approx(1e-3) and float(step(50)) == pytest.approx(1e-4)
    cos = lr_schedule(phase.model_copy(update={"lr_schedule": "cosine"}))
    assert float(cos(0)) == pytest.approx(1e-3) and float(cos(100)) == pytest.approx(0.0, abs=1e-9)


def test_public_steps_return_their_loss_parts(processed_dir):
    import tensorflow as tf

    from srgan.trainer import Trainer, prepare_runtime

    cfg = tiny_config()
    rt = prepare_runtime(cfg)
    lr, hr = tf.random.uniform((4, 4, 4, 3)), tf.random.uniform((4, 16, 16, 3))
    # the pretrain loss (l1 by default) and MSE, which is always logged (PSNR's own loss)
    assert set(Trainer(cfg, "pretrain", rt).pretrain_step((lr, hr))) == {"g_mse", "g_l1"}
    assert set(Trainer(tiny_config(**{"pretrain.loss": "mse"}), "pretrain", rt).pretrain_step((lr, hr))) == {"g_mse"}
    gan = Trainer(cfg, "gan", rt)
    assert set(gan.d_step((lr, hr))) == {"d_loss", "d_gp"}
    parts = gan.gan_step((lr, hr))
    assert {"g_total", "g_mse", "g_vgg", "g_adv", "d_loss", "d_real", "d_fake"} <= set(parts)
    assert all(np.isfinite(float(v)) for v in parts.values())
    # adv.r1_weight > 0 adds the R1 penalty to D's loss, for any objective, and logs it
    r1 = Trainer(tiny_config(**{"adv.r1_weight": 1.0, "adv.loss": "relativistic_average"}), "gan", rt)
    assert set(r1.d_step((lr, hr))) == {"d_loss", "d_gp", "d_r1"}
    parts = r1.gan_step((lr, hr))
    assert float(parts["d_r1"]) > 0 and float(parts["d_gp"]) == 0 and np.isfinite(float(parts["d_loss"]))


def test_control_arm_trains_g_without_a_discriminator(processed_dir):
    """adv.loss: none is the same phase with no adversarial term: no D is built or updated, and G
    still learns from the pixel and VGG terms."""
    import tensorflow as tf

    from srgan.trainer import Trainer, prepare_runtime

    cfg = tiny_config(**{"adv.loss": "none"})
    rt = prepare_runtime(cfg, "gan")
    gan = Trainer(cfg, "gan", rt)
    assert gan.D is None and gan.d_step is None and gan.adv is None
    assert "discriminator" not in gan.checkpoint._trackable_children()  # nothing of a D is saved either
    lr, hr = tf.random.uniform((4, 4, 4, 3)), tf.random.uniform((4, 16, 16, 3))
    before = [w.numpy().copy() for w in gan.G.trainable_variables]
    parts = gan.gan_step((lr, hr))
    assert set(parts) == {"g_total", "g_mse", "g_vgg"}  # no adversarial part, no D outputs
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, gan.G.trainable_variables))
    # validation still scores the generator, but there is no D whose health to report
    val, _ = gan.validate(images.load_pairs(processed_dir / "valid", limit=1))
    assert "val_psnr_y" in val and not any(k.startswith("val_d_") for k in val)


def test_generator_average_is_what_validation_and_export_see_and_resume_restores(processed_dir, tmp_path):
    """gan.ema_decay: after each step G_ema = d * G_ema + (1 - d) * G; validation scores it, export
    saves it, a checkpoint holds it; with 0 there is no average and G itself is the generator."""
    import tensorflow as tf

    from srgan import models
    from srgan.state import TrainState
    from srgan.trainer import Trainer, prepare_runtime

    d = 0.9
    cfg = tiny_config(**{"gan.ema_decay": d})
    rt = prepare_runtime(cfg, "gan")
    gan = Trainer(cfg, "gan", rt)
    assert gan.generator is gan.G_ema
    start = [w.numpy().copy() for w in gan.G.trainable_variables]
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(start, gan.G_ema.trainable_variables))
    lr, hr = tf.random.uniform((4, 4, 4, 3), seed=1), tf.random.uniform((4, 16, 16, 3), seed=2)
    expect = start
    for _ in range(3):
        gan.gan_step((lr, hr))
        expect = [d * e + (1 - d) * w.numpy() for e, w in zip(expect, gan.G.trainable_variables)]
    got = [w.numpy() for w in gan.G_ema.trainable_variables]
    assert all(np.allclose(e, g, atol=1e-6) for e, g in zip(expect, got))
    assert any(not np.allclose(g, w.numpy()) for g, w in zip(got, gan.G.trainable_variables))  # an average, not G
    # export saves the average
    saved = models.load_generator(gan.export_generator(tmp_path / "g.keras"))
    assert all(np.array_equal(a, b) for a, b in zip(saved.get_weights(), gan.G_ema.get_weights()))
    # validation scores the average: the same figures as a generator holding only those weights
    pairs = images.load_pairs(processed_dir / "valid", limit=1)
    val, _ = gan.validate(pairs)
    off = tiny_config(**{"gan.ema_decay": 0.0})
    plain = Trainer(off, "gan", prepare_runtime(off, "gan"))
    assert plain.G_ema is None and plain.generator is plain.G  # no average: G itself
    plain.G.set_weights(gan.G_ema.get_weights())
    plain.D.set_weights(gan.D.get_weights())
    assert val["val_psnr_y"] == pytest.approx(plain.validate(pairs)[0]["val_psnr_y"], abs=1e-9)
    # a checkpoint holds it: a new trainer resumes with the average, not with G's weights
    state = TrainState(tmp_path, "gan", "e" * 64)
    state.save(gan, 3)
    again = Trainer(cfg, "gan", rt)
    assert TrainState(tmp_path, "gan", "e" * 64).restore(again) == 3
    assert all(np.array_equal(a, b) for a, b in zip(again.G_ema.get_weights(), gan.G_ema.get_weights()))


def test_d_learning_rate_is_its_own(processed_dir):
    """gan.d_lr (TTUR): D's optimizer follows the same schedule from its own rate."""
    from srgan.trainer import Trainer, prepare_runtime

    cfg = tiny_config(**{"gan.lr": 1e-4, "gan.d_lr": 4e-4, "gan.lr_schedule": "constant"})
    rt = prepare_runtime(cfg, "gan")
    gan = Trainer(cfg, "gan", rt)
    assert float(gan.opt_g.learning_rate) == pytest.approx(1e-4)
    assert float(gan.opt_d.learning_rate) == pytest.approx(4e-4)


def test_validation_reports_d_health_and_warns_at_chance(processed_dir, caplog):
    from srgan.trainer import Trainer, d_health_warning, prepare_runtime

    cfg = tiny_config()
    rt = prepare_runtime(cfg, "gan")
    gan = Trainer(cfg, "gan", rt)
    state = [w.numpy().copy() for w in gan.D.weights]
    val, _ = gan.validate(images.load_pairs(processed_dir / "valid", limit=2))
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(state, gan.D.weights))  # judging changes nothing of D
    assert {"val_d_acc", "val_d_auc", "val_d_gap", "val_artifact"} <= set(val)
    assert 0.0 <= val["val_d_acc"] <= 1.0 and 0.0 <= val["val_d_auc"] <= 1.0
    assert "0.42 (< 0.75; 0.5 is chance)" in d_health_warning({"val_d_acc": 0.42})
    assert d_health_warning({"val_d_acc": 0.8}) is None and d_health_warning({"val_psnr_y": 20.0}) is None


@pytest.mark.slow
def test_same_params_same_machine_give_the_same_model_bytes(processed_dir, mlflow_uri, tmp_path):
    """Two runs of the pretrain stage in two processes (fresh state each): byte-identical
    srresnet.keras, so DVC sees an unchanged output and re-runs nothing downstream."""
    params = write_params(tmp_path / "params.yaml", **{"pretrain.steps": 12})
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    models = []
    for i in range(2):
        root = tmp_path / f"run{i}"
        out = subprocess.run(_stage_cmd(params, processed_dir, root), env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        models.append((root / "models" / "srresnet.keras").read_bytes())
    assert models[0] == models[1]
def test_validation_in_mixed_precision_scores_the_float32_model(processed_dir):
    """Validation during bf16 training runs the float32 copy the saved file loads as, so its
    figures are the evaluate stage's (same images, tiles, arithmetic)."""
    import keras

    from srgan import evaluate, images, metrics, models
    from srgan.trainer import Trainer, prepare_runtime

    cfg = tiny_config(**{"train.precision": "mixed_bfloat16"})
    rt = prepare_runtime(cfg, "pretrain")
    tr = Trainer(cfg, "pretrain", rt)
    assert tr.G.layers[2].compute_dtype == "bfloat16"
    pairs = images.load_pairs(processed_dir / "valid", limit=1)
    val, _ = tr.validate(pairs)
    keras.mixed_precision.set_global_policy("float32")
    copy = models.float32_copy(tr.G)
    assert all(layer.compute_dtype == "float32" for layer in copy.layers if hasattr(layer, "compute_dtype"))
    sr = evaluate.generator_upscaler(copy, cfg.evaluate)(pairs[0].lr, 4)
    assert val["val_psnr_y"] == metrics.psnr_y(sr, pairs[0].hr, 4)
