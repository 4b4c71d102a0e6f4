"""Shared data and models through a real DVC remote (a local folder), end to end.

A copy of the project becomes a git repository, runs the whole pipeline (`dvc repro`) on a tiny
params.yaml, pushes to the remote; a `git clone` of it pulls from the remote and must find every
stage up to date: a colleague (or a CI job, or a GPU machine) gets the data, the model and the
reports without recomputing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from srgan import config

STAGES = ("fetch", "preprocess", "evalsets", "pretrain", "train", "evaluate")
# cache: false outs that are local working state (resumable archive downloads, training checkpoints):
# neither pushed to the remote nor committed to git
LOCAL_STATE = ("data/downloads", "models/checkpoints")
GIT = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
       "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def _env(tmp_path: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # dvc.yaml's `python` and `dvc` are the venv's
    return {**os.environ, **GIT, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache")}


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed in {cwd}:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return out.stdout + out.stderr


def _tiny_params() -> str:
    data = json.loads(json.dumps(TINY))
    for k, v in {"data.source": "sample", "preprocess.valid_max_side": 64}.items():
        config.set_dotted(data, k, v)
    return yaml.safe_dump(config.from_dict(data).to_dict(), sort_keys=False)  # every key dvc.yaml names


def _local_state_outs(dvc_yaml: Path) -> list[str]:
    """Which LOCAL_STATE folders dvc.yaml declares as stage outs."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])}
    return [p for p in LOCAL_STATE if p in outs]


@pytest.mark.slow
def test_clone_pulls_from_the_remote_and_reproduces_nothing(project_copy, tmp_path):
    proj, env = project_copy, _env(tmp_path)
    # start like a fresh clone: no outputs or lock file copied from the working tree
    # (data/own/ stays: its README placeholders are in git and are the folder source's DVC deps)
    gone = [proj / p for p in ("models", "reports", "dvc.lock", "mlflow.db", "mlartifacts", "optuna")]
    gone += [p for p in (proj / "data").iterdir() if p.name != "own"]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    (proj / "params.yaml").write_text(_tiny_params())
    _sh(["git", "init", "-q", "-b", "main"], proj, env)
    _sh(["git", "add", "-A"], proj, env)
    _sh(["git", "commit", "-q", "-m", "project"], proj, env)

    out = _sh(["dvc", "repro"], proj, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, out[-3000:]
    # commit the pipeline's git side (dvc.lock, .gitignore files, cache: false metrics and plots),
    # not the local working state
    _sh(["git", "add", "-A"], proj, env)
    _sh(["git", "rm", "-r", "-q", "--cached", "--ignore-unmatch", *LOCAL_STATE], proj, env)
    remote = tmp_path / "remote"
    _sh(["dvc", "remote", "add", "-d", "local", str(remote)], proj, env)
    _sh(["git", "add", ".dvc/config"], proj, env)
    _sh(["git", "commit", "-q", "-m", "dvc repro"], proj, env)
    assert "pushed" in _sh(["dvc", "push"], proj, env)
    assert any(p.is_file() for p in remote.rglob("*"))
    tracked = _sh(["git", "ls-files"], proj, env).split()
    assert "dvc.lock" in tracked and "reports/metrics.json" in tracked
    # DVC's outs are in the cache and the remote, git only has the .gitignore files DVC wrote for them
    # (and data/own/'s README placeholders, part of the repository)
    assert not [f for f in tracked if f.startswith(("data/", "models/")) and not f.endswith(".gitignore")
                and not f.startswith("data/own/")]

    clone = tmp_path / "clone"
    _sh(["git", "clone", "-q", str(proj), str(clone)], tmp_path, env)
    assert not (clone / "models" / "generator.keras").exists()
    _sh(["dvc", "pull"], clone, env)
    for f in ("models/generator.keras", "data/processed/manifest.json", "reports/eval/valid/kodim23_compare.png", "models/srresnet.keras"):
        assert (clone / f).read_bytes() == (proj / f).read_bytes(), f
    assert sorted(p.name for p in (clone / "data/processed/train").iterdir()) == \
        sorted(p.name for p in (proj / "data/processed/train").iterdir())

    status = json.loads(_sh(["dvc", "status", "--json"], clone, env).strip().splitlines()[-1])
    declared = _local_state_outs(clone / "dvc.yaml")
    if declared:
        # dvc.yaml declares local working state as (cache: false) outs: they are neither pushed nor in
        # git, so in a clone they are missing and DVC calls their stages changed (`dvc repro` would
        # re-run fetch and train). Nothing else may differ: everything pulled is up to date, and
        # `dvc repro --allow-missing` (stages whose only change is missing data are skipped) runs nothing.
        owner = {"data/downloads": "fetch", "models/checkpoints": "train"}
        assert status == {owner[p]: [{"changed outs": {p: "deleted"}}] for p in declared}, status
        out = _sh(["dvc", "repro", "--allow-missing"], clone, env)
        assert "Running stage" not in out, out[-3000:]
        pytest.xfail(f"dvc.yaml declares {declared} as cache: false outs: missing in a clone, so `dvc repro` "
                     f"there re-runs their stages (status {status}); drop them from dvc.yaml's outs and keep them "
                     f"git-ignored")
    assert status == {}, status
    out = _sh(["dvc", "repro"], clone, env)
    assert "Running stage" not in out, out[-3000:]
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out, out
