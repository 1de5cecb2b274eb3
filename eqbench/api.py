"""The public Python API (DESIGN "Public Python API"); the CLI is a thin layer over it.

A facade only: every function lives in the layer it belongs to and is re-exported here, so no
module of eqbench ever imports this one (DESIGN "Layers, one direction").
"""

from __future__ import annotations

from eqbench import catalog  # noqa: F401  (registers the built-ins)
from eqbench.components import build_model, get_system
from eqbench.data.loading import DATA_SOURCES, load_data
from eqbench.devices import resolve_device
from eqbench.registry import MODELS, SYSTEMS, TASKS, Entry
from eqbench.evaluation import evaluate
from eqbench.runner import run

__all__ = [
    "get_system",
    "load_data",
    "build_model",
    "run",
    "evaluate",
    "list_systems",
    "list_models",
    "list_tasks",
    "resolve_device",
    "DATA_SOURCES",
]


def list_systems() -> list[Entry]:
    """Registered and plugin systems, with their origin (imports nothing)."""
    return SYSTEMS.entries()


def list_models() -> list[Entry]:
    """Registered and plugin models, with their origin and description (imports no built-in;
    loads each plugin once to read its description, warning for one that fails to load)."""
    return MODELS.entries()


def list_tasks() -> list[Entry]:
    """Registered and plugin tasks, with their origin and description (imports no built-in;
    loads each plugin once to read its description, warning for one that fails to load)."""
    return TASKS.entries()
