"""Runs say which code made them (GitHub issue 28 item 9): ``git.dirty`` is true only when the code or
params a run depends on differ from the commit, a fresh clone stays clean through what DVC writes,
and MLflow's own source tags are set (the UI's Source column and commit link)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from srgan import tracking
from srgan.config import ROOT

VENV_BIN = Path(sys.executable).parent


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _outs() -> list[str]:
    """Every out, metric and plot file of dvc.yaml (what `dvc repro` writes)."""
    import yaml

    found = []
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                found.append(entry if isinstance(entry, str) else next(iter(entry)))
    return found


@pytest.fixture
def clone(tmp_path) -> Path:
    """A fresh `git clone` of this repository's HEAD (what a new user starts from)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    dst = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dst)], check=True, timeout=120)
    for key, value in (("user.email", "t@example.com"), ("user.name", "t")):
        _git(dst, "config", key, value)
    return dst


@pytest.mark.slow
def test_a_fresh_clone_stays_clean_through_what_dvc_writes(clone):
    """DVC adds every out to the .gitignore beside it and rewrites dvc.lock (`dvc commit` does what
    `dvc repro` does to those files); the .gitignore entries are committed, so no tracked file but
    dvc.lock changes, and a run started then is not dirty."""
    for out in _outs():
        path = clone / out
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.suffix:  # a folder out
            path.mkdir(exist_ok=True)
            path = path / "x"
        path.write_text("x\n")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["dvc", "commit", "-f", "-q"], cwd=clone, env=env, check=True, timeout=300)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    changed = {line[3:] for line in status if not line.startswith("??")}
    untracked_ignores = [line for line in status if line.startswith("??") and line.endswith(".gitignore")]
    assert changed == {"dvc.lock"}, status
    assert not untracked_ignores, status
    assert tracking.git_state(clone) == {"git.commit": _git(clone, "rev-parse", "HEAD"), "git.dirty": "false"}


def test_dirty_means_code_or_params_differ(clone):
    def state() -> str:
        return tracking.git_state(clone)["git.dirty"]

    assert state() == "false"
    (clone / "dvc.lock").write_text("schema: '2.0'\n")  # DVC's bookkeeping, rewritten by every repro
    (clone / "README.md").write_text("notes\n")  # documentation is not what a run runs
    (clone / "models" / ".gitignore").write_text("/anything\n")
    assert state() == "false"
    (clone / "params.yaml").write_text((clone / "params.yaml").read_text().replace("seed: 42", "seed: 43"))
    assert state() == "true"
    _git(clone, "checkout", "params.yaml")
    assert state() == "false"
    src = clone / "src" / "srgan" / "losses.py"
    src.write_text(src.read_text() + "\n# edited\n")
    assert state() == "true"
    _git(clone, "checkout", str(src))
    (clone / "src" / "srgan" / "new_module.py").write_text("X = 1\n")  # new code, not committed yet
    assert state() == "true"


def test_runs_carry_mlflow_source_tags(mlflow_uri, monkeypatch):
    import mlflow

    # the script that runs, as a stage runs it (under pytest-xdist __main__ has no __file__ of its own)
    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(ROOT / "src" / "train.py"), raising=False)
    before = mlflow.get_tracking_uri()
    try:
        run = tracking.start_run("lineage")
        tags = mlflow.MlflowClient(mlflow_uri).get_run(run.run_id).data.tags
        run.end()
    finally:
        mlflow.set_tracking_uri(before)
    head = _git(ROOT, "rev-parse", "HEAD")
    assert tags["mlflow.source.git.commit"] == head == tags["git.commit"]
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == "src/train.py", tags  # relative to the repository
