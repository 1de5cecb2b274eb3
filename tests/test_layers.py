"""Layers, one direction (DESIGN): a module never imports a module of a higher layer, not even
inside a function, and nothing below the command line imports the public facade ``eqbench.api``.

Imports are read from the source with ``ast`` (function-level imports included), so the test
sees the dependency graph as written, not only what one import happens to execute.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "eqbench"

#: Lowest first. A module may import its own layer and the layers below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "resources", "atomic", "versions", "registry", "geometry", "config", "devices", "capabilities",
     "workers", "snapshots", "grad_guard"),
    ("systems", "records"),
    ("free_energy",),  # log Z by AIS: the yardstick of the data layer (data.log_z caches it)
    ("flows", "data", "components", "artifacts"),
    ("metrics", "alignment", "sample_metrics", "minima", "train", "testing", "timing"),
    ("tasks", "plots"),  # plots: figure helpers the tasks draw with, and the dispatch to Task.plot
    ("planning",),
    ("runner", "cost"),
    ("executors", "sweep", "evaluation"),
    ("report", "standard_metrics_table", "catalog", "demo", "api", "cli", "__init__", "__main__"),
)
_LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if top not in _LAYER_OF:
        raise AssertionError(f"eqbench.{module} has no layer in tests/test_layers.py::LAYERS; add it")
    return _LAYER_OF[top]


def _eqbench_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "eqbench":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("eqbench."):
                found.add(node.module.removeprefix("eqbench."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("eqbench.") for a in node.names if a.name.startswith("eqbench."))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=_module_name)
def test_no_module_imports_a_higher_layer(path):
    module = _module_name(path)
    if module == "__init__" or module == "__main__":
        return
    own = _layer(module)
    upward = sorted(m for m in _eqbench_imports(path) if _layer(m) > own)
    assert not upward, f"eqbench.{module} (layer {own}) imports higher layers: {upward}"


def test_only_the_command_line_uses_the_facade():
    users = sorted(_module_name(p) for p in MODULES if "api" in _eqbench_imports(p))
    assert users in ([], ["cli"], ["__init__"], ["__init__", "cli"]), users
