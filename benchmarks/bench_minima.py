"""Batched L-BFGS minimisation of LJ-13 configurations (SPEC §5, paper §7.5: the minima census).

Each run minimises a batch of the system's CoM-free Gaussian MCMC starting points (float64,
gtol 1e-6; about 120 L-BFGS steps each, all converge) with :func:`eqbench.minima.minimize`.
Starts are generated in setup; no reference data is needed.
"""

from __future__ import annotations

from typing import ClassVar

import torch

import eqbench
from eqbench.minima import minimize

from .common import SMOKE, fix_environment


class TimeMinimize:
    """Seconds to minimise ``batch`` LJ-13 configurations to |∇u| < 1e-6."""

    params = ([64] if SMOKE else [64, 1000],)
    param_names: ClassVar[list[str]] = ["batch"]
    number = 1
    timeout = 300

    def setup(self, batch: int) -> None:
        fix_environment()
        self.system = eqbench.get_system("lj13")
        self.x = self.system.initial_configurations(batch, torch.Generator().manual_seed(0))

    def time_minimize(self, batch: int) -> None:
        minimize(self.system, self.x)


class TrackMinimizeConverged:
    """Fraction of the 64 starts that converge (guards the timing above against early exits)."""

    unit = "fraction"

    def setup(self) -> None:
        fix_environment()

    def track_converged_fraction(self) -> float:
        system = eqbench.get_system("lj13")
        x = system.initial_configurations(64, torch.Generator().manual_seed(0))
        return minimize(system, x).n_converged / 64
