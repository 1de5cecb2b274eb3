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

__all__ = ["CoMFreeNormal"]


class CoMFreeNormal:
    """Standard normal on the CoM-free subspace of ``n_particles`` points in ``n_dims`` dims."""

    def __init__(self, n_particles: int, n_dims: int):
        self.n_particles = n_particles
        self.n_dims = n_dims
        self.n_dof = (n_particles - 1) * n_dims
        self.log_normaliser = 0.5 * self.n_dof * math.log(2.0 * math.pi)

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        z = torch.randn(n, self.n_particles, self.n_dims, generator=generator, dtype=dtype, device=device)
        return remove_com(z)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of CoM-free ``z`` (the CoM component, if any, is ignored)."""
        z = remove_com(z)
        return -0.5 * z.pow(2).sum(dim=(-2, -1)) - self.log_normaliser
