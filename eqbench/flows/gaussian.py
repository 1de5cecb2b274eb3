"""Isotropic CoM-free Gaussian: the simplest exact-likelihood baseline.

``x = σ z`` with ``z`` from the CoM-free normal prior: a one-parameter linear flow whose density
``N(0, σ² I)`` on U has every symmetry of the systems (S1-S3, paper §5). It has a closed-form
maximum-likelihood fit, ``σ² = ⟨|x|²⟩ / ((N - 1) D)``, so it gives each system a reference
NLL any trained flow should beat, and it exercises the whole pipeline (data, task, records)
without training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from eqbench.capabilities import model_builder
from eqbench.flows.settings import check_settings, number
from eqbench.flows.base import Flow
from eqbench.systems.base import SYMMETRIES, ParticleSystem

__all__ = ["SETTINGS", "IsotropicGaussian", "build", "validate"]


class IsotropicGaussian(Flow):
    symmetries = SYMMETRIES

    def __init__(self, system: ParticleSystem, scale: float = 1.0, dtype: torch.dtype = torch.float64):
        super().__init__(system)
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.log_scale = nn.Parameter(torch.tensor(float(scale), dtype=dtype).log())
        self.n_dof = system.n_dof

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = z * self.log_scale.exp()
        return x, (self.n_dof * self.log_scale).expand(z.shape[0])

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x - x.mean(dim=-2, keepdim=True)
        z = x * torch.exp(-self.log_scale)
        return z, (-self.n_dof * self.log_scale).expand(x.shape[0])

    @torch.no_grad()
    def fit_closed_form(self, x: torch.Tensor) -> None:
        """Maximum-likelihood scale for CoM-free data ``x``: ``σ² = ⟨|x|²⟩ / ((N-1) D)``."""
        x = x - x.mean(dim=-2, keepdim=True)
        variance = x.pow(2).sum(dim=(-2, -1)).mean() / self.n_dof
        self.log_scale.copy_(0.5 * variance.log())


#: The settings of ``gaussian`` (:mod:`eqbench.flows.settings`): the initial σ.
SETTINGS = {"scale": number(above=0.0)}


def validate(system: ParticleSystem, config: Mapping[str, Any]) -> None:
    """Check ``gaussian`` settings without building anything (planning calls this)."""
    check_settings(config, "gaussian", SETTINGS)


@model_builder(capabilities=["equivariant", "exact-density"], validate=validate)
def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> IsotropicGaussian:
    """Registry builder: ``config`` may set ``scale`` (initial σ, a finite number > 0, default 1)."""
    validate(system, config or {})
    return IsotropicGaussian(system, scale=float(dict(config or {}).get("scale", 1.0)))
