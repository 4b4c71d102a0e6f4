"""The loss study: its cells, how it finds each cell's MLflow run, and its report in a real browser.

The DVC end of it (queued experiments in temporary workspaces, the SRResNet from the run cache) is
tested in tests/test_dvc_pipeline.py; here the runs are trained directly on the tiny config.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from conftest import tiny_config
from srgan import study, tracking

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _cfg(**over):
    return tiny_config(**{"study.losses": ["hinge", "least_squares"], "study.seeds": [1, 2],
                          "study.crop_images": 1, "study.crop_size": 16, **over})


def test_plan_has_one_experiment_per_cell():
    cfg = _cfg()
    exps = study.plan(cfg, "s1")
    assert [(e.loss, e.seed) for e in exps] == [("hinge", 1), ("hinge", 2), ("least_squares", 1),
                                                ("least_squares", 2)]
    assert len({e.name for e in exps}) == 4 and all(e.name.startswith("s1-") for e in exps)
    c = exps[1].config(cfg)
    assert c.adv.loss == "hinge" and c.gan.seed == 2
    # the pretrain stage's params are untouched: every cell gets the same SRResNet from the run cache
    from srgan.experiment import phase_params

    assert {phase_params(e.config(cfg), "pretrain") == phase_params(cfg, "pretrain") for e in exps} == {True}


def test_summarize_means_and_spread_over_seeds():
    def row(loss, seed, psnr, niqe):
        return {"loss": loss, "seed": seed, "arch": "srresnet",
                "metrics": {"eval/valid/psnr_y": psnr, "eval/valid/ssim_y": 0.8, "eval/valid/niqe": niqe,
                            "eval/valid/bicubic_psnr_y": 30.0, "eval/valid/bicubic_niqe": 9.0}}

    rows = [row("hinge", 1, 31.0, 6.0), row("hinge", 2, 32.0, 7.0), row("minimax", 1, 30.5, 8.0)]
    s = study.summarize(rows, ["valid"])["valid"]
    hinge = next(e for e in s["objectives"] if e["method"] == "hinge")
    assert hinge["seeds"] == 2 and hinge["psnr_y"] == 31.5
    assert hinge["psnr_y_std"] == pytest.approx(np.std([31.0, 32.0], ddof=1))
    assert next(e for e in s["objectives"] if e["method"] == "minimax")["psnr_y_std"] == 0.0
    assert s["references"][0] == {"arch": "-", "method": "bicubic", "seeds": 0, "psnr_y": 30.0, "niqe": 9.0}


@pytest.mark.slow
def test_study_finds_every_cell_and_renders_its_report(processed_dir, pretrained, mlflow_uri, tmp_path):
    from srgan import evaluate
    from srgan.experiment import run_training
    from srgan.trainer import TrainData

    cfg = _cfg()
    data = TrainData.load(processed_dir, 1)
    srresnet = pretrained / "models" / "srresnet.keras"
    pre_id, _ = run_training(cfg, "pretrain", data, tmp_path / "s.keras")
    exps = study.plan(cfg, "s1")
    for e in exps:  # what each queued DVC experiment's train and evaluate stages record
        ecfg = e.config(cfg)
        run_id, _ = run_training(ecfg, "gan", data, tmp_path / f"{e.name}.keras", init_generator=srresnet,
                                 extra_tags={"srresnet.run_id": pre_id})
        summary = evaluate.evaluate(ecfg.evaluate, 4, {"srgan": tmp_path / f"{e.name}.keras"},
                                    {"valid": processed_dir / "valid"}, tmp_path / e.name)
        tracking.log_to_run(run_id, evaluate.run_metrics(summary, "srgan"))
    tracking.log_to_run(pre_id, {"eval/valid/psnr_y": 26.0, "eval/valid/ssim_y": 0.7})
    parent = tracking.start_run("srgan", run_name="s1", tags={"kind": "study"})
    rows = study.collect(cfg, exps, parent.run_id, "s1")
    assert sorted((r["loss"], r["seed"]) for r in rows) == [("hinge", 1), ("hinge", 2), ("least_squares", 1),
                                                            ("least_squares", 2)]
    children = [r for r in tracking.search_runs("srgan") if r["tags"].get("mlflow.parentRunId") == parent.run_id]
    assert len(children) == 4 and {c["tags"]["study"] for c in children} == {"s1"}

    out = tmp_path / "compare"
    page = study.write_report(cfg, rows, out, processed_dir / "valid", srresnet, "s1", seconds=60.0)
    text = page.read_text()
    refs = re.findall(r"""(?:src|href)=['"]?([^'" >]+)""", text)
    assert refs and all(r.startswith(("data:", "#")) for r in refs)  # self-contained
    assert (out / "runs.csv").read_text().count("\n") == 5 and (out / "crops").is_dir()
    if CHROMIUM is None:
        pytest.skip("Chromium not found: `make sysdeps` installs it (root, Debian)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pg = browser.new_page()
            pg.goto(page.as_uri())
            body = pg.locator("#set-valid + table tbody tr")
            texts = [body.nth(i).inner_text() for i in range(body.count())]
            assert any(t.startswith("hinge") and "±" in t for t in texts), texts  # mean ± spread of 2 seeds
            assert any(t.startswith("pretrained") for t in texts) and any(t.startswith("bicubic") for t in texts)
            widths = pg.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
            assert len(widths) >= 1 and all(w and w > 0 for w in widths), widths  # crops decoded
            pg.screenshot(path=str(tmp_path / "study.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.slow
def test_study_of_two_generators_and_two_objectives_renders_both(processed_dir, mlflow_uri, tmp_path):
    """The generator as the study's second axis: each architecture from its own pretrained
    generator, every (arch, objective) cell found and shown in the report's table."""
    from srgan import evaluate
    from srgan.experiment import run_training
    from srgan.trainer import TrainData

    cfg = _cfg(**{"study.seeds": [1], "study.archs": ["srresnet", "edsr"]})
    data = TrainData.load(processed_dir, 1)
    exps = study.plan(cfg, "s2")
    assert sorted((e.arch, e.loss) for e in exps) == [("edsr", "hinge"), ("edsr", "least_squares"),
                                                      ("srresnet", "hinge"), ("srresnet", "least_squares")]
    pretrained, pre_ids = {}, {}
    for arch in ("srresnet", "edsr"):  # what the pretrain stage of each arch's experiments gives
        acfg = next(e for e in exps if e.arch == arch).config(cfg)
        pretrained[arch] = tmp_path / f"pre-{arch}.keras"
        pre_ids[arch], _ = run_training(acfg, "pretrain", data, pretrained[arch])
        tracking.log_to_run(pre_ids[arch], {"eval/valid/psnr_y": 26.0, "eval/valid/ssim_y": 0.7})
    for e in exps:
        ecfg = e.config(cfg)
        assert ecfg.model.generator.arch == e.arch
        run_id, _ = run_training(ecfg, "gan", data, tmp_path / f"{e.name}.keras", init_generator=pretrained[e.arch],
                                 extra_tags={"srresnet.run_id": pre_ids[e.arch]})
        summary = evaluate.evaluate(ecfg.evaluate, 4, {"srgan": tmp_path / f"{e.name}.keras"},
                                    {"valid": processed_dir / "valid"}, tmp_path / e.name)
        tracking.log_to_run(run_id, evaluate.run_metrics(summary, "srgan"))
    rows = study.collect(cfg, exps)
    assert sorted((r["arch"], r["loss"]) for r in rows) == sorted((e.arch, e.loss) for e in exps)

    page = study.write_report(cfg, rows, tmp_path / "compare", processed_dir / "valid",
                              pretrained["srresnet"], "s2", seconds=60.0)
    text = page.read_text()
    for arch in ("srresnet", "edsr"):
        for loss in ("hinge", "least_squares"):
            assert f"<td>{loss}</td><td>{arch}</td>" in text, (arch, loss)
        assert f"<td>pretrained (pixel loss, no GAN)</td><td>{arch}</td>" in text, arch  # each arch's own start
