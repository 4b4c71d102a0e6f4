"""The benchmark: report structure and plumbing. Speed is never asserted (shared, noisy CPUs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from srgan import bench, config
from srgan.config import ROOT


# --------------------------------------------------------------------------- pure helpers
def test_stats_and_rates():
    s = bench.stats([4.0, 1.0, 2.0, 3.0])
    assert s["n"] == 4 and s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["q1"] <= s["median"] <= s["q3"]
    r = bench.rate(s, per_call=10.0)
    assert r["median"] == pytest.approx(4.0)
    assert r["min"] == pytest.approx(2.5) and r["max"] == pytest.approx(10.0)
    assert r["iqr_lo"] <= r["median"] <= r["iqr_hi"]
    with pytest.raises(ValueError):
        bench.stats([])


def test_report_is_strict_json_and_written_atomically(tmp_path):
    out = tmp_path / "reports" / "bench.json"
    out.parent.mkdir()
    out.write_text("old content")
    bench.write_report(out, {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    # strict parser: NaN/Inf became null; the old file was replaced whole, no temp file left
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data == {"a": None, "b": [1.0, None], "c": {"d": 2}}
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json"]


def test_parse_variant_maps_atoms_to_config_env_and_steps():
    cfg = tiny_config()
    v = bench.parse_variant("onednn+xla+bf16:g_pretrain/srgan", cfg)
    assert v.name == "onednn+xla+bf16" and v.steps == ("g_pretrain", "srgan")
    assert v.cfg.train.jit_compile and v.cfg.train.precision == "mixed_bfloat16"
    assert v.env == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    plain = bench.parse_variant("plain", cfg)
    assert plain.steps == bench.STEPS and plain.env == {} and plain.cfg == cfg
    assert bench.parse_variant("inter1", cfg).threads == [0, 1]
    with pytest.raises(ValueError, match="unknown variant"):
        bench.parse_variant("fp16", cfg)
    with pytest.raises(ValueError, match="unknown step"):
        bench.parse_variant("plain:g_step", cfg)


def test_cli_rejects_bad_options():
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "steps,nonsense"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--upscale-lr", "510by339"])
    args = bench.parse_args(["--quick"])
    assert args.sections == {"steps", "pipeline", "upscale"} and args.upscale_lr is None
    assert bench.parse_args(["--upscale-lr", "510x339"]).upscale_lr == (339, 510)  # WxH -> (h, w)
    assert bench.upscale_size(False, 128, 24) == (339, 510)
    assert bench.upscale_size(True, 128, 24) == (177, 177)  # one full window (128 + 2*24) + 1 px
    assert bench.parse_args(["--quality"]).sections >= {"quality"}


def test_cpu_info_has_what_the_report_needs():
    info = bench.cpu_info()
    assert info["cores"] >= 1 and isinstance(info["model"], str)
    assert set(info["flags"]) >= {"avx2", "fma", "avx512_bf16", "amx_bf16"}
    assert isinstance(info["native_bf16"], bool)


def test_graph_flop_count_matches_the_analytic_generator_count():
    from srgan import models

    cfg = tiny_config()
    G = models.build_generator(cfg.model.generator, cfg.preprocess.scale)
    shape = (2, 6, 8, 3)
    assert bench.graph_flops(G, shape) == models.generator_flops(G, shape) > 0
    D = models.build_discriminator(cfg.model.discriminator, 16)
    assert bench.graph_flops(D, (2, 16, 16, 3)) == models.generator_flops(D, (2, 16, 16, 3)) > 0


def test_quality_comparison_pairs_seeds_and_judges_against_the_seed_spread():
    def run(seed: int, psnr: float) -> dict:
        return {"seed": seed, "seconds": 1.0, "steps": 3, "val": {"val_psnr_y": psnr, "val_ssim_y": 0.8},
                "bicubic": {"bicubic_psnr_y": 30.0}}

    f32 = bench.quality_summary([run(1, 30.1), run(2, 30.3)])
    close = bench.quality_comparison({"float32": f32,
                                      "mixed_bfloat16": bench.quality_summary([run(1, 30.15), run(2, 30.2)])})
    assert close["quality_psnr_y_bf16_minus_f32"] == pytest.approx(-0.025)
    assert close["quality_paired_deltas_db"] == pytest.approx([0.05, -0.1])
    assert close["quality_seed_spread_db"] == pytest.approx(0.2) and close["quality_equal_within_seed_spread"]
    far = bench.quality_comparison({"float32": f32,
                                    "mixed_bfloat16": bench.quality_summary([run(1, 29.5), run(2, 29.6)])})
    assert far["quality_equal_within_seed_spread"] is False
    assert bench.quality_comparison({"float32": f32, "mixed_bfloat16": {"error": "boom", "runs": []}}) == {}


# --------------------------------------------------------------------------- end to end
def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_run_writes_a_complete_report(processed_dir, tmp_path):
    """`bench.py --quick` on a tiny model: every section present, every figure positive and finite."""
    out = tmp_path / "reports" / "bench.json"
    flags = (
        "--quick --blocks 1 --batch 2 --patch 16 --variants plain --base-variant plain --upscale-lr 40x30 "
        "--matmul-n 256 --quality --quality-steps 2 --quality-gan-steps 1 --quality-blocks 1 "
        "--quality-seeds 1 --quality-batch 2 --quality-patch 16"
    ).split()
    script = ROOT / "src" / "bench.py"
    cmd = [sys.executable, str(script), *flags, "--processed", str(processed_dir), "--out", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=840, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Training steps" in proc.stdout and "Targets" in proc.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json"]  # atomic: no temp file left

    rep = json.loads(out.read_text())
    assert rep["summary"]["errors"] == {}
    seed = config.load().seed
    assert rep["config"]["blocks"] == 1 and rep["config"]["batch"] == 2 and rep["config"]["hr_patch"] == 16
    assert rep["machine"]["cpu"]["cores"] >= 1

    plain = rep["variants"]["plain"]
    assert _positive(plain["matmul"]["flop_per_s"])
    for step in bench.STEPS:
        s = plain["steps"][step]
        assert s["finite"]
        for key in ("first_call_s", "flops_per_step", "flop_per_s"):
            assert _positive(s[key]), (step, key, s[key])
        for key in ("steps_per_s", "hr_mpix_per_s"):
            assert _positive(s[key]["median"]), (step, key)
        assert s["seconds"]["n"] >= 1 and s["seconds"]["min"] <= s["seconds"]["median"] <= s["seconds"]["max"]
    f = plain["flops"]
    assert f["g_pretrain"] == 3 * f["forward_G"] and f["srgan"] > f["d_step"] > f["forward_G"] > 0
    tf = plain["target_flops"]  # 16 blocks, batch 16, HR 96: far more work than the tiny model
    assert tf["g_pretrain"] > 100 * f["g_pretrain"]

    pipe = rep["pipeline"]
    assert _positive(pipe["crops_per_s"]["median"]) and _positive(pipe["feed"]["ratio"])
    assert pipe["variant"] == "plain"

    for size in ("small", "large"):
        u = rep["upscale"][size]
        for key in ("rss_peak_mb", "rss_base_mb", "hr_mpix", "flop_per_s"):
            assert _positive(u[key]), (size, key)
        assert u["rss_peak_delta_mb"] >= 0 and _positive(u["hr_mpix_per_s"]["median"])
    assert rep["upscale"]["large"]["lr_hw"] == [60, 80]
    assert _positive(rep["summary"]["upscale_mem_ratio"])

    for prec in ("float32", "mixed_bfloat16"):
        q = rep["quality"][prec]
        assert [r["precision"] for r in q["runs"]] == [prec] and q["steps"] == 3
        assert _positive(q["psnr_y"]["mean"]) and _positive(q["bicubic_psnr_y"])
        assert [r["seed"] for r in q["runs"]] == [seed]
    assert math.isfinite(rep["summary"]["quality_psnr_y_bf16_minus_f32"])
    assert len(rep["summary"]["quality_paired_deltas_db"]) == 1
    # one seed gives no spread to judge "equal" by (two seeds per precision: test_quality_comparison)
    assert "quality_equal_within_seed_spread" not in rep["summary"]

    rows = {r["target"]: r for r in rep["summary"]["targets"]}
    assert len(rows) == 5
    g = rows["G pretrain steps/s (float32)"]
    # a tiny model is not the target config: no pass/fail, an estimate from FLOP arithmetic instead
    assert g["pass"] is None and g["estimate_pass"] in (True, False)
    assert _positive(g["needs_flop_per_s"]) and isinstance(g["reachable"], bool)
    assert rep["is_target_config"] is False
    assert bench.format_report(rep)  # the table renders from the stored JSON too

    # with two seeds per precision the table pairs them and gives a verdict (runs re-seeded copies)
    for prec in ("float32", "mixed_bfloat16"):
        r0 = rep["quality"][prec]["runs"][0]
        r1 = json.loads(json.dumps(r0))
        r1["seed"], r1["val"]["val_psnr_y"] = seed + 1, r0["val"]["val_psnr_y"] + 5.0  # spread >> any delta
        rep["quality"][prec] = bench.quality_summary([r0, r1])
    rep["summary"].update(bench.quality_comparison(rep["quality"]))
    text = bench.format_report(rep)
    assert "2 seed(s)" in text and "per seed:" in text and "equal within seed noise" in text
