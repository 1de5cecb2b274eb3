"""A flow with a known answer for the end-to-end tests (``module:attr`` builder ``known_answer_models:prior_flow``).

On the ``harmonic`` system (target = the CoM-free standard normal prior) a flow equal to its prior
makes every number a task prints known in closed form. The tasks train every trainable model, so
the flow must *stay* the prior through training: see :class:`PriorFlow`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from eqbench.errors import ConfigError
from eqbench.flows.base import Flow
from eqbench.systems.base import SYMMETRIES, ParticleSystem


class PriorFlow(Flow):
    """``x = exp(θ²) z``: an isotropic scale flow that is exactly the identity at ``θ = 0`` and stays there.

    Why θ² and not log σ: ``θ = 0`` is a stationary point of *any* loss (``∂x/∂θ = 2θ exp(θ²) z = 0``),
    so every gradient is exactly zero; AdamW then moves nothing (its step ``lr · m / (√v + ε)`` is 0
    and weight decay multiplies θ = 0). Through a task's ML and KL training the flow remains the
    identity map bit for bit, and its ``log q`` is the prior's, Gaussian constant included.
    """

    symmetries = SYMMETRIES

    def __init__(self, system: ParticleSystem):
        super().__init__(system)
        self.theta = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.n_dof = system.n_dof

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale = self.theta.square()
        return z * log_scale.exp(), (self.n_dof * log_scale).expand(z.shape[0])

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale = self.theta.square()
        x = x - x.mean(dim=-2, keepdim=True)
        return x * torch.exp(-log_scale), (-self.n_dof * log_scale).expand(x.shape[0])


def prior_flow(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> PriorFlow:
    """Builder: no settings."""
    if config:
        raise ConfigError(f"prior_flow takes no settings, got {', '.join(sorted(config))}")
    return PriorFlow(system)
