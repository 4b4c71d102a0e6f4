"""The benchmark's bookkeeping and plumbing. Speed is never asserted (shared, noisy CPUs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import tiny_config

from srgan.bench import cli, quality, report, steps, timing
from srgan.config import ROOT

SRC = str(ROOT / "src")
# a torch_peer spec small enough for a second on any CPU
TINY_PEER = {"job": "torch_peer", "steps": ["g_pretrain", "srgan"], "timing": {"warmup": 1, "repeats": 1},
             "precisions": ["float32"]}


def _child(python: str, spec: dict, *pre: str) -> dict:
    """Run ``srgan.bench.child`` under ``python`` (``pre``: arguments before the module, e.g. -c)."""
    env = {**os.environ, "PYTHONPATH": SRC, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [python, *(pre or ("-m", "srgan.bench.child"))]
    proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_stats_and_rate():
    s = timing.stats([4.0, 1.0, 2.0, 3.0])
    assert (s["n"], s["median"], s["min"], s["max"]) == (4, 2.5, 1.0, 4.0) and s["q1"] <= 2.5 <= s["q3"]
    r = timing.rate(s, per_call=10.0)
    assert r["median"] == pytest.approx(4.0) and r["iqr_lo"] <= r["median"] <= r["iqr_hi"]
    assert timing.stats([3.0])["q1"] == timing.stats([3.0])["q3"] == 3.0
    with pytest.raises(ValueError):
        timing.stats([])


def test_step_flops_follow_the_convention_on_the_models_own_counts():
    from srgan import models

    cfg = tiny_config()
    G = models.build_generator(cfg.model.generator, 4)
    D = models.build_discriminator(cfg.model.discriminator, 16)
    f = steps.step_flops(G, D, "block1_conv2", batch=2, patch=16, scale=4)
    f_g = models.generator_flops(G, (2, 4, 4, 3))
    f_d, f_d2 = models.generator_flops(D, (2, 16, 16, 3)), models.generator_flops(D, (4, 16, 16, 3))
    f_v = 2 * (2 * 16 * 16 * 9 * 3 * 64 + 2 * 16 * 16 * 9 * 64 * 64)  # VGG19 to block1_conv2, 2 images
    assert f["forward_G"] == f_g > 0 and f["forward_D"] == f_d > 0 and f["forward_VGG"] == f_v
    assert f["g_pretrain"] == 3 * f_g  # trained: 3x forward
    assert f["d_step"] == f_g + 3 * f_d2  # G forward only; D trained on real + fake
    assert f["srgan"] == 3 * f_g + 3 * f_d2 + f_d + 2 * f_v + f_v  # D and VGG pass G's gradient back
    assert steps.step_flops(G, D, None, 2, 16, 4)["srgan"] == 3 * f_g + 3 * f_d2 + f_d  # no VGG loss


def test_each_step_is_measured_against_the_limit_of_its_own_precision():
    limits = {"float32": {"flop_per_s": 100e9}, "bfloat16": {"flop_per_s": 10e9}}
    bf16 = {"precision": "mixed_bfloat16", "limits": limits, "steps": {"g_pretrain": {"flop_per_s": 5e9}}}
    assert steps.limit_fraction(bf16, "g_pretrain") == pytest.approx(0.5)
    f32 = {**bf16, "precision": "float32"}
    assert steps.limit_fraction(f32, "g_pretrain") == pytest.approx(0.05)


def test_quality_summary_gives_mean_and_seed_spread():
    def runs(prec, *psnr):
        return [{"precision": prec, "seed": 42 + i, "seconds": 1.0, "psnr_y": p} for i, p in enumerate(psnr)]

    q = quality.summarize({"float32": runs("float32", 30.1, 30.3), "mixed_bfloat16": runs("mixed_bfloat16", 30.15, 30.2)})
    assert q["float32"]["mean"] == pytest.approx(30.2) and q["float32"]["spread"] == pytest.approx(0.2)
    assert q["float32"]["seeds"] == [42, 43]
    assert q["bf16_minus_f32_db"] == pytest.approx(-0.025) and q["seed_spread_db"] == pytest.approx(0.2)
    assert q["equal_within_seed_spread"] is True
    far = quality.summarize({"float32": runs("float32", 30.1, 30.3), "mixed_bfloat16": runs("mixed_bfloat16", 29.5, 29.6)})
    assert far["equal_within_seed_spread"] is False
    assert "equal_within_seed_spread" not in quality.summarize({"float32": runs("float32", 30.0),
                                                                "mixed_bfloat16": runs("mixed_bfloat16", 30.0)})


def test_variants_map_atoms_to_config_and_environment():
    cfg = tiny_config()
    v = cli.parse_variant("onednn+bf16", cfg)
    assert v.env == {"TF_ENABLE_ONEDNN_OPTS": "1"} and v.cfg.train.precision == "mixed_bfloat16"
    x = cli.parse_variant("xla", cfg)
    assert x.cfg.train.jit_compile and x.env == {}
    assert cli.parse_variant("plain", cfg).cfg == cfg
    with pytest.raises(ValueError, match="unknown variant"):
        cli.parse_variant("fp16", cfg)
    with pytest.raises(SystemExit):
        cli.parse_args(["--only", "steps,nonsense"])
    assert cli.parse_args(["--quality"]).sections == {"steps", "pipeline", "upscale", "torch", "quality"}
    assert cli.parse_args(["--upscale-lr", "510x339"]).upscale_lr == (339, 510)  # WxH -> (h, w)


def test_torch_python_defaults_to_the_environment_then_this_interpreter(monkeypatch):
    monkeypatch.delenv("BENCH_TORCH_PYTHON", raising=False)
    assert cli.parse_args([]).torch_python == sys.executable
    monkeypatch.setenv("BENCH_TORCH_PYTHON", "/opt/torch/bin/python")
    assert cli.parse_args([]).torch_python == "/opt/torch/bin/python"
    assert cli.parse_args(["--torch-python", "/x/python"]).torch_python == "/x/python"  # the flag wins


def test_report_is_strict_json_written_atomically(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("old")
    report.write_report(out, {"a": float("nan"), "b": [1.0, float("inf")]})
    assert json.loads(out.read_text(), parse_constant=pytest.fail) == {"a": None, "b": [1.0, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_torch_peer_is_skipped_with_a_message_without_torch():
    shim = "import sys, runpy; sys.modules['torch'] = None; runpy.run_module('srgan.bench.child', run_name='__main__')"
    spec = {**TINY_PEER, "net": {}}
    res = _child(sys.executable, spec, "-c", shim)
    assert res == {"skipped": res["skipped"]} and "torch is not importable" in res["skipped"]


def test_torch_peer_runs_a_tiny_step_when_torch_is_installed():
    python = os.environ.get("BENCH_TORCH_PYTHON", sys.executable)
    if subprocess.run([python, "-c", "import torch"], capture_output=True).returncode:
        pytest.skip(f"torch is not importable by {python} (set BENCH_TORCH_PYTHON to an interpreter with torch)")
    from srgan.bench import torch_peer

    res = _child(python, {**TINY_PEER, "net": torch_peer.net_spec(tiny_config())})
    for name in TINY_PEER["steps"]:
        r = res["precisions"]["float32"][name]
        assert r["finite"] and r["per_s"]["median"] > 0 and r["first_call_s"] > 0


@pytest.mark.slow
def test_quick_run_writes_every_section(processed_dir, tmp_path):
    out = tmp_path / "reports" / "bench.json"
    flags = ["--quick", "--blocks", "1", "--batch", "2", "--patch", "16", "--upscale-lr", "40x30", "--matmul-n", "256", "--quality", "--quality-steps", "2", "--quality-seeds", "1"]
    cmd = [sys.executable, str(ROOT / "src" / "bench.py"), *flags, "--processed", str(processed_dir), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=840, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Training steps" in proc.stdout and "feed ratio" in proc.stdout
    rep = json.loads(out.read_text())
    assert rep["summary"]["errors"] == {} and [p.name for p in out.parent.iterdir()] == ["bench.json"]
    v = rep["variants"]["onednn"]
    assert set(v["limits"]) == {"float32", "bfloat16"} and v["precision"] == "float32"
    for name in steps.STEPS:
        s = v["steps"][name]
        assert s["finite"] and s["flops"] > 0 and s["per_s"]["median"] > 0 and math.isfinite(steps.limit_fraction(v, name))
    assert rep["pipeline"]["crops_per_s"]["median"] > 0 and rep["pipeline"]["feed_ratio"] > 0
    assert rep["upscale"]["large"]["lr_hw"] == [60, 80] and rep["summary"]["upscale_mem_ratio"] > 0
    peer = rep["summary"]["steps"].values()  # with BENCH_TORCH_PYTHON set, the peer runs and gives each ratio
    assert "skipped" in rep["torch_peer"] or all(r["project_over_torch"] > 0 for r in peer), rep["torch_peer"]
    assert {"float32", "mixed_bfloat16", "bf16_minus_f32_db"} <= set(rep["quality"])
    assert report.format_report(rep)  # the table renders from the stored JSON too
