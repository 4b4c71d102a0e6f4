"""dvc.yaml tells the truth: every stage depends on every module it runs and on exactly the params
it reads, so `dvc repro` never calls a stale result up to date."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from srgan import trainer
from srgan.config import ROOT

SRC = ROOT / "src"


def _module_file(name: str) -> Path | None:
    """src/ file of a module of this project (``srgan.x`` or a stage script), else None."""
    parts = name.split(".")
    if parts[0] != "srgan":
        return None
    base = SRC.joinpath(*parts)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (module level and inside functions)."""
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(SRC).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if pkg else []
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from srgan import x`
    return {m for m in out if _module_file(m)}


def closure(script: Path) -> set[Path]:
    """The script and every project file it can import, transitively."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for m in _imports(f):
            todo.append(_module_file(m))
            pkg_init = _module_file(m.rsplit(".", 1)[0]) if "." in m else None
            if pkg_init:
                todo.append(pkg_init)
    return seen


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_depends_on_every_module_it_imports():
    for name, stage in _stages().items():
        script = re.search(r"python (src/\S+\.py)", stage["cmd"]).group(1)
        needed = {str(p.relative_to(ROOT)) for p in closure(ROOT / script)}
        declared = {d for d in stage.get("deps", []) if isinstance(d, str)}
        missing = needed - declared
        extra = {d for d in declared if d.startswith("src/") and d.endswith(".py")} - needed
        assert not missing, f"stage {name}: imports but does not depend on {sorted(missing)}"
        assert not extra, f"stage {name}: depends on modules it never imports {sorted(extra)}"


def test_training_stages_list_exactly_the_params_they_read():
    stages = _stages()
    for stage, phase in (("pretrain", "pretrain"), ("train", "gan")):
        assert sorted(stages[stage]["params"]) == sorted(trainer.PHASE_PARAMS[phase]), stage


def test_closure_follows_function_level_imports():
    # evaluate imports inference only inside a function: still a dependency
    assert SRC / "srgan" / "inference.py" in closure(SRC / "srgan" / "evaluate.py")
