"""dvc.yaml lists, for every stage, the library code it runs: a change there must invalidate the stage's cache,
while a change elsewhere (the report CLI, say) must not rerun training."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path, package: str) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in ("pipeline", "stages"))
    return found


def _closure(start: str) -> set[Path]:
    seen: set[Path] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # `from pipeline.data import X` also runs pipeline/__init__.py and pipeline/data/__init__.py
        for i in range(1, len(parts) + 1):
            f = _module_file(".".join(parts[:i]))
            if f is None or f in seen:
                continue
            seen.add(f)
            pkg = ".".join(parts[:i]) if f.name == "__init__.py" else ".".join(parts[: i - 1])
            todo.extend(_imports(f, pkg))
    return seen


def _stages() -> dict[str, dict]:
    """Stages of dvc.yaml and of survey/dvc.yaml (whose paths are relative to the root too: wdir '..')."""
    stages = dict(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    for name, spec in yaml.safe_load((ROOT / "survey" / "dvc.yaml").read_text())["stages"].items():
        assert spec.get("wdir") == ".."
        stages[f"survey/dvc.yaml:{name}"] = spec
    return stages


def _code_deps(spec: dict) -> list[Path]:
    return [ROOT / d for d in spec["deps"] if d.split("/")[0] in ("pipeline", "stages")]


def _files(dep: Path) -> set[Path]:
    return set(dep.rglob("*.py")) if dep.is_dir() else {dep}


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_are_exactly_the_code_it_runs(stage):
    spec = _stages()[stage]
    module = spec["cmd"].split("-m ")[1].split()[0]
    deps = _code_deps(spec)
    code = _closure(module)
    assert len(code) > 2
    for d in deps:
        assert d.exists(), f"stage {stage!r} lists {d.relative_to(ROOT)}, which does not exist"
    uncovered = sorted(str(f.relative_to(ROOT)) for f in code
                       if f.name != "__init__.py" or f.parent.name != "pipeline"
                       if not any(f == d or d in f.parents for d in deps))
    assert not uncovered, f"stage {stage!r} runs code missing from its deps in dvc.yaml: {uncovered}"
    extra = sorted(str(f.relative_to(ROOT)) for d in deps for f in _files(d) if f not in code)
    assert not extra, f"stage {stage!r} lists code it never imports (an edit there would rerun it): {extra}"


def test_the_dependency_check_catches_both_mistakes():
    spec = dict(_stages()["prepare"])
    missing = dict(spec, deps=[d for d in spec["deps"] if d != "pipeline/data"])
    code = _closure("stages.prepare")
    assert any(f.parent.name == "data" for f in code)
    assert not all(any(f == d or d in f.parents for d in _code_deps(missing)) for f in code
                   if f.name != "__init__.py" or f.parent.name != "pipeline")
    extra = dict(spec, deps=spec["deps"] + ["pipeline/survey"])
    assert any(f not in code for d in _code_deps(extra) for f in _files(d))


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_reporting_and_cli_code_invalidate_no_stage(stage):
    deps = _code_deps(_stages()[stage])
    for f in ("pipeline/cli.py", "pipeline/report.py"):
        assert not any(ROOT / f == d or d in (ROOT / f).parents for d in deps), (stage, f)
