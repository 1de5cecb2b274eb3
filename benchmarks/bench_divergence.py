"""Velocity and divergence of the kernel flow vs the number of particles (paper §7.1, Fig. 3c).

One evaluation at t = 0.5 on a batch of 64 configurations, as in sampling (no graph to the
parameters): ``velocity`` alone, and velocity + divergence by ``closed-form``, ``brute-force``
(one backward pass per coordinate) and ``hutchinson`` (one Rademacher probe). The system is
LJ-13's potential (3-D) with N particles (``ParticleSystem.with_particles``, as the task builds it);
configurations are random CoM-free clusters at a fixed number density (radius ∝ N^(1/3)), so
no reference data is needed. Brute force is skipped above 32 particles (~3 s per call at 64).

``TrackDivergenceRatios`` records the hardware-independent ratios of the performance targets
(closed form / velocity, brute force / closed form), each the median of back-to-back rounds.
"""

from __future__ import annotations

from typing import ClassVar

import torch

import eqbench
from eqbench.tasks.divergence_cost import random_cluster
from eqbench.timing import evaluation_call

from .common import SMOKE, fix_environment, median_time_ratio

METHODS = ["velocity", "closed-form", "brute-force", "hutchinson"]
PARTICLES = [8, 13] if SMOKE else [8, 13, 16, 32, 64, 128]
BRUTE_FORCE_MAX = 32
BATCH = 64
#: Ball radius at 13 particles; roughly the size of LJ-13 clusters in the reference data.
RADIUS_13 = 1.9


def make_inputs(n_particles: int, batch: int = BATCH, seed: int = 0):
    """An untrained kernel flow for ``n_particles`` 3-D particles and ``batch`` random clusters."""
    torch.manual_seed(seed)
    system = eqbench.get_system("lj13").with_particles(n_particles)
    flow = eqbench.build_model("kernel-flow", system)
    flow.eval()
    radius = RADIUS_13 * (n_particles / 13) ** (1 / 3)
    x = random_cluster(batch, n_particles, 3, radius, torch.Generator().manual_seed(seed + n_particles),
                       dtype=torch.float32)
    return flow, x


class TimeDivergence:
    """Seconds per evaluation of the kernel flow (batch 64) by method and number of particles."""

    params = (METHODS, PARTICLES)
    param_names: ClassVar[list[str]] = ["method", "n_particles"]
    timeout = 300

    def setup(self, method: str, n_particles: int) -> None:
        if method == "brute-force" and n_particles > BRUTE_FORCE_MAX:
            raise NotImplementedError("brute force above 32 particles takes seconds per call")
        fix_environment()
        flow, x = make_inputs(n_particles)
        self.call = evaluation_call(flow, x, None if method == "velocity" else method)
        self.call()  # warm-up

    def time_evaluation(self, method: str, n_particles: int) -> None:
        self.call()


class TrackDivergenceRatios:
    """Time ratios at 13 particles (batch 64): closed form / velocity and brute force / closed form."""

    params = ([13],)
    param_names: ClassVar[list[str]] = ["n_particles"]
    unit = "ratio"
    number = 1
    repeat = 1
    timeout = 300

    def setup(self, n_particles: int) -> None:
        fix_environment()
        flow, x = make_inputs(n_particles)
        self.velocity = evaluation_call(flow, x, None)
        self.closed = evaluation_call(flow, x, "closed-form")
        self.brute = evaluation_call(flow, x, "brute-force")

    def track_closed_form_over_velocity(self, n_particles: int) -> float:
        return median_time_ratio(self.closed, self.velocity, repeat=3 if SMOKE else 9)

    def track_brute_force_over_closed_form(self, n_particles: int) -> float:
        return median_time_ratio(self.brute, self.closed, repeat=3 if SMOKE else 7)
