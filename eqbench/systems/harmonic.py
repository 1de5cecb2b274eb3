"""Harmonic: a known-answer system whose Boltzmann density *is* the flows' prior.

``u(x) = ½ |x|²`` on the CoM-free subspace U, so ``p(x) = exp(-u) / Z`` is the standard normal on
U, ``N(0, I_(N-1)D)``: exactly the prior every flow starts from (paper A.3, SPEC §1). Every number
the benchmark prints for it is known in closed form (k = (N-1) D):

- a flow equal to the prior (the identity map) has ``log w = -u - log q = 0.5 k log 2π``, the
  same for every sample, so its ESS is exactly 1;
- ``⟨u⟩ = k / 2`` (each of the k Gaussian coordinates carries ½ kT), variance ``k / 2``;
- the NLL of the prior on exact samples is ``k/2 (1 + log 2π)``, of which ``0.5 k log 2π`` is the
  Gaussian constant SPEC §1 requires in every NLL;
- the configurational temperature ``⟨|∇u|²⟩ / ⟨Δu⟩ = ⟨|x|²⟩ / k`` is 1.

Why a pair potential: for CoM-free x, ``Σ_(i<j) |x_i - x_j|² = N Σ_i |x_i|²``, so
``u = Σ_(i<j) d_ij² / (2N)`` equals ½ |x - x̄|² for any x. It is invariant under permutation,
rotation, reflection and translation like the paper's systems, and the generic pair-potential
code computes its energy, force and Laplacian (``Δu = k`` on the full space: each of the
N(N-1)/2 pairs adds ``2 (1/N + (D-1)/N)``), so a factor 2 anywhere in that code shows here.

Its reference data come from the same Metropolis generator as the paper's systems (SPEC §3).
The generator starts from the CoM-free standard normal — already the target. Measured at step
0.6 (10,000 samples per split): acceptance 0.39, integrated autocorrelation time ~26 steps for
the energy and the mean pair distance, configurational temperature 1.003 / 0.997 (train / test),
⟨u⟩ = 4.511 ± 0.021 / 4.484 ± 0.021 against the exact 4.5. The burn-in (1,000 = 38 τ) and
stride (100 = 3.8 τ) leave stored samples of a chain correlated by about exp(-100/26) ≈ 0.02, so
the statistical checks may treat them as independent; the generator is itself checked against
the known ⟨u⟩ = k/2.

Kind ``harmonic``; length scale ``sqrt(2D)``, the RMS pair distance: for CoM-free standard normal
x, ``x_i - x_j = z_i - z_j ~ N(0, 2 I_D)`` for any N, so ``d_ij² / 2`` follows a χ² law with D
degrees of freedom and ``⟨d²⟩ = 2D``. The typical pair distances ``[0, 2 sqrt(2D)]`` hold 99 % of
the pairs in 3-D (χ²_3 below 12) and 98.2 % in 2-D (χ²_2 below 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from eqbench.systems.base import DataProtocol, ParticleSystem

__all__ = ["Harmonic", "make_harmonic", "HARMONIC_PROTOCOL"]

#: Metropolis protocol: step 0.6 on the unit-variance target (step 1.0 accepted 17 % with τ ~32);
#: burn-in 38 and stride 3.8 autocorrelation times (τ ~26 steps, measured).
HARMONIC_PROTOCOL = DataProtocol(step_size=0.6, burn_in=1_000, stride=100, n_chains=500, init_scale=1.0)


@dataclass(frozen=True)
class Harmonic(ParticleSystem):
    """``u(x) = ½ |x - x̄|² = Σ_(i<j) d_ij² / (2N)``: the CoM-free standard normal as a target."""

    kind: ClassVar[str] = "harmonic"

    data_protocol: DataProtocol = field(default=HARMONIC_PROTOCOL)

    def pair_potential(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = float(self.n_particles)
        return d * d / (2.0 * n), d / n, torch.full_like(d, 1.0 / n)

    @property
    def length_scale(self) -> float:
        """``sqrt(2D)``: the RMS pair distance of the target (module docstring); independent of N."""
        return math.sqrt(2.0 * self.n_dims)

    def mean_energy(self) -> float:
        """Exact ``⟨u⟩ = (N-1) D / 2`` (equipartition on U)."""
        return 0.5 * self.n_dof

    def describe(self) -> str:
        return (
            f"{self.name}: {self.n_particles} particles in {self.n_dims}-D, harmonic known-answer system.\n"
            "  u(x) = ½ |x - x̄|² = Σ_(i<j) d_ij² / (2N): the Boltzmann density is the standard normal on the\n"
            "  CoM-free subspace, i.e. the flows' prior. A flow equal to its prior has ESS = 1;\n"
            f"  ⟨u⟩ = (N-1)D/2 = {self.mean_energy():g} kT; NLL of the prior = (N-1)D/2 (1 + log 2π) = "
            f"{self.mean_energy() + self.prior_log_normaliser():.3f} nats.\n"
            "  Energies in kT; configurations are CoM-free; symmetries: "
            + ", ".join(self.symmetries)
            + ".\n"
            f"  CoM-free dimension (N-1)D = {self.n_dof}; Gaussian NLL constant 0.5 (N-1) D log 2π = "
            f"{self.prior_log_normaliser():.3f}.\n"
            + self.describe_scales()
        )


def make_harmonic() -> Harmonic:
    """Four particles in 3-D: (N-1) D = 9, a dimension none of the paper's systems has (6, 2, 36),
    so a constant copied from another system shows."""
    return Harmonic(name="harmonic", n_particles=4, n_dims=3)
