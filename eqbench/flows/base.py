"""The Flow interface every model implements (DESIGN "Public Python API"; paper §2).

A flow maps prior samples ``z`` (CoM-free normal, :mod:`eqbench.flows.prior`) to configurations
``x``. ``forward(z) -> (x, logdet)`` with ``logdet = log|det ∂x/∂z|`` on U, and
``inverse(x) -> (z, logdet)`` with the log-determinant of the inverse map, so that
``log q(x) = log ρ(z) + logdet_inverse`` (SPEC §1 signs). Models state the symmetries they
claim; the contract tests in :mod:`eqbench.testing` hold them to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from eqbench.flows.prior import CoMFreeNormal
from eqbench.systems.base import ParticleSystem

__all__ = ["Flow"]


class Flow(nn.Module, ABC):
    """Base class: subclasses implement :meth:`forward` and :meth:`inverse`."""

    #: Symmetries of the model density (a subset of ``eqbench.systems.SYMMETRIES``).
    symmetries: tuple[str, ...] = ()

    def __init__(self, system: ParticleSystem):
        super().__init__()
        self.n_particles = system.n_particles
        self.n_dims = system.n_dims
        self.system_name = system.name
        self.prior = CoMFreeNormal(system.n_particles, system.n_dims)

    @abstractmethod
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map prior samples to configurations: ``(x, log|det ∂x/∂z|)``."""

    @abstractmethod
    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map configurations to latents: ``(z, log|det ∂z/∂x|)``."""

    def _reference_tensor(self) -> torch.Tensor:
        for tensor in self.parameters():
            return tensor
        for tensor in self.buffers():
            return tensor
        return torch.empty(0)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log q(x)`` in nats per configuration, including the Gaussian constant."""
        z, logdet = self.inverse(x)
        return self.prior.log_prob(z) + logdet

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` configurations and their exact log-densities ``log q(x)``."""
        ref = self._reference_tensor()
        z = self.prior.sample(n, generator=generator, dtype=ref.dtype, device=ref.device)
        x, logdet = self.forward(z)
        return x, self.prior.log_prob(z) - logdet

    @property
    def n_parameters(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
