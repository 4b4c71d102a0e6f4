"""params.yaml files DVC refuses are refused here too, with one line naming the key (or byte) and the
line (GitHub issue 28 item 5): a duplicate key was silently taken as its last value, and bytes that
are not UTF-8 gave a 31-line UnicodeDecodeError traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from srgan import config
from srgan.config import ROOT, ConfigError

DUPLICATE_STEPS = "steps: 60                   # a second value for the same key\n"


def _with_duplicate(tmp_path: Path) -> tuple[Path, int]:
    """The project's params.yaml with a second ``steps:`` under ``pretrain:``; returns (path, its line)."""
    lines = config.PARAMS_PATH.read_text().splitlines(keepends=True)
    section = lines.index(next(ln for ln in lines if ln.startswith("pretrain:")))
    first = next(i for i in range(section, len(lines)) if lines[i].strip().startswith("steps:"))
    lines.insert(first + 1, "  " + DUPLICATE_STEPS)
    path = tmp_path / "params.yaml"
    path.write_text("".join(lines))
    return path, first + 2  # 1-based line of the duplicate


def test_duplicate_key_is_refused_naming_key_and_line(tmp_path):
    path, line = _with_duplicate(tmp_path)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    msg = str(err.value)
    assert "duplicate key 'steps'" in msg and "pretrain" in msg and f"line {line}" in msg and str(path) in msg, msg
    assert "\n" not in msg
    # the same everywhere a params file is read: overlays on it, and the writer used by study/tune
    with pytest.raises(ConfigError, match="duplicate key 'steps'"):
        config.from_dict({}, base=path)
    with pytest.raises(ConfigError, match="duplicate key 'steps'"):
        config.edit_params(path, {"gan.steps": 3})


def test_yaml_merge_keys_and_repeated_keys_in_separate_sections_are_fine(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("base: &b {steps: 1, lr: 2}\na:\n  <<: *b\n  steps: 5\nb:\n  steps: 6\n")
    parsed = config.parse_yaml(p, p.read_text())
    assert parsed == {"base": {"steps": 1, "lr": 2}, "a": {"steps": 5, "lr": 2}, "b": {"steps": 6}}


def test_non_utf8_params_is_one_line(tmp_path):
    raw = config.PARAMS_PATH.read_bytes().replace(b"# one seed", b"# one s\xe9ed", 1)
    path = tmp_path / "params.yaml"
    path.write_bytes(raw)
    line = raw[: raw.index(b"\xe9")].count(b"\n") + 1
    with pytest.raises(ConfigError) as err:
        config.load(path)
    msg = str(err.value)
    assert str(path) in msg and "UTF-8" in msg and f"line {line}" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("kind", ["duplicate", "non_utf8"])
def test_stage_command_prints_one_error_line(tmp_path, kind):
    if kind == "duplicate":
        path, _ = _with_duplicate(tmp_path)
        expected = "duplicate key 'steps'"
    else:
        path = tmp_path / "params.yaml"
        path.write_bytes(config.PARAMS_PATH.read_bytes() + b"# \xff\xfe\n")
        expected = "UTF-8"
    out = subprocess.run([sys.executable, str(ROOT / "src" / "pretrain.py"), "--params", str(path)],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr
