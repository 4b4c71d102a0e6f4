"""The loss study: its arms and seeds, the record its report is rebuilt from (the runs nested under
its MLflow parent), adaptive seeds, the statistics and verdict in a real browser, and MOS.

The DVC end of it (queued experiments in temporary workspaces, the SRResNet from the run cache) is
tested in tests/test_dvc_pipeline.py; here each experiment's train and evaluate stages are run
directly on the tiny config, recording what the stages record.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import dvc_env, run_ok, tiny_config
from srgan import distribute, study, tracking
from srgan.config import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _cfg(**over):
    return tiny_config(**{"study.losses": ["none", "hinge", "least_squares"], "study.seeds": [1, 2],
                          "study.crop_images": 1, "study.crop_size": 16, "evaluate.niqe": "none", **over})


def test_plan_has_one_experiment_per_arm_and_seed():
    cfg = _cfg()
    exps = study.plan(cfg, "s1")
    assert [(e.loss, e.seed) for e in exps] == [("none", 1), ("none", 2), ("hinge", 1), ("hinge", 2),
                                                ("least_squares", 1), ("least_squares", 2)]
    assert len({e.name for e in exps}) == 6 and all(e.name.startswith("s1-") for e in exps)
    c = exps[3].config(cfg)
    assert c.adv.loss == "hinge" and c.gan.seed == 2
    # the pretrain stage's params are untouched: every run gets the same SRResNet from the run cache
    from srgan.experiment import phase_params

    assert {phase_params(e.config(cfg), "pretrain") == phase_params(cfg, "pretrain") for e in exps} == {True}
    # an added round: only the named arms, with their new seeds
    assert [(e.loss, e.seed) for e in study.plan(cfg, "s1", {"hinge": [3]}) if e.loss == "hinge"] == [("hinge", 3)]


def test_each_objective_can_run_at_its_own_params():
    from srgan.config import ConfigError

    cfg = _cfg(**{"study.arm_params": {"hinge": {"loss.w_adv": 0.002, "gan.d_lr": 0.0003}}})
    study.check_config(cfg)
    by_loss = {e.loss: e.config(cfg) for e in study.plan(cfg, "s1")}
    assert (by_loss["hinge"].loss.w_adv, by_loss["hinge"].gan.d_lr) == (0.002, 0.0003)
    assert by_loss["least_squares"].loss.w_adv == by_loss["none"].loss.w_adv == cfg.loss.w_adv
    # equal tuning's choice wins over the declared params for what it searched
    tuned = {e.loss: e.config(cfg) for e in study.plan(cfg, "s1", tuned={"hinge": {"loss.w_adv": 0.004}})}
    assert (tuned["hinge"].loss.w_adv, tuned["hinge"].gan.d_lr) == (0.004, 0.0003)
    for bad, message in (({"hinge": {"loss.w_advv": 1.0}}, "study.arm_params.hinge: loss.w_advv: unknown key"),
                         ({"hinge": {"loss.w_adv": -1.0}}, "study.arm_params.hinge: loss.w_adv: -1.0 is out"),
                         ({"hinge": {"gan.seed": 3}}, "study.arm_params.hinge: gan.seed is set by the study"),
                         ({"hing": {}}, "study.arm_params.hing: 'hing' is not allowed; allowed values: 'minimax'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            study.check_config(_cfg(**{"study.arm_params": bad}))


def test_criterion_says_which_objective_works_and_why_not():
    cfg = _cfg(**{"study.losses": ["none", "hinge", "least_squares", "minimax", "modified"],
                  "study.decide_by": "niqe", "study.min_gain_sds": 2.0, "study.max_psnr_drop": 1.0})
    srresnet = {"img0": {"srresnet_psnr_y": 29.0}, "img1": {"srresnet_psnr_y": 29.0}}

    def row(loss, seed, niqe, psnr, d_acc):
        m = {"eval/valid/niqe": niqe, "eval/valid/psnr_y": psnr}
        if loss != "none":
            m["eval/valid/d_acc"] = d_acc
        return {"loss": loss, "seed": seed, "arch": "srresnet", "metrics": m, "per_image": {"valid": srresnet}}

    rows = [row("none", s, 6.4 + 0.02 * s, 28.9, None) for s in (1, 2, 3)]
    rows += [row("hinge", s, 5.8 + 0.05 * s, 28.5, 0.85) for s in (1, 2, 3)]  # works
    rows += [row("least_squares", s, 5.8 + 0.05 * s, 28.5, 0.70) for s in (1, 2, 3)]  # D at chance-ish
    rows += [row("minimax", s, [5.2, 6.0, 6.6][s - 1], 28.5, 0.85) for s in (1, 2, 3)]  # gain inside 2 SD
    rows += [row("modified", s, 5.0 + 0.05 * s, 27.5, 0.9) for s in (1, 2, 3)]  # costs 1.5 dB
    crit = study.criterion(cfg, rows, "valid")
    assert crit["hinge"]["met"] and crit["hinge"]["d_acc"] == [0.85] * 3
    assert crit["hinge"]["gain"] == pytest.approx(6.44 - 5.9) and crit["hinge"]["psnr_drop"] == pytest.approx(0.5)
    assert crit["least_squares"]["fails"] == ["D accuracy below 0.75"]
    assert crit["minimax"]["fails"] == ["NIQE gain not above 2 SD"]
    assert crit["modified"]["fails"] == ["loses more than 1 dB psnr_y to the SRResNet"]
    one_seed = study.criterion(cfg, [r for r in rows if r["seed"] == 1], "valid")
    assert "NIQE gain not above 2 SD" in one_seed["hinge"]["fails"]  # one seed has no spread: no claim
    for r in rows:  # what each run logged: hinge ran at its own weight
        r["params"] = {"adv.loss": r["loss"], "gan.seed": str(r["seed"]), "gan.lr": "0.0001",
                       "loss.w_adv": "0.002" if r["loss"] == "hinge" else "0.0005"}
    settings = study.arm_settings(rows)
    assert settings["hinge"] == {"loss.w_adv": "0.002"} and settings["none"] == {"loss.w_adv": "0.0005"}
    table = study.criterion_table(crit, cfg, settings)
    assert "<td>hinge</td><td>loss.w_adv 0.002</td>" in table and "<td class=better>met</td>" in table


def test_decide_by_must_be_a_compared_metric():
    from srgan.config import ConfigError

    study.check_config(_cfg())  # niqe
    with pytest.raises(ConfigError, match="study.decide_by: 'd_acc' is not a metric the study compares"):
        study.check_config(_cfg(**{"study.decide_by": "d_acc"}))


def _run_cell(cfg, e, data, srresnet, pre_id, tmp_path):
    """What one queued experiment's train and evaluate stages record in MLflow."""
    from srgan import evaluate
    from srgan.experiment import run_training

    ecfg = e.config(cfg)
    run_id, _ = run_training(ecfg, "gan", data, tmp_path / f"{e.name}.keras", init_generator=srresnet,
                             extra_tags={"srresnet.run_id": pre_id})
    reports = tmp_path / e.name
    summary = evaluate.evaluate(ecfg.evaluate, 4, {"srresnet": srresnet, "srgan": tmp_path / f"{e.name}.keras"},
                                {"valid": data.shard_dir.parent / "valid"}, reports)
    tracking.log_to_run(run_id, evaluate.run_metrics(summary, "srgan"),
                        [reports / "metrics.json", reports / "per_image.csv"], "eval")
    return run_id


@pytest.fixture(scope="module")
def recorded(processed_dir, pretrained, tmp_path_factory):
    """A finished tiny study in its own MLflow store: 3 arms x 2 seeds nested under a parent."""
    from srgan.trainer import TrainData

    tmp = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = _cfg()
        data = TrainData.load(processed_dir, 1)
        srresnet = pretrained / "models" / "srresnet.keras"
        tracking.ensure_store()
        from srgan.experiment import run_training

        pre_id, _ = run_training(cfg, "pretrain", data, tmp / "s.keras")
        parent = tracking.start_run("srgan", run_name="s1", tags={"kind": study.KIND, "study": "s1",
                                                                  "study.worker": tracking.process_id()})
        exps = study.plan(cfg, "s1")
        for e in exps:
            _run_cell(cfg, e, data, srresnet, pre_id, tmp)
        assert study.adopt(cfg, exps, parent.run_id, "s1") == []
        parent.set_tags({"study.stop.hinge": study.STOP_MAX_SEEDS})
        parent.end()
        yield cfg, parent.run_id, srresnet, processed_dir, tmp, uri
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.mark.slow
def test_a_study_is_the_record_of_its_nested_runs(recorded):
    cfg, parent_id, *_ = recorded
    rows = study.rows_of("srgan", parent_id)
    assert sorted((r["loss"], r["seed"]) for r in rows) == [("hinge", 1), ("hinge", 2), ("least_squares", 1),
                                                            ("least_squares", 2), ("none", 1), ("none", 2)]
    assert all(r["per_image"]["valid"] for r in rows)  # every run's per-image scores, from its artifact
    children = tracking.child_runs("srgan", parent_id)
    assert len(children) == 6 and {c["tags"]["study"] for c in children} == {"s1"}
    # a later params change does not change what the study is: its runs are found by nesting
    later = tiny_config(**{"gan.steps": 7})
    assert study.find_run(later.model_copy(), "srgan") is None
    assert len(study.rows_of("srgan", study.find_parent("srgan", "s1")["run_id"])) == 6
    with pytest.raises(study.StudyError, match="no study 'nope'"):
        study.find_parent("srgan", "nope")


@pytest.mark.slow
def test_report_has_intervals_groups_control_dynamics_and_verdict(recorded, tmp_path):
    cfg, parent_id, srresnet, processed_dir, *_ = recorded
    rows = study.rows_of("srgan", parent_id)
    out = tmp_path / "compare"
    page = study.write_report(cfg, rows, out, processed_dir / "valid", srresnet, "s1", seconds=60.0,
                              stopped={"hinge": study.STOP_MAX_SEEDS})
    text = page.read_text()
    refs = re.findall(r"""(?:src|href)=['"]?([^'" >]+)""", text)
    assert refs and all(r.startswith(("data:", "#")) for r in refs)  # self-contained
    record = json.loads((out / "study.json").read_text())
    comp = record["analysis"]["srresnet"]["valid"]["psnr_y"]
    assert comp["control"] == "none" and set(comp["vs_control"]) == {"hinge", "least_squares"}
    assert comp["seeds"] == {"none": 2, "hinge": 2, "least_squares": 2}
    assert "Welch t-tests" in record["verdict"] and "2 seeds per arm" in record["verdict"]
    study.log_to_parent(parent_id, out)
    parent = tracking.search_runs("srgan", f"attributes.run_id = '{parent_id}'")[0]
    assert "study/valid/psnr_y/control/mean" in parent["metrics"] and parent["tags"]["study.verdict"]
    assert "study/valid/psnr_y/hinge/vs_control/p_holm" in parent["metrics"]
    assert set(record["criterion"]) == {"hinge", "least_squares"}  # each objective against the criterion
    assert {parent["tags"][f"study.criterion.{a}"] for a in ("hinge", "least_squares")} <= \
        {"met", *("; ".join(c["fails"]) for c in record["criterion"].values())}
    # the same report is not replaced by one with fewer runs
    with pytest.raises(study.StudyError, match="with 6 runs; MLflow has 5 of them now: not overwritten"):
        study.write_report(cfg, rows[:5], out, processed_dir / "valid", srresnet, "s1")
    assert json.loads((out / "study.json").read_text())["runs"] == record["runs"]
    if CHROMIUM is None:
        pytest.skip("Chromium not found: `make sysdeps` installs it (root, Debian)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pg = browser.new_page()
            pg.goto(page.as_uri())
            assert "cannot be told apart" in pg.locator("#verdict-text").inner_text() or \
                "better than the control" in pg.locator("#verdict-text").inner_text()
            table = pg.locator("#set-valid ~ table").first
            body = [table.locator("tbody tr").nth(i).inner_text() for i in range(table.locator("tbody tr").count())]
            assert body[0].startswith("none (control)")  # the control first, then the objectives
            assert any(t.startswith("hinge") and "[" in t and "p=" in t for t in body), body  # CI and Holm p
            assert any(t.startswith("SRResNet") for t in body) and any(t.startswith("bicubic") for t in body)
            assert pg.locator("#dynamics").count() == 1 and "groups that cannot be told apart" in pg.content()
            assert pg.locator("#criterion + p + table tbody tr").count() == 2  # one row per objective
            widths = pg.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
            alts = pg.evaluate("Array.from(document.images).map(i => i.alt)")
            assert len(widths) >= 3 and all(w and w > 0 for w in widths), (widths, alts)  # plots and crops decoded
            pg.screenshot(path=str(tmp_path / "study.png"), full_page=True)
        finally:
            browser.close()


def _compare(*flags: str, uri: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "src" / "compare.py"), *flags], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "2"}, cwd=cwd,
                          timeout=600)


@pytest.mark.slow
def test_rebuild_after_params_change_and_failed_promote_keep_the_report(recorded, tmp_path):
    """Found by hostile use: a params change, or a failing --promote, rewrote the report as '0 runs'."""
    cfg, parent_id, srresnet, processed_dir, _, uri = recorded
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump(tiny_config(**{"pretrain.steps": 9, "gan.steps": 3, "evaluate.niqe": "none",
                                                    "study.crop_images": 1}).to_dict()))
    paths = ["--params", str(params), "--out", str(tmp_path / "compare"), "--processed", str(processed_dir),
             "--srresnet", str(srresnet)]
    built = _compare("--study", "s1", *paths, uri=uri, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "study s1: 6 runs" in built.stdout
    before = (tmp_path / "compare" / "study.json").read_bytes()
    bad = _compare("--promote", "eval/valid/nonexistent", *paths, uri=uri, cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert (tmp_path / "compare" / "study.json").read_bytes() == before
    again = _compare(*paths, uri=uri, cwd=tmp_path)  # the last study, from its record
    assert again.returncode == 0 and "study s1: 6 runs" in again.stdout


@pytest.mark.slow
def test_a_killed_study_parent_is_closed_on_the_next_call(tmp_path, mlflow_uri):
    code = ("import os, signal; from srgan import tracking, study; tracking.ensure_store();"
            "r = tracking.start_run('srgan', run_name='k', tags={'kind': study.KIND, 'study': 'k',"
            "'study.worker': tracking.process_id()}); print(r.run_id, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == -signal.SIGKILL
    run_id = out.stdout.split()[0]
    assert tracking.search_runs("srgan", f"attributes.run_id = '{run_id}'")[0]["status"] == "RUNNING"
    assert study.close_dead_parents("srgan") == [run_id]
    assert tracking.search_runs("srgan", f"attributes.run_id = '{run_id}'")[0]["status"] == "KILLED"
    assert study.close_dead_parents("srgan") == []


def test_adaptive_seeds_go_to_overlapping_arms_and_say_why_others_stop():
    import numpy as np

    cfg = _cfg(**{"study.max_seeds": 3, "study.decide_by": "psnr_y", "evaluate.sets": ["valid"]})

    def row(loss, seed, shift):
        vals = {f"img{i}": {"srgan_psnr_y": 20.0 + i + shift + 0.3 * np.sin(seed * 7 + i)} for i in range(4)}
        return {"loss": loss, "seed": seed, "arch": "srresnet", "per_image": {"valid": vals}}

    rows = [row("none", s, 0.0) for s in (1, 2)] + [row("hinge", s, 0.05) for s in (1, 2)] + \
           [row("least_squares", s, 9.0) for s in (1, 2)]
    stopped: dict[str, str] = {}
    add = study.next_seeds(cfg, rows, started=__import__("time").time(), seconds_per_run=1.0, stopped=stopped)
    assert add == {"none": [3], "hinge": [3]} and stopped == {"least_squares": study.STOP_SEPARATED}
    rows += [row("none", 3, 0.0), row("hinge", 3, 0.05)]
    add = study.next_seeds(cfg, rows, started=__import__("time").time(), seconds_per_run=1.0, stopped=stopped)
    assert add == {} and stopped["hinge"] == stopped["none"] == study.STOP_MAX_SEEDS
    # a round that would end past the budget is not started
    stopped = {}
    add = study.next_seeds(_cfg(**{"study.decide_by": "psnr_y", "study.budget_minutes": 1.0}), rows[:6],
                           started=__import__("time").time() - 50, seconds_per_run=30.0, stopped=stopped)
    assert add == {} and stopped["none"] == study.STOP_BUDGET


@pytest.mark.slow
def test_equal_tuning_effort_per_objective(processed_dir, pretrained, mlflow_uri, tmp_path):
    """study.tune_trials: the same number of trials, budget and search space (w_adv, d_lr) for every
    objective, none for the control; each trial nested under the study's parent; the seeds of an
    objective then run at its best."""
    from srgan.trainer import TrainData

    cfg = _cfg(**{"study.tune_trials": 2, "study.decide_by": "psnr_y", "tune.w_adv": [1e-4, 1e-2],
                  "tune.d_lr": [1e-5, 1e-3],
                  "tune.gan_steps": 2, "tune.report_every": 2, "tune.pruner": "none"})
    tracking.ensure_store()
    parent = tracking.start_run("srgan", run_name="t1", tags={"kind": study.KIND, "study": "t1"})
    best = study.tune_arms(cfg, "t1", parent.run_id, TrainData.load(processed_dir, 1),
                           pretrained / "models" / "srresnet.keras", 0)
    assert set(best) == {"hinge", "least_squares"}  # not the control: it has no adversarial term to tune
    for arm, params in best.items():
        assert set(params) == {"loss.w_adv", "gan.d_lr"}
        assert 1e-4 <= params["loss.w_adv"] <= 1e-2 and 1e-5 <= params["gan.d_lr"] <= 1e-3
    trials = [r for r in tracking.child_runs("srgan", parent.run_id) if r["tags"].get("optuna.trial") is not None]
    assert sorted(r["tags"]["optuna.study"] for r in trials) == ["t1-tune-hinge"] * 2 + ["t1-tune-least_squares"] * 2
    assert {r["params"]["gan.steps"] for r in trials} == {"2"}  # the same budget for each
    exps = study.plan(cfg, "t1", tuned=best)
    hinge = next(e for e in exps if e.loss == "hinge").config(cfg)
    assert hinge.loss.w_adv == best["hinge"]["loss.w_adv"] and hinge.gan.d_lr == best["hinge"]["gan.d_lr"]
    assert next(e for e in exps if e.loss == "none").config(cfg).loss.w_adv == cfg.loss.w_adv
    assert study.rows_of("srgan", parent.run_id) == []  # tuning trials are not the study's runs
    with pytest.raises(study.StudyError, match=r"a range in tune.d_lr to search \(it is \[\]\)"):
        study.tuning_config(_cfg(**{"tune.d_lr": []}), "hinge")


def test_experiments_at_once_share_the_cores_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    cores = os.cpu_count() or 1
    assert distribute.threads_env(cores)["TF_NUM_INTRAOP_THREADS"] == "1"
    assert distribute.threads_env(1)["TF_NUM_INTRAOP_THREADS"] == str(cores)
    assert distribute.threads_env(10 * cores)["TF_NUM_INTRAOP_THREADS"] == "1"  # never 0 (= TF's default: all)
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "3")
    assert distribute.threads_env(cores)["TF_NUM_INTRAOP_THREADS"] == "3"


@pytest.mark.slow
def test_a_queue_whose_workers_do_not_stop_is_stopped_once_its_experiments_are_done(tmp_path, monkeypatch):
    # a real DVC project whose queue ran experiment t1
    env = dvc_env(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python -c \"open('out.txt', 'w').write('x')\"\n"
                                   "    outs: [out.txt]\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run_ok(cmd, repo, env)
    assert study.run_experiments([study.Experiment("t1", "none", 1, "srresnet")], jobs=1, cwd=repo) is True
    assert study.queue_statuses(repo) == {"t1": "Success"}

    # `--run-all` that never returns after its experiments are done (here: a process that ignores
    # `dvc queue stop`): stopped, then killed
    stuck = subprocess.Popen(["sleep", "600"])
    t0 = time.monotonic()
    assert study.wait_for_queue(stuck, repo, ["t1"], poll_s=0.2, stuck_s=1.0) is True
    assert stuck.poll() is not None and time.monotonic() - t0 < 60
    # while an experiment is not done (t2: not even in the queue yet), nothing is stopped
    running = subprocess.Popen(["sleep", "3"])
    assert study.wait_for_queue(running, repo, ["t1", "t2"], poll_s=0.2, stuck_s=1.0) is False
    assert running.returncode == 0

