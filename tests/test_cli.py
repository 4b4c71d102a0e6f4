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


def test_installed_srgan_command_lists_and_runs_subcommands(tmp_path):
    """`pip install -e .` (make setup) provides `srgan`; it works from any working directory."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "srgan"
    if not exe.exists():
        exe = shutil.which("srgan")
    assert exe, "the srgan command is not installed: make setup runs `pip install -e .`"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0
    for cmd in ("upscale", "tune", "study", "mos", "export", "bench"):
        assert f"\n  {cmd} " in out.stdout, out.stdout
    sub = subprocess.run([str(exe), "upscale", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert sub.returncode == 0 and "--model" in sub.stdout
    bad = subprocess.run([str(exe), "nope"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr


HELD = """
import logging, os, sys, warnings
from srgan import quiet
logging.basicConfig(format="%(message)s")
with quiet.native_stderr_held():
    os.write(2, b"I0000 native notice\\n")
    warnings.warn("a python warning")
    logging.getLogger("srgan").warning("the project's own log line")
print("after the block", file=sys.stderr, flush=True)
if sys.argv[1:] == ["fail"]:
    with quiet.native_stderr_held():
        os.write(2, b"why it failed\\n")
        raise SystemExit(3)
quiet.set_verbose()
"""


def test_native_output_is_held_python_output_is_not():
    """Native writes to file descriptor 2 are held back (and written out once the process turns
    verbose, or when the block fails); warnings and logging reach stderr meanwhile."""
    env = {k: v for k, v in os.environ.items() if k != "SRGAN_VERBOSE"}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run([sys.executable, "-c", HELD], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    python_lines = [i for i, line in enumerate(lines) if "a python warning" in line or "own log line" in line]
    assert len(python_lines) == 2, out.stderr
    assert lines.index("after the block") > max(python_lines)
    assert lines.index("I0000 native notice") > lines.index("after the block")  # by set_verbose
    failed = subprocess.run([sys.executable, "-c", HELD, "fail"], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert failed.returncode == 3 and "why it failed" in failed.stderr, failed.stderr


def test_verbose_option_is_the_environment_variable(monkeypatch):
    from srgan import cli, quiet

    # setenv, not delenv: monkeypatch restores only what it recorded, and delenv of an unset
    # variable records nothing, so the "1" set below would leak into every later test's subprocesses
    monkeypatch.setenv(quiet.VERBOSE_ENV, "0")
    assert not quiet.verbose()
    cli.parser(None).parse_args([])
    assert not quiet.verbose()
    cli.parser(None).parse_args([quiet.VERBOSE_FLAG])
    assert quiet.verbose() and os.environ[quiet.VERBOSE_ENV] == "1"
