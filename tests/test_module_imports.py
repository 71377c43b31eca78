"""The import rule of ``docs/architecture.md``: the entry points import the parts, a part imports
only the parts below it (``core < data < answers < model < runs < serving``), no part imports an
entry point, and the modules of ``src/`` import each other in no circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import qa_lightning

PACKAGE = Path(qa_lightning.__file__).parent
#: ``python -m qa_lightning.<name>`` commands and their helper (error reporting, the config path).
ENTRY_SIDE = {"train", "evaluate", "predict", "export", "report", "cli"}
#: The parts, lowest first: each may import the ones before it.
PARTS = ("core", "data", "answers", "model", "runs", "serving")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module of the package ``path`` imports, at the top or inside a function
    (``from package import module`` names the module, not the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if is_module(submodule) else node.module)
    return {name for name in names if name.split(".")[0] == "qa_lightning"}


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def part(name: str) -> str | None:
    """The part (or entry-side module) a module name belongs to; ``None`` for the root."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def modules() -> dict[str, set[str]]:
    """Module name -> the package's modules it imports."""
    return {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_part_or_the_entry_side() -> None:
    assert {part(name) for name in modules()} - {None} == set(PARTS) | ENTRY_SIDE


def test_parts_import_only_the_parts_below_them() -> None:
    offenders = {}
    for name, imported in modules().items():
        own = part(name)
        if own not in PARTS:
            continue
        allowed = set(PARTS[: PARTS.index(own) + 1])
        if bad := sorted(i for i in imported if part(i) not in allowed):
            offenders[name] = bad
    assert offenders == {}


def test_the_rule_catches_an_upward_or_entry_point_import(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text(
        "from qa_lightning.core.errors import ConfigError\n"
        "def f():\n    from qa_lightning.serving.answerer import QuestionAnswerer\n"
        "import qa_lightning.cli\n"
    )
    imported = imported_modules(source)
    assert imported == {
        "qa_lightning.core.errors",
        "qa_lightning.serving.answerer",
        "qa_lightning.cli",
    }
    assert {part(i) for i in imported} - set(PARTS[:2]) == {"serving", "cli"}


def test_no_import_circle_among_the_modules() -> None:
    graph = modules()
    # a package's __init__ is imported with any of its modules
    edges = {
        name: {i for i in imported if i in graph and i != name} for name, imported in graph.items()
    }
    try:
        order = list(TopologicalSorter(edges).static_order())
    except CycleError as error:  # pragma: no cover - the failure message
        raise AssertionError(f"import circle: {' -> '.join(error.args[1])}") from None
    assert set(order) == set(graph)


def test_a_circle_is_found(tmp_path: Path) -> None:
    with_circle = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    try:
        list(TopologicalSorter(with_circle).static_order())
    except CycleError as error:
        assert set(error.args[1]) == {"a", "b", "c"}
    else:
        raise AssertionError("the circle a -> b -> c -> a was not found")


def test_importing_the_parts_loads_no_entry_point() -> None:
    code = (
        "import importlib, pkgutil, sys, qa_lightning\n"
        f"for part in {PARTS!r}:\n"
        "    package = importlib.import_module('qa_lightning.' + part)\n"
        "    for info in pkgutil.iter_modules(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('qa_lightning'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    loaded = result.stdout.split()
    assert "qa_lightning.serving.int8" in loaded and "qa_lightning.runs.teacher" in loaded
    assert [m for m in loaded if part(m) in ENTRY_SIDE] == []
