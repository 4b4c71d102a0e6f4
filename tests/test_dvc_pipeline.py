"""The whole DVC pipeline, for real, on a tiny params.yaml in a fresh-clone-like copy of the project.

One ``dvc repro`` (the shared ``reproduced`` fixture) serves every test here, each on its own copy:
only affected stages re-run; queued experiments land in the repository's store; shared data and
models through a real DVC remote (a local folder): a `git clone` pulls from it and must find every
stage up to date, so a colleague (or a CI job, or a GPU machine) gets the data, the model and the
reports without recomputing anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import dvc_env, run_ok as _run


def ran_stages(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}


def _commit(project: Path, env: dict, message: str) -> None:
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", message]):
        _run(cmd, project, env)


@pytest.mark.slow
def test_dvc_repro_end_to_end_and_only_affected_stages_rerun(reproduced, reproduced_copy, tmp_path):
    project_copy, env, dvc = reproduced_copy, dvc_env(tmp_path), ["dvc"]
    assert ran_stages(reproduced[1]) == {"fetch", "preprocess", "evalsets", "pretrain", "train", "evaluate"}, \
        reproduced[1]
    metrics = json.loads((project_copy / "reports" / "metrics.json").read_text())
    assert {"bicubic", "srresnet", "srgan"} <= set(metrics["valid"])
    assert {"psnr_y", "ssim_y", "psnr_y_gain", "artifact"} <= set(metrics["valid"]["srgan"])
    assert {"d_acc", "d_auc", "d_gap"} <= set(metrics["valid"]["srgan"])  # the train stage's D health
    assert "d_acc" not in metrics["valid"]["srresnet"] and "artifact" in metrics["valid"]["hr"]
    assert (project_copy / "reports" / "index.html").stat().st_size > 10_000
    assert (project_copy / "models" / "generator.keras").exists()
    assert (project_copy / "models" / "srresnet.keras").exists()

    # nothing changed (in a copy of the reproduced folder): nothing runs
    log = _run(dvc + ["repro"], project_copy, env)
    assert ran_stages(log) == set(), log
    # the plots are declared once: three curves/bars and the comparison images as image plots
    plots = json.loads(_run(dvc + ["plots", "show", "--json"], project_copy, env).strip().splitlines()[-1])["data"]
    assert {"SRResNet pre-training", "adversarial training", "PSNR-Y per validation image"} <= set(plots)
    assert all(e["type"] == "vega" for k in ("SRResNet pre-training", "adversarial training") for e in plots[k])
    images = [k for k, v in plots.items() if k.startswith("reports/eval/valid/") and v[0]["type"] == "image"]
    assert images and all(k.endswith("_compare.png") for k in images), list(plots)
    _commit(project_copy, env, "first results")

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
def test_queued_experiments_land_in_the_repository_mlflow_store(reproduced_copy, tmp_path):
    """`dvc exp run --queue` x2 + `--run-all --jobs 2`: DVC runs them in temporary copies under
    .dvc/tmp/exps/; their MLflow runs must be in the repository's own store, complete, tagged with
    the experiment, and the pretrained SRResNet must come from the run cache, not be re-trained."""
    import mlflow

    project_copy, env, dvc = reproduced_copy, dvc_env(tmp_path), ["dvc"]
    for loss in ("least_squares", "minimax"):
        _run(dvc + ["exp", "run", "--queue", "-n", f"exp-{loss}", "-S", f"adv.loss={loss}"], project_copy, env)
    _run(dvc + ["exp", "run", "--run-all", "--jobs", "2"], project_copy, env)
    shown = json.loads(_run(dvc + ["exp", "show", "--json"], project_copy, env).strip().splitlines()[-1])
    assert "exp-least_squares" in json.dumps(shown) and "exp-minimax" in json.dumps(shown)
    assert not list((project_copy / ".dvc" / "tmp" / "exps").glob("tmp*"))  # the copies are gone

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project_copy / 'mlflow.db'}")
    # every experiment: the copy's store renamed the reproduced folder's "srgan" (its artifacts live there)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_exp = {r.data.tags.get("dvc.exp_name"): r for r in runs if r.data.tags.get("phase") == "gan"}
    for loss in ("least_squares", "minimax"):
        r = by_exp[f"exp-{loss}"]
        assert r.info.status == "FINISHED" and r.data.params["adv.loss"] == loss
        assert r.data.tags["dvc.baseline_rev"] and r.data.tags["dvc.stage"] == "train"
        assert "eval/valid/psnr_y" in r.data.metrics  # the experiment's evaluate stage logged to it
        assert [a.path for a in client.list_artifacts(r.info.run_id, "model")] == ["model/generator.keras"]
    # one SRResNet for everybody: the workspace's; the experiments got it from DVC's run cache
    assert sum(r.data.tags.get("phase") == "pretrain" for r in runs) == 1


# --------------------------------------------------------------------------- the DVC remote
STAGES = ("fetch", "preprocess", "evalsets", "pretrain", "train", "evaluate")
# cache: false outs that are local working state (resumable archive downloads, training checkpoints):
# neither pushed to the remote nor committed to git
LOCAL_STATE = ("data/downloads", "models/checkpoints")

def _local_state_outs(dvc_yaml: Path) -> list[str]:
    """Which LOCAL_STATE folders dvc.yaml declares as stage outs."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])}
    return [p for p in LOCAL_STATE if p in outs]

@pytest.mark.slow
def test_clone_pulls_from_the_remote_and_reproduces_nothing(reproduced, reproduced_copy, tmp_path):
    # a fresh-clone-like project after its first `dvc repro` (the shared fixture)
    proj, env, out = reproduced_copy, dvc_env(tmp_path), reproduced[1]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, out[-3000:]
    # commit the pipeline's git side (dvc.lock, .gitignore files, cache: false metrics and plots),
    # not the local working state
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "rm", "-r", "-q", "--cached", "--ignore-unmatch", *LOCAL_STATE], proj, env)
    remote = tmp_path / "remote"
    _run(["dvc", "remote", "add", "-d", "local", str(remote)], proj, env)
    _run(["git", "add", ".dvc/config"], proj, env)
    _run(["git", "commit", "-q", "-m", "dvc repro"], proj, env)
    assert "pushed" in _run(["dvc", "push"], proj, env)
    assert any(p.is_file() for p in remote.rglob("*"))
    tracked = _run(["git", "ls-files"], proj, env).split()
    assert "dvc.lock" in tracked and "reports/metrics.json" in tracked
    # DVC's outs are in the cache and the remote, git only has the .gitignore files DVC wrote for them
    # (and data/own/'s README placeholders, part of the repository)
    assert not [f for f in tracked if f.startswith(("data/", "models/")) and not f.endswith(".gitignore")
                and not f.startswith("data/own/")]

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(proj), str(clone)], tmp_path, env)
    assert not (clone / "models" / "generator.keras").exists()
    _run(["dvc", "pull"], clone, env)
    for f in ("models/generator.keras", "data/processed/manifest.json", "reports/eval/valid/kodim23_compare.png", "models/srresnet.keras"):
        assert (clone / f).read_bytes() == (proj / f).read_bytes(), f
    assert sorted(p.name for p in (clone / "data/processed/train").iterdir()) == \
        sorted(p.name for p in (proj / "data/processed/train").iterdir())

    status = json.loads(_run(["dvc", "status", "--json"], clone, env).strip().splitlines()[-1])
    declared = _local_state_outs(clone / "dvc.yaml")
    if declared:
        # dvc.yaml declares local working state as (cache: false) outs: they are neither pushed nor in
        # git, so in a clone they are missing and DVC calls their stages changed (`dvc repro` would
        # re-run fetch and train). Nothing else may differ: everything pulled is up to date, and
        # `dvc repro --allow-missing` (stages whose only change is missing data are skipped) runs nothing.
        owner = {"data/downloads": "fetch", "models/checkpoints": "train"}
        assert status == {owner[p]: [{"changed outs": {p: "deleted"}}] for p in declared}, status
        out = _run(["dvc", "repro", "--allow-missing"], clone, env)
        assert "Running stage" not in out, out[-3000:]
        pytest.xfail(f"dvc.yaml declares {declared} as cache: false outs: missing in a clone, so `dvc repro` "
                     f"there re-runs their stages (status {status}); drop them from dvc.yaml's outs and keep them "
                     f"git-ignored")
    assert status == {}, status
    out = _run(["dvc", "repro"], clone, env)
    assert "Running stage" not in out, out[-3000:]
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out, out
