"""Reference configurations by system, split and size: the one way tasks and users get data.

Below the public facade (:mod:`eqbench.api` re-exports :func:`load_data`), so tasks import it from
here and never the facade (DESIGN "Layers, one direction").
"""

from __future__ import annotations

import numpy as np
import torch

from eqbench.components import get_system
from eqbench.data import external, store
from eqbench.errors import ConfigError
from eqbench.systems.base import ParticleSystem

__all__ = ["DATA_SOURCES", "load_data"]

DATA_SOURCES = ("eqbench", "community")


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

    Example:
        >>> load_data("harmonic", "val", n=5).shape
        torch.Size([5, 3, 2])
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
