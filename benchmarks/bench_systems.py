"""asv suites for the particle systems and the vectorised Metropolis sampler (SPEC §2, §3).

Run from the repository root with ``asv run --python=same`` (``asv.conf.json`` uses the
existing environment). ``EQBENCH_BENCH_THREADS`` pins ``torch.set_num_threads`` so numbers from
machines with different core counts stay comparable.

Setup is cheap on purpose (asv repeats it for every sample): the configurations are the
systems' own CoM-free Gaussian starting points, not equilibrium data, which costs the same per
energy evaluation and needs no cached reference data.
"""

from __future__ import annotations

import os
import statistics
import timeit
from collections.abc import Callable
from typing import ClassVar

import torch

import eqbench
from eqbench.data.mcmc import _metropolis_step

SYSTEMS = ["dw4", "lj13"]


def _set_threads() -> None:
    threads = os.environ.get("EQBENCH_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def _configurations(name: str, n: int):
    system = eqbench.get_system(name)
    x = system.initial_configurations(n, torch.Generator().manual_seed(0))
    return system, x


def _calibrated_number(timer: timeit.Timer, min_run_s: float) -> int:
    """Smallest power of two of calls that takes at least ``min_run_s``."""
    number = 1
    while timer.timeit(number) < min_run_s:
        number *= 2
    return number


def _median_time_ratio(
    numerator: Callable[[], object],
    denominator: Callable[[], object],
    repeat: int = 7,
    min_run_s: float = 0.02,
) -> float:
    """Median over ``repeat`` rounds of (time per call of ``numerator``) / (same of ``denominator``).

    The two are timed back to back within each round, so load from other processes that comes
    and goes between rounds affects both sides of a ratio alike instead of skewing one of them.
    """
    timers = (timeit.Timer(numerator), timeit.Timer(denominator))
    numbers = [_calibrated_number(timer, min_run_s) for timer in timers]
    ratios = []
    for _ in range(repeat):
        top, bottom = (timer.timeit(number) / number for timer, number in zip(timers, numbers))
        ratios.append(top / bottom)
    return statistics.median(ratios)


class TimeEnergy:
    """Batched energy and force of a system (the cost unit of MCMC and of reverse-KL training)."""

    params = (SYSTEMS, [64, 1000])
    param_names: ClassVar[list[str]] = ["system", "batch"]

    def setup(self, name: str, batch: int) -> None:
        _set_threads()
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
        _set_threads()
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
        _set_threads()
        self.system, self.x = _configurations(name, n_chains)
        self.u = self.system.energy(self.x)
        self.step_size = self.system.data_protocol.step_size
        self.generator = torch.Generator().manual_seed(1)

    def track_step_over_energy(self, name: str, n_chains: int) -> float:
        def step() -> None:
            _metropolis_step(self.system, self.x, self.u, self.step_size, self.generator)

        def energy() -> None:
            self.system.energy(self.x)

        return _median_time_ratio(step, energy)
