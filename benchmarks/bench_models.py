"""Training and sampling cost per model on DW-4 and LJ-13 (paper B.1, Table 2); parameter counts.

- ``TimeTrainIteration``: one maximum-likelihood iteration (batch 64, AdamW, the model's
  training divergence and DTO RK4 solver; :func:`eqbench.timing.train_step`). The training rows
  are the system's CoM-free Gaussian MCMC starting points, not reference data: the cost per
  iteration does not depend on where the batch lies, and the suite needs no cached data.
- ``TimeSampling``: drawing samples with their exact log importance weights
  ``-u(x) - log q(x)`` (:func:`eqbench.timing.sample_step`, batches of at most 1,000).
  1,000 samples for the models with a closed-form or analytic density (kernel-flow, real-nvp,
  gaussian, and node on DW-4, whose brute force over 8 coordinates is cheap: ~0.4 s); only
  **16** samples for the models whose exact divergence is costly brute-force autograd
  (gradient-flow and schnet-flow on both systems, node on LJ-13): 1,000 would take 10-20 s
  on DW-4 and 4-9 minutes on LJ-13 on one thread. The count of a result follows from
  (model, system): :data:`SLOW` lists the 16-sample pairs.
- ``TrackParameters``: ``flow.n_parameters`` (the README's Models table).

Each model is built with its registered defaults after ``torch.manual_seed(0)`` (20 RK4 steps
for the CNFs; 2 in the CI smoke run, ``EQBENCH_BENCH_SMOKE=1``, which only checks that every
benchmark runs).
"""

from __future__ import annotations

from typing import ClassVar

import torch

import eqbench
from eqbench.timing import sample_step, train_step

from .common import SMOKE, fix_environment

MODELS = ["kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "gaussian"]
SYSTEMS = ["dw4", "lj13"]
#: (model, system) pairs whose exact sampling is brute force and slow: they sample SLOW_SAMPLES.
SLOW = {("gradient-flow", "dw4"), ("gradient-flow", "lj13"), ("schnet-flow", "dw4"),
        ("schnet-flow", "lj13"), ("node", "lj13")}
SLOW_SAMPLES = 2 if SMOKE else 16
FAST_SAMPLES = 1000


CNFS = {"kernel-flow", "gradient-flow", "schnet-flow", "node"}


def build(model: str, system_name: str):
    """The model with its registered defaults (in the CI smoke run, CNFs integrate with 2 RK4 steps)."""
    torch.manual_seed(0)
    system = eqbench.get_system(system_name)
    flow = eqbench.build_model(model, system, {"steps": 2} if SMOKE and model in CNFS else {})
    return system, flow


def sample_count(model: str, system_name: str) -> int:
    return SLOW_SAMPLES if (model, system_name) in SLOW else FAST_SAMPLES


class TimeTrainIteration:
    """Seconds per maximum-likelihood training iteration (batch 64)."""

    params = (MODELS, SYSTEMS)
    param_names: ClassVar[list[str]] = ["model", "system"]
    timeout = 300

    def setup(self, model: str, system_name: str) -> None:
        fix_environment()
        system, self.flow = build(model, system_name)
        dtype = next(self.flow.parameters()).dtype
        data = system.initial_configurations(1000, torch.Generator().manual_seed(0)).to(dtype)
        self.step = train_step(self.flow, data, batch=64)
        if not SMOKE:
            self.step()  # warm-up (skipped in the CI smoke run: 15 s for schnet-flow on LJ-13)

    def time_train_iteration(self, model: str, system_name: str) -> None:
        self.step()


class TimeSampling:
    """Seconds to draw the model's sample count with exact log-weights (see the module docstring)."""

    params = (MODELS, SYSTEMS)
    param_names: ClassVar[list[str]] = ["model", "system"]
    number = 1
    repeat = (1, 5, 60.0)
    timeout = 300

    def setup(self, model: str, system_name: str) -> None:
        fix_environment()
        system, flow = build(model, system_name)
        self.n_samples = sample_count(model, system_name)
        self.step = sample_step(flow, system, batch=min(self.n_samples, FAST_SAMPLES))
        if self.n_samples == FAST_SAMPLES:
            sample_step(flow, system, batch=8)()  # warm-up (cheap)

    def time_sample(self, model: str, system_name: str) -> None:
        self.step()


class TrackParameters:
    """Number of trainable parameters (``flow.n_parameters``)."""

    params = (MODELS, SYSTEMS)
    param_names: ClassVar[list[str]] = ["model", "system"]
    unit = "parameters"

    def track_n_parameters(self, model: str, system_name: str) -> int:
        return build(model, system_name)[1].n_parameters
