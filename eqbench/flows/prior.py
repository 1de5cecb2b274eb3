"""The CoM-free isotropic normal prior (paper §5 "Invariant Prior Density", A.3; SPEC §1).

Sampling ``z ~ N(0, I)`` on R^{N·D} and subtracting the particle mean projects onto the CoM-free
subspace U; for ``z ∈ U`` the density is ``N(0, I)`` on U, whose normaliser runs over
``(N - 1) D`` dimensions: ``log ρ(z) = -|z|²/2 - (N - 1) D/2 · log 2π``. Every NLL eqbench
reports includes that constant.
"""

from __future__ import annotations

import math

import torch

from eqbench.geometry import remove_com

__all__ = ["CoMFreeNormal", "StandardNormal"]


class StandardNormal:
    """``N(0, I)`` on all ``N·D`` coordinates: the prior of a CoM-augmented flow (paper B.2)."""

    def __init__(self, n_particles: int, n_dims: int):
        self.n_particles = n_particles
        self.n_dims = n_dims
        self.n_dof = self._dof(n_particles, n_dims)
        self.log_normaliser = 0.5 * self.n_dof * math.log(2.0 * math.pi)

    @staticmethod
    def _dof(n_particles: int, n_dims: int) -> int:
        return n_particles * n_dims

    def _project(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        # Draw where the generator lives (a seeded CPU generator stays reproducible on CUDA runs).
        source = generator.device if generator is not None else device
        z = torch.randn(n, self.n_particles, self.n_dims, generator=generator, dtype=dtype, device=source)
        return self._project(z.to(device) if device is not None else z)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * self._project(z).pow(2).sum(dim=(-2, -1)) - self.log_normaliser


class CoMFreeNormal(StandardNormal):
    """Standard normal on the CoM-free subspace of ``n_particles`` points in ``n_dims`` dims.

    ``log_prob`` ignores any CoM component of its input; the normaliser runs over
    ``(N - 1) D`` dimensions.
    """

    @staticmethod
    def _dof(n_particles: int, n_dims: int) -> int:
        return (n_particles - 1) * n_dims

    def _project(self, z: torch.Tensor) -> torch.Tensor:
        return remove_com(z)
