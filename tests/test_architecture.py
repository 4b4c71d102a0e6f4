"""docs/ARCHITECTURE.md names an owner for every params section, every dvc.yaml out and every
module of the package: a newcomer can find who owns what from that page alone."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from srgan.config import ROOT

DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _table(title: str) -> dict[str, str]:
    """First column -> second column of the markdown table under the heading ``title``."""
    text = DOC.read_text()
    block = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1]
    return rows


def test_every_params_section_has_an_owner():
    sections = set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    owners = _table("Params sections and their owners")
    assert sections - set(owners) == set(), "params sections without a row"
    assert set(owners) - sections - {"params section"} == set(), "rows for sections that do not exist"


def test_every_dvc_out_has_an_owner():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = set()
    for stage in stages.values():
        for entry in stage.get("outs", []) + stage.get("metrics", []):
            outs.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    owners = _table("Artifacts and their owners")
    assert outs - set(owners) == set(), "dvc.yaml outs without a row"


def test_every_module_has_a_row_and_every_row_a_module():
    pkg = ROOT / "src" / "srgan"
    modules = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    modules |= {f"{p.name}/" for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules |= {f"tracking/{p.stem}" for p in (pkg / "tracking").glob("*.py") if p.stem != "__init__"}
    rows = set(_table("Modules (src/srgan/), one job each")) - {"module"}
    assert modules - rows == set(), "modules without a row"
    assert rows - modules == set(), "rows for modules that do not exist"


def test_owners_named_in_the_tables_exist():
    pkg = ROOT / "src" / "srgan"
    named = set()
    for title in ("Params sections and their owners", "Artifacts and their owners"):
        for owner in _table(title).values():
            named |= set(re.findall(r"`([a-z_/]+)`", owner.split("(")[0]))
    for name in named:
        path = pkg / name.rstrip("/")
        assert path.with_suffix(".py").exists() or path.is_dir(), name
