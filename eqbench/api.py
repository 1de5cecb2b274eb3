"""The public Python API (DESIGN "Public Python API"); the CLI is a thin layer over it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from eqbench import catalog  # noqa: F401  (registers the built-ins)
from eqbench.data import external, store
from eqbench.errors import ConfigError
from eqbench.flows.base import Flow
from eqbench.devices import resolve_device
from eqbench.registry import MODELS, SYSTEMS, TASKS, Entry
from eqbench.runner import run
from eqbench.systems.base import ParticleSystem

__all__ = [
    "get_system",
    "load_data",
    "build_model",
    "run",
    "list_systems",
    "list_models",
    "list_tasks",
    "resolve_device",
]

DATA_SOURCES = ("eqbench", "community")


def get_system(name: str | ParticleSystem) -> ParticleSystem:
    """A registered system by name (``dw2``, ``dw4``, ``lj13``, or a plugin's)."""
    if isinstance(name, ParticleSystem):
        return name
    return SYSTEMS.get(name)()


def load_data(
    system: str | ParticleSystem,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    *,
    source: str = "eqbench",
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    regenerate: store.Regenerate = "auto",
    progress: bool | None = None,
) -> torch.Tensor:
    """CoM-free configurations ``[n, N, D]`` of a split.

    ``source="eqbench"`` (default) uses eqbench's own MCMC data (generated and cached on first
    use). Splits (SPEC §3), each from its own chains and seed, with zero overlap between any two:
    ``train`` (the 10,000-configuration training pool), ``val`` (2,000 configurations for model
    selection: choosing a checkpoint or a hyperparameter on it leaves the test set unseen) and
    ``test`` (the independent 10,000-configuration test set). ``n`` rows are drawn from the split
    with a permutation seeded by ``seed`` (``n=None``: the whole split), so for one seed the
    subsets are nested. ``source="community"`` loads the public DEM/EFM files (see
    ``eqbench data --source community``).
    """
    system = get_system(system)
    if source == "eqbench":
        pool, _ = store.load_pool(system, split, regenerate=regenerate, progress=progress)
    elif source == "community":
        pool = external.load_reference(system, split)
    else:
        raise ConfigError(f"unknown data source {source!r}; valid: {', '.join(DATA_SOURCES)}")
    rows = store.subset(pool, n, seed)
    return torch.from_numpy(np.ascontiguousarray(rows)).to(device=device, dtype=dtype)


def build_model(name: str, system: str | ParticleSystem, config: Mapping[str, Any] | None = None) -> Flow:
    """Build a registered model (or a ``"module:attr"`` builder) for a system."""
    builder = MODELS.get(name)
    return builder(get_system(system), dict(config or {}))


def list_systems() -> list[Entry]:
    return SYSTEMS.entries()


def list_models() -> list[Entry]:
    return MODELS.entries()


def list_tasks() -> list[Entry]:
    return TASKS.entries()
