"""asv suites for the particle systems and the vectorised Metropolis sampler (SPEC §2, §3).

Run from the repository root with ``asv run --python=same`` (``asv.conf.json`` uses the
existing environment). Threads and malloc are fixed by :func:`benchmarks.common.fix_environment`
(``EQBENCH_BENCH_THREADS``, default 1). MCMC steps per second = 1 / ``TimeMetropolis.time_step``.

Setup is cheap on purpose (asv repeats it for every sample): the configurations are the
systems' own CoM-free Gaussian starting points, not equilibrium data, which costs the same per
energy evaluation and needs no cached reference data.
"""

from __future__ import annotations

from typing import ClassVar

import torch

import eqbench
from eqbench.data.mcmc import _metropolis_step

from .common import fix_environment, median_time_ratio

SYSTEMS = ["dw4", "lj13"]


def _configurations(name: str, n: int):
    system = eqbench.get_system(name)
    x = system.initial_configurations(n, torch.Generator().manual_seed(0))
    return system, x


class TimeEnergy:
    """Batched energy and force of a system (the cost unit of MCMC and of reverse-KL training)."""

    params = (SYSTEMS, [64, 1000])
    param_names: ClassVar[list[str]] = ["system", "batch"]

    def setup(self, name: str, batch: int) -> None:
        fix_environment()
        self.system, self.x = _configurations(name, batch)
        # The first calls pay one-time allocations; keep them out of `asv run --quick`.
        self.system.energy(self.x)
        self.system.force(self.x)

    def time_energy(self, name: str, batch: int) -> None:
        self.system.energy(self.x)

    def time_force(self, name: str, batch: int) -> None:
        self.system.force(self.x)


class TimeMetropolis:
    """One Metropolis step of many chains at the system's reference step size (paper C.4)."""

    params = (SYSTEMS, [100, 1000])
    param_names: ClassVar[list[str]] = ["system", "n_chains"]

    def setup(self, name: str, n_chains: int) -> None:
        fix_environment()
        self.system, self.x = _configurations(name, n_chains)
        self.u = self.system.energy(self.x)
        self.step_size = self.system.data_protocol.step_size
        self.generator = torch.Generator().manual_seed(1)

    def time_step(self, name: str, n_chains: int) -> None:
        _metropolis_step(self.system, self.x, self.u, self.step_size, self.generator)


class TrackMetropolisOverhead:
    """Time of one Metropolis step divided by one batched energy evaluation of the same batch.

    A ratio near 1 means the sampler is bound by the energy; it is hardware-independent enough
    to compare across machines, unlike the seconds of :class:`TimeMetropolis`.
    """

    params = (SYSTEMS, [100, 1000])
    param_names: ClassVar[list[str]] = ["system", "n_chains"]
    unit = "ratio"
    number = 1
    repeat = 1
    timeout = 120

    def setup(self, name: str, n_chains: int) -> None:
        fix_environment()
        self.system, self.x = _configurations(name, n_chains)
        self.u = self.system.energy(self.x)
        self.step_size = self.system.data_protocol.step_size
        self.generator = torch.Generator().manual_seed(1)

    def track_step_over_energy(self, name: str, n_chains: int) -> float:
        def step() -> None:
            _metropolis_step(self.system, self.x, self.u, self.step_size, self.generator)

        def energy() -> None:
            self.system.energy(self.x)

        return median_time_ratio(step, energy)
