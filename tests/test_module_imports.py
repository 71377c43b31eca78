"""The import rule: the core (data, model, post-processing, metrics, inference and what they
build on) imports nothing of the entry points or of the helpers only they use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import qa_lightning

PACKAGE = Path(qa_lightning.__file__).parent
#: ``python -m qa_lightning.<name>`` commands, and the modules only they use (error reporting,
#: checkpoint writing and the training callbacks, int8 export).
ENTRY_POINTS = {"train", "evaluate", "predict", "export", "report", "serve"}
ENTRY_HELPERS = {"cli", "checkpointing", "callbacks", "quantize"}
ENTRY_SIDE = ENTRY_POINTS | ENTRY_HELPERS
CORE = (
    "qa_lightning.data",
    "qa_lightning.model",
    "qa_lightning.model.onnx_model",
    "qa_lightning.postprocess",
    "qa_lightning.metrics",
    "qa_lightning.inference",
    "qa_lightning.distill",
    "qa_lightning.checkpoint_reading",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def entry_side(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "qa_lightning" and len(parts) > 1 and parts[1] in ENTRY_SIDE


def test_entry_side_names() -> None:
    assert entry_side("qa_lightning.cli") and entry_side("qa_lightning.export.load_checkpoint")
    assert not entry_side("qa_lightning.checkpoint_reading")
    assert not entry_side("qa_lightning.data.collate") and not entry_side("lightning.pytorch.cli")
    found = imported_modules(PACKAGE / "train.py")
    assert "qa_lightning.cli" in found and "qa_lightning.export.try_export_hf" in found


def test_no_core_module_imports_an_entry_point_or_its_helpers() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if entry_side(name):
            continue
        if bad := sorted(filter(entry_side, imported_modules(path))):
            offenders[name] = bad
    assert offenders == {}


def test_importing_the_core_loads_no_entry_point() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('qa_lightning'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    loaded = result.stdout.split()
    assert set(CORE) <= set(loaded)
    assert [name for name in loaded if entry_side(name)] == []
