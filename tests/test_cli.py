"""Stage-script plumbing that must run before TensorFlow is imported."""

from __future__ import annotations

import os
import subprocess
import sys

from srgan.config import ROOT

PROBE = """
import os, sys
{before}
from srgan import cli
print(cli.use_onednn({enabled}), os.environ.get("TF_ENABLE_ONEDNN_OPTS"))
"""


def _probe(enabled: bool, env_value: str | None = None, before: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["PYTHONPATH"] = str(ROOT / "src")
    if env_value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = env_value
    code = PROBE.format(enabled=enabled, before=before)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_use_onednn_sets_the_variable_from_the_param():
    assert _probe(True).stdout.split() == ["1", "1"]
    assert _probe(False).stdout.split() == ["0", "0"]


def test_explicit_environment_wins_with_a_warning():
    out = _probe(True, env_value="0")
    assert out.stdout.split() == ["0", "0"]
    assert "overrides train.onednn" in out.stderr


def test_too_late_after_tensorflow_import_is_reported():
    out = _probe(True, before="import tensorflow")
    assert out.stdout.split() == ["unset", "None"], out.stderr
    assert "train.onednn has no effect" in out.stderr
