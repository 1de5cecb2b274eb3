"""The paper's step-size rule for Metropolis reference data (C.4): maximise acceptance x step.

Why: with isotropic Gaussian moves of all coordinates, a small step is accepted almost always but
moves little, a large one is rejected; the product of the acceptance rate α and the step s is a
cheap proxy for the distance travelled per step, and the paper picks the step that maximises it
from short trajectories. Measured here on chains that were first brought to equilibrium (a start
far from it accepts differently), every step size from the same equilibrated states and its own
generator stream, so the scan is reproducible and its rows comparable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from eqbench.data.mcmc import _metropolis_step
from eqbench.systems.base import ParticleSystem

__all__ = ["StepSizeProbe", "best_step_size", "scan_step_sizes"]


@dataclass(frozen=True)
class StepSizeProbe:
    """One step size of a scan: acceptance ``α`` over ``n_steps`` x ``n_chains`` moves, and ``α·s``."""

    step_size: float
    acceptance: float
    efficiency: float
    n_steps: int
    n_chains: int


def scan_step_sizes(
    system: ParticleSystem,
    step_sizes: list[float],
    *,
    n_chains: int = 256,
    equilibration_steps: int = 20_000,
    equilibration_step: float | None = None,
    n_steps: int = 2_000,
    seed: int = 0,
    start: torch.Tensor | None = None,
) -> tuple[list[StepSizeProbe], torch.Tensor, float]:
    """Acceptance and ``α·s`` of each step size, measured from equilibrated chains.

    The chains start from ``start`` (e.g. the end of an earlier equilibration; its batch size is
    then the number of chains) or else from :meth:`~ParticleSystem.initial_configurations`, run
    ``equilibration_steps`` at ``equilibration_step`` (default the system's protocol step), then
    each step size runs ``n_steps`` from those same states. Returns the probes, the equilibrated
    states (to continue from) and the equilibration's wall time in seconds.

    Example:
        >>> import eqbench
        >>> probes, _, _ = scan_step_sizes(eqbench.get_system("dw2"), [0.3, 0.6], n_chains=8,
        ...                                equilibration_steps=50, n_steps=50)
        >>> [p.step_size for p in probes]
        [0.3, 0.6]
    """
    if not step_sizes or any(s <= 0 for s in step_sizes):
        raise ValueError(f"step sizes must be a non-empty list of positive numbers, got {step_sizes!r}")
    generator = torch.Generator().manual_seed(seed)
    step = system.data_protocol.step_size if equilibration_step is None else equilibration_step
    began = time.perf_counter()
    with torch.no_grad():
        x = system.initial_configurations(n_chains, generator) if start is None else start.clone()
        n_chains = x.shape[0]
        u = system.energy(x)
        for _ in range(equilibration_steps):
            x, u, _ = _metropolis_step(system, x, u, step, generator)
        equilibrated, u_equilibrated = x.clone(), u.clone()
        wall = time.perf_counter() - began
        probes = []
        for k, s in enumerate(step_sizes):
            g = torch.Generator().manual_seed(seed * 1_000 + k + 1)
            y, v = equilibrated.clone(), u_equilibrated.clone()
            accepted = 0
            for _ in range(n_steps):
                y, v, accept = _metropolis_step(system, y, v, s, g)
                accepted += int(accept.sum())
            alpha = accepted / (n_steps * n_chains)
            probes.append(StepSizeProbe(float(s), alpha, alpha * s, n_steps, n_chains))
    return probes, equilibrated, wall


def best_step_size(probes: list[StepSizeProbe]) -> StepSizeProbe:
    """The probe with the largest ``α·s`` (the paper's rule, C.4).

    Example:
        >>> best_step_size([StepSizeProbe(0.1, 0.5, 0.05, 10, 1), StepSizeProbe(0.2, 0.3, 0.06, 10, 1)]).step_size
        0.2
    """
    if not probes:
        raise ValueError("no probes to choose from")
    return max(probes, key=lambda p: p.efficiency)
