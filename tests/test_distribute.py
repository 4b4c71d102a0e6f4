"""train.distribute: MirroredStrategy on a CPU split into two logical devices gives the same losses as
one device for the same global batch and seed (real TensorFlow, real tf.data, the tiny model).

Logical devices must be configured before TensorFlow initialises, so the training runs in a fresh
subprocess. The discriminator has no batch norm (per-replica BN statistics legitimately differ) and
the adversarial loss is per-sample separable (least squares), so the sum over replicas of
(replica-batch mean / replicas) is exactly the global-batch mean and the summed gradients are the
global-batch gradients. Differences that are expected, not bugs: batch-norm statistics, the random
interpolation of the gradient penalty (wasserstein_gp) and RaGAN's batch means (relativistic_average)
are per replica.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import tiny_config
from srgan.config import ROOT

SCRIPT = textwrap.dedent("""
    import json, logging, sys
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    from srgan import config
    from srgan.trainer import Callback, TrainData, train

    logging.basicConfig(level=logging.INFO)
    runs, processed, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]  # runs: [[name, params]]

    class Steps(Callback):
        def __init__(self):
            self.rows = []

        def on_log(self, step, logs):
            self.rows.append({"step": step, **logs})

    results = {"logical_cpus": len(tf.config.list_logical_devices("CPU"))}
    for name, params in runs:  # one after the other in this process, as tuning trials are
        keras.backend.clear_session()
        cfg = config.from_dict(params)
        data = TrainData.load(processed, cfg.train.val_images)
        pre, gan = Steps(), Steps()
        try:
            trainer, _ = train(cfg, "pretrain", data, None, [pre])
            srresnet = trainer.export_generator(f"{out}.{name}.srresnet.keras")
            trainer, result = train(cfg, "gan", data, None, [gan], init_generator=srresnet,
                                    data_offset=cfg.pretrain.steps)
        except ValueError as exc:  # a config the strategy refuses
            results[name] = {"error": str(exc)}
            continue
        results[name] = {"replicas": trainer.replicas, "rows": pre.rows, "gan_rows": gan.rows, "val": result.val,
                         "weights": [w.numpy().tolist() for w in trainer.G.weights + trainer.D.weights + trainer.generator.weights]}
    with open(out, "w") as f:
        json.dump(results, f)
""")

PHASE1 = ["g_mse"]
PHASE2 = ["g_total", "g_mse", "g_vgg", "g_adv", "d_loss", "d_real", "d_fake"]


def _cfg(**overrides):
    return tiny_config(**{
        "model.discriminator.batch_norm": False, "adv.loss": "least_squares", "loss.w_vgg": 0.01,
        "train.batch_size": 4, "pretrain.steps": 3, "gan.steps": 3, "train.log_every": 1,
        "train.val_every": 6, "train.val_images": 1, "gan.ema_decay": 0.5,  # the average is updated across replicas
        # the float32 round-off these tolerances assume (auto picks bf16 on AVX512-BF16/AMX CPUs)
        "train.precision": "float32", **overrides}).to_dict()


def _run(processed_dir, tmp_path, runs):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(runs), str(processed_dir), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stderr


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_matches_one_device(processed_dir, tmp_path):
    res, log = _run(processed_dir, tmp_path, [
        ["none", _cfg(**{"train.distribute": "none"})],
        ["mirrored", _cfg(**{"train.distribute": "mirrored"})],
        # a second mirrored training in the same process with other shapes, as tuning trials are
        # (wider generator, critic with gradient penalty): it must reuse the strategy, a second
        # MirroredStrategy's all-reduces collide with the first's ("Shape mismatch in the collective")
        ["mirrored_again", _cfg(**{"train.distribute": "mirrored", "model.generator.filters": 8,
                                   "adv.loss": "wasserstein_gp", "pretrain.steps": 2,
                                   "gan.steps": 2, "train.val_every": 4})],
        # the global batch must split evenly
        ["odd_batch", _cfg(**{"train.distribute": "mirrored", "train.batch_size": 3})],
    ])
    assert res["logical_cpus"] == 2
    assert res["none"]["replicas"] == 1
    assert res["mirrored"]["replicas"] == 2, log[-3000:]  # really two replicas, not a fallback
    assert "MirroredStrategy over 2 replicas" in log
    for rows, keys in (("rows", PHASE1), ("gan_rows", PHASE2)):
        one, two = res["none"][rows], res["mirrored"][rows]
        assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
        for a, b in zip(one, two):
            for k in keys:
                # equal to float32 round-off: a wrong replica scaling (x2, /2) or unsynchronised
                # replica weights would be off by far more than this
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-9), (rows, a["step"], k, a[k], b[k])
            assert b["lr"] == pytest.approx(a["lr"])
    # the losses after the updates also agree, so the summed gradients are the global-batch gradients;
    # and the trained G and D weights equal the single-device ones
    assert len(res["none"]["weights"]) == len(res["mirrored"]["weights"]) > 0
    for wa, wb in zip(res["none"]["weights"], res["mirrored"]["weights"]):
        np.testing.assert_allclose(np.array(wb), np.array(wa), rtol=1e-4, atol=1e-7)
    assert res["mirrored"]["val"]["val_psnr_y"] == pytest.approx(res["none"]["val"]["val_psnr_y"], abs=1e-3)

    again = res["mirrored_again"]
    assert again["replicas"] == 2 and [r["step"] for r in again["gan_rows"]] == [1, 2]
    assert again["gan_rows"][-1]["d_gp"] > 0 and np.isfinite(again["val"]["val_psnr_y"])
    assert "train.batch_size: 3 is not divisible by the 2 replicas" in res["odd_batch"]["error"]


def test_make_strategy_none_and_auto_on_a_cpu():
    import tensorflow as tf

    from srgan.distribute import make_strategy

    assert make_strategy("none") is tf.distribute.get_strategy()
    assert make_strategy("none").num_replicas_in_sync == 1
    if len(tf.config.list_logical_devices("GPU")) <= 1:  # auto mirrors only over several GPUs
        assert make_strategy("auto").num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="train.distribute"):
        make_strategy("tpu")


def test_precision_auto_follows_native_bf16():
    from srgan.distribute import choose_precision, cpu_flags

    import tensorflow as tf

    assert choose_precision("float32") == ("float32", "set by train.precision")
    assert choose_precision("mixed_bfloat16")[0] == "mixed_bfloat16"
    if not tf.config.list_physical_devices("GPU"):  # on a CPU it is the flags that decide
        amx = choose_precision("auto", {"avx2", "amx_bf16", "amx_tile"})
        assert amx == ("mixed_bfloat16", "auto: CPU has amx_bf16")
        assert choose_precision("auto", {"avx2", "fma"})[0] == "float32"
        here = choose_precision("auto")
        assert here[0] == ("mixed_bfloat16" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "float32")


def test_make_strategy_multi_worker_needs_tf_config(monkeypatch):
    from srgan.distribute import ClusterError, make_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    # refused before TensorFlow sees the cluster (tests/test_multiworker.py trains with two workers)
    with pytest.raises(ClusterError, match="multi_worker reads the cluster from TF_CONFIG, which is not set"):
        make_strategy("multi_worker")
