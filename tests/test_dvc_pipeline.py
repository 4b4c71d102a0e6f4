"""The whole DVC pipeline, for real, on a tiny params.yaml in a copy of the project."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def tiny_project(project: Path, tmp_path: Path, mlflow: bool = True) -> dict:
    """Write the tiny params into the copy, make it a git repo; return the env to run DVC in it.

    ``mlflow=False`` leaves MLFLOW_TRACKING_URI unset: runs go to the project's own mlflow.db.
    """
    data = tiny_config(**{"preprocess.hr_crop": 64}).to_dict()  # the sample photos are large: a few 64-px crops
    (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    if mlflow:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        _run(cmd, project, env)
    return env


def ran_stages(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}


@pytest.mark.slow
def test_dvc_repro_end_to_end_and_only_affected_stages_rerun(project_copy, tmp_path):
    env = tiny_project(project_copy, tmp_path)
    dvc = [str(Path(sys.executable).parent / "dvc")]
    log = _run(dvc + ["repro"], project_copy, env)
    assert ran_stages(log) == {"fetch", "preprocess", "evalsets", "pretrain", "train", "evaluate"}, log
    metrics = json.loads((project_copy / "reports" / "metrics.json").read_text())
    assert {"bicubic", "srresnet", "srgan"} <= set(metrics["valid"])
    assert {"psnr_y", "ssim_y", "psnr_y_gain", "artifact"} <= set(metrics["valid"]["srgan"])
    assert {"d_acc", "d_auc", "d_gap"} <= set(metrics["valid"]["srgan"])  # the train stage's D health
    assert "d_acc" not in metrics["valid"]["srresnet"] and "artifact" in metrics["valid"]["hr"]
    assert (project_copy / "reports" / "index.html").stat().st_size > 10_000
    assert (project_copy / "models" / "generator.keras").exists()
    assert (project_copy / "models" / "srresnet.keras").exists()

    # nothing changed: nothing runs
    log = _run(dvc + ["repro"], project_copy, env)
    assert ran_stages(log) == set(), log
    # the plots are declared once: three curves/bars and the comparison images as image plots
    plots = json.loads(_run(dvc + ["plots", "show", "--json"], project_copy, env).strip().splitlines()[-1])["data"]
    assert {"SRResNet pre-training", "adversarial training", "PSNR-Y per validation image"} <= set(plots)
    assert all(e["type"] == "vega" for k in ("SRResNet pre-training", "adversarial training") for e in plots[k])
    images = [k for k, v in plots.items() if k.startswith("reports/eval/valid/") and v[0]["type"] == "image"]
    assert images and all(k.endswith("_compare.png") for k in images), list(plots)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "first results"]):
        _run(cmd, project_copy, env)

    # a train.* param makes train (and so evaluate) stale, not fetch or preprocess; an evaluate.*
    # param only evaluate. `dvc status` tells without spending minutes re-running them.
    def stale_after(section: str, key: str, value) -> set[str]:
        params = yaml.safe_load((project_copy / "params.yaml").read_text())
        old = params[section][key]
        params[section][key] = value
        (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        status = json.loads(_run(dvc + ["status", "--json"], project_copy, env).strip().splitlines()[-1])
        params[section][key] = old
        (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return set(status)

    assert stale_after("gan", "steps", 2) == {"train"}
    assert stale_after("loss", "w_adv", 0.01) == {"train"}
    assert stale_after("pretrain", "steps", 2) == {"pretrain"}
    assert stale_after("evaluate", "zoom", 24) == {"evaluate"}
    assert stale_after("preprocess", "crops_per_image", 2) == {"preprocess"}
    assert stale_after("tune", "n_trials", 3) == set()  # no stage reads tune.*
    show = _run(dvc + ["metrics", "show", "--json"], project_copy, env)
    assert "psnr_y" in show

    # really changing adv.loss re-runs only the adversarial stage and evaluate, from the same SRResNet
    srresnet = (project_copy / "models" / "srresnet.keras").read_bytes()
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    params["adv"]["loss"] = "hinge"
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = _run(dvc + ["repro"], project_copy, env)
    assert ran_stages(log) == {"train", "evaluate"}, log
    assert (project_copy / "models" / "srresnet.keras").read_bytes() == srresnet
    # `dvc metrics diff` shows what the objective changed against the committed results, and only that
    diff = json.loads(_run(dvc + ["metrics", "diff", "--json"], project_copy, env).strip().splitlines()[-1])
    assert "reports/metrics.json" in diff and "reports/pretrain/summary.json" not in diff, diff
    changed = diff["reports/metrics.json"]
    assert "valid.srgan.psnr_y" in changed and "valid.srresnet.psnr_y" not in changed, changed
    assert "PSNR-Y per validation image" in _run(dvc + ["plots", "diff", "--json"], project_copy, env)


@pytest.mark.slow
def test_queued_experiments_land_in_the_repository_mlflow_store(project_copy, tmp_path):
    """`dvc exp run --queue` x2 + `--run-all --jobs 2`: DVC runs them in temporary copies under
    .dvc/tmp/exps/; their MLflow runs must be in the repository's own store, complete, tagged with
    the experiment, and the pretrained SRResNet must come from the run cache, not be re-trained."""
    import mlflow

    env = tiny_project(project_copy, tmp_path, mlflow=False)
    dvc = [str(Path(sys.executable).parent / "dvc")]
    _run(dvc + ["repro"], project_copy, env)
    for loss in ("least_squares", "minimax"):
        _run(dvc + ["exp", "run", "--queue", "-n", f"exp-{loss}", "-S", f"adv.loss={loss}"], project_copy, env)
    _run(dvc + ["exp", "run", "--run-all", "--jobs", "2"], project_copy, env)
    shown = json.loads(_run(dvc + ["exp", "show", "--json"], project_copy, env).strip().splitlines()[-1])
    assert "exp-least_squares" in json.dumps(shown) and "exp-minimax" in json.dumps(shown)
    assert not list((project_copy / ".dvc" / "tmp" / "exps").glob("tmp*"))  # the copies are gone

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project_copy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("srgan")
    runs = client.search_runs([exp.experiment_id])
    by_exp = {r.data.tags.get("dvc.exp_name"): r for r in runs if r.data.tags.get("phase") == "gan"}
    for loss in ("least_squares", "minimax"):
        r = by_exp[f"exp-{loss}"]
        assert r.info.status == "FINISHED" and r.data.params["adv.loss"] == loss
        assert r.data.tags["dvc.baseline_rev"] and r.data.tags["dvc.stage"] == "train"
        assert "eval/valid/psnr_y" in r.data.metrics  # the experiment's evaluate stage logged to it
        assert [a.path for a in client.list_artifacts(r.info.run_id, "model")] == ["model/generator.keras"]
    # one SRResNet for everybody: the workspace's; the experiments got it from DVC's run cache
    assert sum(r.data.tags.get("phase") == "pretrain" for r in runs) == 1
