"""tune.py: a real Optuna journal storage, real MLflow, real (tiny) training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY, tiny_config, write_params
from srgan import config, tracking, tune
from srgan.config import ROOT


def _params(tmp_path: Path, **overrides) -> Path:
    return write_params(tmp_path / "params.yaml", **overrides)


@pytest.fixture
def processed(processed_dir, pretrained):
    """(processed data, pretrain stage outputs): what every tune.py call reads."""
    return processed_dir, pretrained


def _tune(tmp_path, processed, mlflow_uri, *args, params=None, popen=False):
    processed_dir, pretrained = processed
    cmd = [sys.executable, str(ROOT / "src" / "tune.py"), "--params", str(params or _params(tmp_path)),
           "--storage", str(tmp_path / "journal.log"), "--processed", str(processed_dir),
           "--srresnet", str(pretrained / "models" / "srresnet.keras"),
           "--pretrain-reports", str(pretrained / "reports" / "pretrain"),
           "--out", str(tmp_path / "tune"), *args]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _study(tmp_path):
    cfg = config.from_dict(TINY)
    return tune.open_study(cfg, "srgan-perpix", str(tmp_path / "journal.log"))


@pytest.mark.slow
def test_tune_runs_nested_trials_and_a_second_call_with_two_workers_adds_to_the_study(processed, mlflow_uri, tmp_path):
    _tune(tmp_path, processed, mlflow_uri, "--n-trials", "2")
    assert len(_study(tmp_path).trials) == 2
    # a second call adds to the study, here from two worker processes sharing it
    _tune(tmp_path, processed, mlflow_uri, "--n-trials", "2", "--workers", "2")
    study = _study(tmp_path)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials[2:]}) == 2  # one trial from each process
    # the first trial is params.yaml's own values: the baseline every other trial is judged against
    cfg = tiny_config()
    assert study.trials[0].user_attrs.get(tune.BASELINE_ATTR) and not study.trials[1].user_attrs.get(tune.BASELINE_ATTR)
    assert study.trials[0].params == {"w_mse": cfg.loss.w_mse, "w_vgg": cfg.loss.w_vgg, "w_adv": cfg.loss.w_adv,
                                      "adv_loss": cfg.adv.loss}

    runs = tracking.search_runs("srgan")
    parents = [r for r in runs if r["tags"].get("kind") == "tune"]
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(parents) == 2 and len(children) == 4
    assert {c["tags"]["mlflow.parentRunId"] for c in children} == {p["run_id"] for p in parents}
    # the two workers' trials are nested under their call's one parent run
    assert len({c["tags"]["mlflow.parentRunId"] for c in children if c["tags"]["optuna.trial"] in ("2", "3")}) == 1
    for c in children:
        trial = study.trials[int(c["tags"]["optuna.trial"])]
        assert c["tags"]["optuna.state"] == trial.state.name.lower()
        assert float(c["params"]["loss.w_mse"]) == pytest.approx(trial.params["w_mse"])
        assert c["params"]["adv.loss"] == trial.params["adv_loss"]
        assert "val_psnr_y" in c["metrics"]

    best = yaml.safe_load((tmp_path / "tune" / "best_params.yaml").read_text())
    assert set(best["params"]) == {"loss.w_mse", "loss.w_vgg", "loss.w_adv", "adv.loss"}
    # (trial 0 is one of the pruner's start-up trials: never pruned)
    assert best["baseline"]["trial"] == 0 and set(best["baseline"]["objective"]) == {"psnr_y"}
    assert (tmp_path / "tune" / "trials.csv").read_text().count("\n") == 5
    assert (tmp_path / "tune" / "history.png").stat().st_size > 1000
    assert (tmp_path / "tune" / "importances.png").exists()


@pytest.mark.slow
def test_a_trial_with_several_seeds_is_the_mean_of_one_run_per_seed(processed, mlflow_uri, tmp_path):
    _tune(tmp_path, processed, mlflow_uri, "--n-trials", "1", params=_params(tmp_path, **{"tune.seeds": [3, 5]}))
    trial = _study(tmp_path).trials[0]
    runs = {r["params"]["gan.seed"]: r for r in tracking.search_runs("srgan") if "optuna.trial" in r["tags"]}
    assert set(runs) == {"3", "5"}
    assert trial.user_attrs["mlflow_run_ids"] == [runs["3"]["run_id"], runs["5"]["run_id"]]
    by_seed = [runs[s]["metrics"]["val_psnr_y"] for s in ("3", "5")]
    assert by_seed[0] != by_seed[1]  # the seeds trained different generators
    assert trial.value == pytest.approx(sum(by_seed) / 2)
    assert trial.user_attrs["psnr_y_by_seed"] == {"3": pytest.approx(by_seed[0], abs=1e-4),
                                                  "5": pytest.approx(by_seed[1], abs=1e-4)}
    assert {r["tags"]["optuna.state"] for r in runs.values()} == {"complete"}
    assert {r["run_name"] for r in runs.values()} == {"trial-0-seed-3", "trial-0-seed-5"}


@pytest.mark.slow
def test_failed_trial_is_recorded_and_the_study_goes_on(processed, mlflow_uri, tmp_path):
    # a learning rate range that blows up the adversarial phase: every trial turns NaN
    params = _params(tmp_path, **{"tune.lr_gan": [1e29, 1e30], "tune.losses": ["least_squares"]})
    out = _tune(tmp_path, processed, mlflow_uri, "--n-trials", "2", params=params)
    study = _study(tmp_path)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert "non-finite loss" in study.trials[0].user_attrs["fail_reason"]
    children = [r for r in tracking.search_runs("srgan") if "optuna.trial" in r["tags"]]
    assert sorted(r["status"] for r in children) == ["FAILED", "FAILED"]
    assert {r["tags"]["optuna.state"] for r in children} == {"fail"}
    assert "2 fail" in out.stdout


def test_pruning_callback_prunes_a_trial_below_the_median(tmp_path):
    import optuna


    cfg = config.from_dict({**TINY, "tune": {**TINY["tune"], "pruner": "median"}})
    study = optuna.create_study(direction="maximize", pruner=tune.make_pruner(cfg),
                                storage=tune.make_storage(str(tmp_path / "j.log")), study_name="p")
    for value in (30.0, 31.0):  # two finished trials with high intermediate values
        t = study.ask()
        for step in (2, 4, 6):
            t.report(value, step)
        study.tell(t, value)
    good = tune.PruningCallback(study.ask(), ["psnr_y"])
    good.on_validation(2, {"val_psnr_y": 35.0}, None)  # above the median: continues
    good.on_validation(4, {"val_psnr_y": 36.0}, None)
    bad = tune.PruningCallback(study.ask(), ["psnr_y"])
    with pytest.raises(optuna.TrialPruned, match="pruned at step 2"):
        bad.on_validation(2, {"val_psnr_y": 10.0}, None)  # below the median of earlier trials


@pytest.mark.slow
def test_killed_tune_resumes_without_losing_or_repeating_finished_trials(processed, mlflow_uri, tmp_path):
    params = _params(tmp_path, **{"tune.pruner": "none"})
    tracking.ensure_store()  # the schema first: this test reads the store while tune.py writes it
    proc = _tune(tmp_path, processed, mlflow_uri, "--n-trials", "6", params=params, popen=True)
    from optuna.trial import TrialState

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)

    def runs_of_killed_session() -> list:
        exp = client.get_experiment_by_name("srgan")
        return [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("optuna.worker", "").endswith(f":{proc.pid}")] if exp else []

    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "journal.log").exists():
            trials = _study(tmp_path).trials
            # kill mid-trial: one finished, the next one running with its MLflow run open
            if (sum(t.state == TrialState.COMPLETE for t in trials) >= 1 and trials[-1].state == TrialState.RUNNING
                    and any(r.info.status == "RUNNING" and r.data.tags.get("optuna.trial") == str(trials[-1].number)
                            for r in runs_of_killed_session())):
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.5)
    proc.wait()
    before = _study(tmp_path).trials
    finished = {t.number: t.params for t in before if t.state == TrialState.COMPLETE}
    cut = [t for t in before if t.state == TrialState.RUNNING]
    assert finished and len(cut) == 1, ([t.state for t in before], proc.stdout.read()[-3000:])
    # what SIGKILL left: the session's parent run and the cut trial's child run, both RUNNING
    assert sum(r.info.status == "RUNNING" for r in runs_of_killed_session()) == 2

    _tune(tmp_path, processed, mlflow_uri, "--n-trials", "2", params=params)
    # the next call closed them KILLED (the finished trials' runs stay FINISHED)
    left = runs_of_killed_session()
    cut_runs = [r for r in left if r.data.tags.get("optuna.trial") == str(cut[0].number)]
    assert len(cut_runs) == 1 and cut_runs[0].info.status == "KILLED"
    parents = [r for r in left if "optuna.trial" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    assert {r.info.status for r in left if r not in cut_runs + parents} == {"FINISHED"}
    after = _study(tmp_path).trials
    # the finished trials are all still there, unchanged
    for t in after:
        if t.number in finished:
            assert t.state == TrialState.COMPLETE and t.params == finished[t.number]
    # the cut trial was failed and its params queued again as a new trial
    assert after[cut[0].number].state == TrialState.FAIL
    retried = [t for t in after if t.user_attrs.get("retry_of") == cut[0].number]
    assert len(retried) == 1 and retried[0].params == cut[0].params and retried[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in after) == len(finished) + 2


def test_apply_best_params_keeps_comments(tmp_path):

    p = tmp_path / "params.yaml"
    p.write_text(config.PARAMS_PATH.read_text())
    changed = tune.apply_to_params({"loss.w_adv": 0.002, "adv.loss": "hinge"}, p)
    assert changed == ["loss.w_adv: 0.0005 -> 0.002", "adv.loss: 'modified' -> 'hinge'"]
    cfg = config.load(p)
    assert cfg.loss.w_adv == 0.002 and cfg.adv.loss == "hinge"
    text = p.read_text()
    assert "# Per-Pix weight of the adversarial loss" in text and text.count("\n") == \
        config.PARAMS_PATH.read_text().count("\n")
    with pytest.raises(config.ConfigError, match="loss.nope"):
        tune.apply_to_params({"loss.nope": 1}, p)


def test_zero_trials_is_an_error_not_the_default(processed_dir, mlflow_uri, tmp_path):
    cmd = [sys.executable, str(ROOT / "src" / "tune.py"), "--params", str(_params(tmp_path)),
           "--storage", str(tmp_path / "journal.log"), "--n-trials", "0"]
    out = subprocess.run(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "--n-trials: 0 must be >= 1" in out.stderr, out.stdout + out.stderr
    assert not (tmp_path / "journal.log").exists()  # nothing was started


def test_tune_needs_the_pretrained_srresnet(processed_dir, mlflow_uri, tmp_path):
    cmd = [sys.executable, str(ROOT / "src" / "tune.py"), "--params", str(_params(tmp_path)),
           "--storage", str(tmp_path / "journal.log"), "--processed", str(processed_dir),
           "--srresnet", str(tmp_path / "missing.keras"), "--n-trials", "1"]
    out = subprocess.run(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "dvc repro pretrain" in out.stderr, out.stdout + out.stderr


def test_the_baseline_trial_is_the_config_inside_the_search_space_and_dominance_follows_directions():
    cfg = tiny_config(**{"loss.w_adv": 0.5, "tune.w_adv": [0.0001, 0.01]})  # w_adv outside its range
    assert tune.baseline_params(cfg) == {"w_mse": cfg.loss.w_mse, "w_vgg": cfg.loss.w_vgg, "adv_loss": cfg.adv.loss}
    assert tune.baseline_params(tiny_config(**{"tune.losses": ["hinge"]})).get("adv_loss") is None  # not searched
    objectives = ["psnr_y", "niqe"]  # higher, lower is better
    assert tune.dominates([28.2, 5.5], [28.1, 5.9], objectives)
    assert tune.dominates([28.1, 5.5], [28.1, 5.9], objectives)
    assert not tune.dominates([28.1, 5.9], [28.1, 5.9], objectives)  # equal: no better
    assert not tune.dominates([28.3, 6.0], [28.1, 5.9], objectives)  # a trade-off is not a win


def test_the_sampler_is_the_one_configured_for_one_or_two_objectives():
    import optuna

    for objectives in (["psnr_y"], ["psnr_y", "niqe"]):
        tpe = tune.make_sampler(tiny_config(**{"tune.objectives": objectives, "tune.startup_trials": 3}), seed=1)
        assert isinstance(tpe, optuna.samplers.TPESampler)
        nsga = tune.make_sampler(tiny_config(**{"tune.objectives": objectives, "tune.sampler": "nsgaii"}), seed=1)
        assert isinstance(nsga, optuna.samplers.NSGAIISampler)


def test_a_trial_runs_the_phase_it_tunes_unless_told_otherwise():
    import optuna

    fixed = optuna.trial.FixedTrial({"w_mse": 1.0, "w_vgg": 0.1, "w_adv": 1e-3, "adv_loss": "hinge"})
    cfg = tiny_config(**{"gan.steps": 7, "tune.gan_steps": 0})
    assert tune.trial_steps(cfg) == 7 and tune.suggest(fixed, cfg).gan.steps == 7  # 0: gan.steps
    cfg = tiny_config(**{"gan.steps": 7, "tune.gan_steps": 3})
    assert tune.suggest(fixed, cfg).gan.steps == 3


def test_best_of_a_pareto_front_is_one_that_beats_the_baseline_when_there_is_one():
    """--apply takes best_params.yaml: with [psnr_y, niqe] it must not trade the baseline's NIQE for
    PSNR when a trial beats the baseline on both (the front's best-PSNR trial need not)."""
    import optuna
    from optuna.distributions import FloatDistribution

    cfg = tiny_config(**{"tune.objectives": ["psnr_y", "niqe"]})
    dist = {"w_adv": FloatDistribution(1e-4, 1e-2, log=True)}

    def study_of(points):
        study = optuna.create_study(directions=tune.directions(cfg))
        for i, (psnr, niqe) in enumerate(points):
            study.add_trial(optuna.trial.create_trial(values=[psnr, niqe], params={"w_adv": 1e-3 * (i + 1)},
                                                      distributions=dist,
                                                      user_attrs={tune.BASELINE_ATTR: True} if i == 0 else {}))
        return study

    base, top_psnr, both, top_niqe = (28.75, 6.15), (28.88, 6.43), (28.78, 6.12), (28.04, 5.83)
    study = study_of([base, top_psnr, both, top_niqe])
    assert tune.best_trial(study, cfg).number == 2
    assert tune.baseline_outcome(study, cfg)["dominated_by"] == [2]
    # none beats the baseline on both: the baseline, so --apply gives up nothing for the other objective
    assert tune.best_trial(study_of([base, top_psnr, top_niqe]), cfg).number == 0
