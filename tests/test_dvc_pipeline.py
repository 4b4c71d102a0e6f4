"""The whole DVC pipeline, for real, on a tiny params.yaml in a copy of the project."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from srgan import config


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def tiny_project(project: Path, tmp_path: Path) -> dict:
    """Write the tiny params into the copy, make it a git repo; return the env to run DVC in it."""
    data = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in TINY.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if isinstance(v, dict):
                    data[section][k].update(v)
                else:
                    data[section][k] = v
    data["preprocess"]["hr_crop"] = 64  # the sample photos are large: a few 64-px crops each
    config.from_dict(data)
    (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
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
    assert ran_stages(log) == {"fetch", "preprocess", "train", "evaluate"}, log
    metrics = json.loads((project_copy / "reports" / "metrics.json").read_text())
    assert {"psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y"} <= set(metrics)
    assert (project_copy / "reports" / "index.html").stat().st_size > 10_000
    assert (project_copy / "models" / "generator.keras").exists()

    # nothing changed: nothing runs
    log = _run(dvc + ["repro"], project_copy, env)
    assert ran_stages(log) == set(), log

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

    assert stale_after("train", "gan_steps", 2) == {"train"}
    assert stale_after("adv", "loss", "hinge") == {"train"}
    assert stale_after("evaluate", "zoom", 24) == {"evaluate"}
    assert stale_after("preprocess", "crops_per_image", 2) == {"preprocess"}
    assert stale_after("tune", "n_trials", 3) == set()  # no stage reads tune.*
    show = _run(dvc + ["metrics", "show", "--json"], project_copy, env)
    assert "psnr_y" in show
