"""Lennard-Jones cluster with a CoM oscillator: LJ-13 (paper §6, C.6; SPEC §2).

``u(x) = (ε/τ) Σ_{i≠j} [(rm/d_ij)¹² - 2 (rm/d_ij)⁶] + ½ Σ_i |x_i - x̄|²`` with ε = rm = τ = 1.

The pair sum runs over **ordered** pairs: each unordered pair is counted twice. The paper's
formula (``ε/(2τ) Σ_{i,j}``) reads like the single count, but every LJ-13 number it reports
(Table 1's energy bins, the global minimum -83.09 of Fig. 7) and the public LJ-13 data of
later work follow the ordered-pair energy (SPEC §2). Libraries that count each pair once (e.g.
bgflow) give pair energies half as large; compare with care.

Kind ``lennard-jones``; length scale ``rm``, the distance of the pair minimum. Typical pair
distances run from ``σ = 2^(-1/6) rm``, where the pair energy crosses zero (closer pairs cost
many kT), to the diameter of the cluster, estimated as N spheres of diameter rm close-packed in
a D-ball (see :attr:`LennardJones.pair_distance_range`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from eqbench.errors import ConfigError
from eqbench.systems.base import DataProtocol, ParticleSystem

__all__ = ["LennardJones", "make_lennard_jones", "make_lj13"]

#: Paper C.4: step 0.025, 20,000 burn-in steps. Measured at this step: acceptance 32 %; the
#: loose-cluster starts sit ~44 kT above equilibrium and relax within ~15,000 steps (256 chains
#: x 100,000 steps). The slowest mode is the mean pair distance: its integrated autocorrelation
#: time is ~3,000-3,200 steps when measured on 250 chains x 123,000 production steps (the
#: energy's ~2,200-2,400); shorter traces (60,000 steps, or the former 22,000) cut its tail and
#: gave ~1,600-2,600, below the former stride of 2,000. Burn-in 65,000 (20 of the slowest
#: times), stride 4,000 (1.25 of them). 200 chains of 51 stored samples (50 chains of 41 for the
#: validation set): the burn-in is paid per chain and each step has a fixed ~0.3 ms cost, so
#: ~200 chains minimise the wall time for 10,000 samples at these settings (54 M chain-steps,
#: against 42 M for the former 1,000 chains x 20,000-step burn-in, stride 2,000).
LJ_PROTOCOL = DataProtocol(step_size=0.025, burn_in=65_000, stride=4_000, n_chains=200, n_val_chains=50,
                           init_scale=1.0)

#: Packing fraction of equal spheres, densest known in 1-3 D (line, hexagonal, fcc): sizes the
#: cluster diameter of :attr:`LennardJones.pair_distance_range`; higher dimensions use the 3-D one.
_PACKING = {1: 1.0, 2: math.pi / (2.0 * math.sqrt(3.0)), 3: math.pi / (3.0 * math.sqrt(2.0))}


@dataclass(frozen=True)
class LennardJones(ParticleSystem):
    kind: ClassVar[str] = "lennard-jones"

    epsilon: float = 1.0
    rm: float = 1.0
    tau: float = 1.0
    oscillator_scale: float = 1.0
    pair_multiplicity: float = 2.0  # ordered pairs, SPEC §2
    data_protocol: DataProtocol = field(default=LJ_PROTOCOL)

    def pair_potential(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.epsilon / self.tau
        q2 = (self.rm / d).square()
        q6 = q2 * q2 * q2
        q12 = q6 * q6
        f = k * (q12 - 2.0 * q6)
        df = k * (-12.0 * q12 + 12.0 * q6) / d
        d2f = k * (156.0 * q12 - 84.0 * q6) / (d * d)
        return f, df, d2f

    @property
    def length_scale(self) -> float:
        """``rm``: the distance of the pair minimum, where the paper concentrates its kernels (C.1)."""
        return self.rm

    @property
    def pair_distance_range(self) -> tuple[float, float]:
        """``(σ, diameter)``: ``σ = 2^(-1/6) rm``, where the pair energy crosses zero, to the
        diameter ``rm (N / η)^(1/D)`` of N spheres of diameter rm packed at the densest fraction η
        in a D-ball (``N vol(rm/2) = η vol(R)``, diameter 2R). LJ-13: [0.89, 2.60] (its icosahedral
        minimum spans 1.9 rm); LJ-55: [0.89, 4.21]."""
        packing = _PACKING.get(self.n_dims, _PACKING[3])
        return (2.0 ** (-1.0 / 6.0) * self.rm, self.rm * (self.n_particles / packing) ** (1.0 / self.n_dims))

    def external_energy(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-2, keepdim=True)
        return 0.5 * self.oscillator_scale * centred.pow(2).sum(dim=(-2, -1))

    def external_gradient(self, x: torch.Tensor) -> torch.Tensor:
        return self.oscillator_scale * (x - x.mean(dim=-2, keepdim=True))

    def external_laplacian(self, x: torch.Tensor) -> torch.Tensor:
        # ∂²/∂x_ia² of ½|x_i - x̄|² summed over the particles is 1 - 1/N per coordinate.
        return x.new_full(x.shape[:-2], self.oscillator_scale * self.n_dims * (self.n_particles - 1))

    def initial_configurations(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Non-overlapping random clusters: sequential insertion in a ball, rejecting d < 0.9 rm.

        Gaussian starts put particles on top of each other (energies ~1e12), which Metropolis at
        step 0.025 escapes only slowly; starting from a loose cluster makes the burn-in count.
        """
        radius = 1.2 * self.rm * (self.n_particles ** (1.0 / 3.0))
        x = torch.zeros(n, self.n_particles, self.n_dims, dtype=torch.float64)
        for k in range(self.n_particles):
            pending = torch.ones(n, dtype=torch.bool)
            for _ in range(10_000):
                m = int(pending.sum())
                if m == 0:
                    break
                trial = torch.randn(m, self.n_dims, generator=generator, dtype=torch.float64)
                trial = trial / trial.norm(dim=-1, keepdim=True)
                trial = trial * radius * torch.rand(m, 1, generator=generator, dtype=torch.float64) ** (1 / 3)
                if k > 0:
                    dmin = (x[pending, :k] - trial[:, None]).norm(dim=-1).min(dim=-1).values
                    ok = dmin >= 0.9 * self.rm
                else:
                    ok = torch.ones(m, dtype=torch.bool)
                idx = pending.nonzero().squeeze(-1)[ok]
                x[idx, k] = trial[ok]
                pending[idx] = False
            else:  # pragma: no cover - only with an absurd radius
                raise RuntimeError("could not place Lennard-Jones particles without overlap")
        return x - x.mean(dim=-2, keepdim=True)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.n_particles} Lennard-Jones particles in {self.n_dims}-D with a harmonic "
            "CoM oscillator (paper §6, C.6).\n"
            "  u(x) = (ε/τ) Σ_(i≠j) [(rm/d_ij)^12 - 2 (rm/d_ij)^6] + ½ Σ_i |x_i - x̄|^2, "
            f"ε = {self.epsilon:g}, rm = {self.rm:g}, τ = {self.tau:g}.\n"
            "  CONVENTION: the pair sum runs over ORDERED pairs (each pair counted twice), as in every\n"
            "  LJ-13 number of the paper (global minimum -83.09, Table 1's energy bins) and in the public\n"
            "  LJ-13 data sets of later work. Single-count libraries give pair energies half as large.\n"
            "  Energies in kT; configurations are CoM-free; symmetries: "
            + ", ".join(self.symmetries)
            + ".\n"
            f"  CoM-free dimension (N-1)D = {self.n_dof}; Gaussian NLL constant 0.5 (N-1) D log 2π = "
            f"{self.prior_log_normaliser():.3f}.\n"
            + self.describe_scales()
        )


def make_lj13() -> LennardJones:
    """LJ-13: 13 particles in 3-D, global minimum -83.09 (icosahedron, paper Fig. 7)."""
    return LennardJones(name="lj13", n_particles=13, n_dims=3)


def make_lennard_jones(n_particles: int, n_dims: int = 3) -> LennardJones:
    """The paper's Lennard-Jones cluster (ordered-pair energy, CoM oscillator) with ``n_particles``
    particles, named ``lj<N>`` (e.g. ``lj19``, ``lj55``).

    Every model takes its defaults from the kind and ``rm``, as for LJ-13. The data protocol is
    LJ-13's, measured for 13 particles only: measure the slowest mode before trusting reference
    data of another size.
    """
    if isinstance(n_particles, bool) or not isinstance(n_particles, int) or n_particles < 2:
        raise ConfigError(f"a Lennard-Jones cluster needs an integer number of particles >= 2, got {n_particles!r}")
    return LennardJones(name=f"lj{n_particles}", n_particles=n_particles, n_dims=n_dims)
