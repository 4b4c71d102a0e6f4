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


@pytest.fixture(scope="module")
def evaluated(processed_dir, tmp_path_factory):
    from srgan.evaluate import evaluate

    tmp = tmp_path_factory.mktemp("eval")
    model = _generator(tmp / "g.keras", zero_residual=True)
    reports = tmp / "reports"
    result = evaluate(tiny_config(), model, processed_dir, reports)
    return processed_dir, reports, result


def test_metrics_files_and_bicubic_baseline(evaluated):
    processed, reports, result = evaluated
    summary = json.loads((reports / "metrics.json").read_text())
    for k in ("psnr_y", "ssim_y", "psnr_rgb", "bicubic_psnr_y", "bicubic_ssim_y", "psnr_y_gain"):
        assert np.isfinite(summary[k]), k
    hr_files = sorted((processed / "valid" / "hr").glob("*.png"))
    rows = list(csv.DictReader((reports / "per_image.csv").open()))
    assert [r["name"] for r in rows] == [p.stem for p in hr_files] and summary["n_images"] == len(rows)
    # the bicubic column is what the metrics module gives for PIL bicubic of the same LR
    lr = images.load_rgb(processed / "valid" / "lr" / hr_files[0].name)
    hr = images.load_rgb(hr_files[0])
    expect = metrics.evaluate_pair(images.upscale_bicubic(lr, 4), hr, 4)
    assert float(rows[0]["bicubic_psnr_y"]) == pytest.approx(expect["psnr_y"], abs=1e-5)
    assert summary["bicubic_ssim_y"] == pytest.approx(np.mean([float(r["bicubic_ssim_y"]) for r in rows]))
    # a generator reduced to its bicubic skip scores (almost) exactly bicubic: both resamplers agree
    assert abs(summary["psnr_y_gain"]) < 0.05, summary
    for name in (p.stem for p in hr_files):
        comp = images.load_rgb(reports / "eval" / f"{name}_compare.png")
        assert comp.shape[1] == 4 * hr.shape[1] + 12 and comp.shape[0] > hr.shape[0]
        assert images.load_rgb(reports / "eval" / f"{name}_sr.png").shape == hr.shape


def test_detail_box_finds_the_textured_region():
    from srgan.evaluate import detail_box

    img = np.full((64, 80, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    img[30:46, 50:66] = rng.integers(0, 255, (16, 16, 3))
    r, c = detail_box(img, 16)
    assert abs(r - 30) <= 1 and abs(c - 50) <= 1


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: `make sysdeps` installs it (root, Debian)")
def test_report_renders_in_a_headless_browser(evaluated, tmp_path):
    from playwright.sync_api import sync_playwright

    from srgan import report

    _, reports, _ = evaluated
    (reports / "train").mkdir(exist_ok=True)
    (reports / "train" / "history.csv").write_text(
        "step,g_mse,val_psnr_y\n2,0.01,\n4,0.008,25.5\n6,0.007,25.9\n")
    (reports / "train" / "train_summary.json").write_text(json.dumps({"run_id": "abc123", "total_steps": 6}))
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
            rows = page.locator("#metrics + table tbody tr")
            assert rows.count() == 3 and "psnr_y" in rows.nth(0).inner_text()
            imgs = page.locator("img")
            assert imgs.count() >= 2  # curves and at least one comparison
            widths = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
            assert all(w and w > 0 for w in widths), widths  # every image decoded
            assert "abc123" in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
        finally:
            browser.close()


def test_self_ensemble_is_reported_next_to_the_single_pass(processed_dir, tmp_path):
    from srgan.evaluate import evaluate

    cfg = tiny_config(**{"evaluate.self_ensemble": True})
    reports = tmp_path / "reports"
    from srgan import models

    g = models.build_generator(cfg.model.generator, 4)
    last = g.get_layer("output_conv")  # zero-initialised (G = bicubic): give it a non-symmetric residual
    rng = np.random.default_rng(0)
    last.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in last.get_weights()])
    g.save(tmp_path / "g.keras")
    summary = evaluate(cfg, tmp_path / "g.keras", processed_dir, reports)["summary"]
    rows = list(csv.DictReader((reports / "per_image.csv").open()))
    for k in ("psnr_y", "ssim_y", "psnr_rgb"):
        assert summary[f"x8_{k}"] == pytest.approx(np.mean([float(r[f"x8_{k}"]) for r in rows]), abs=1e-5)
    assert summary["x8_psnr_y_gain"] == pytest.approx(summary["x8_psnr_y"] - summary["bicubic_psnr_y"])
    # an untrained generator is not flip/rotation-equivariant: the ensemble scores differently
    assert summary["x8_psnr_y"] != pytest.approx(summary["psnr_y"], abs=1e-4)
    from srgan import report

    assert "psnr_y (self-ensemble x8)" in report.build(reports, cfg.flat()).read_text()
