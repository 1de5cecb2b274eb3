"""Double-well pair potential: DW-2 and DW-4 (paper §6, C.6; SPEC §2).

``u(x) = Σ_{i<j} [a (d_ij - d0) + b (d_ij - d0)² + c (d_ij - d0)⁴] / τ`` with a = 0, b = -4,
c = 0.9, d0 = 4, τ = 1. The paper writes ``1/(2τ) Σ_{i,j}``: the same sum, each unordered pair
once. Each pair prefers one of two distances (about 2.5 and 5.5); four particles are frustrated
and DW-4 has exactly five metastable minima.

Kind ``double-well``; length scale ``d0``, the barrier between the two preferred distances
``d0 ± sqrt(-b / 2c)`` (a = 0). The pair term is even in ``d - d0``, and the typical pair
distances ``[0, 2 d0]`` are symmetric about it: for d0 = 4 that is the paper's kernel range
[0, 8] (C.1), which holds both preferred distances.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from eqbench.errors import ConfigError
from eqbench.systems.base import DataProtocol, ParticleSystem

__all__ = ["DoubleWell", "make_double_well", "make_dw2", "make_dw4"]

#: Paper C.4: Gaussian proposal step 0.5, 1,000 burn-in steps (SPEC §3: at least that).
#: DW-4 measured at this step (1,000 chains x 200,000 steps, the first 50,000 discarded):
#: acceptance 4.7 %, energy autocorrelation time ~210 steps, but the mean pair distance and
#: the number of long pairs (which of the five minima a chain sits in) ~1,900 steps: that is
#: the slowest mode. The Gaussian starts (scale 2) are too compact: 19 % of chains start with
#: four long pairs against 52 % in equilibrium, and the mean distance relaxes over ~5,000
#: steps. So the burn-in is 40,000 steps (21 slowest autocorrelation times: the start's bias
#: shrinks by e^-21) and the stride 3,000 (1.6 of them). Long-run <u> = -22.544 ± 0.002.
#: At stride 250 about 1 % of stored rows were repeats (chains resting in the narrowest
#: minima); at 3,000 none of the 22,000 stored rows of train, val and test (any would be dropped).
DW4_PROTOCOL = DataProtocol(step_size=0.5, burn_in=40_000, stride=3_000, n_chains=500, n_val_chains=100,
                            init_scale=2.0)
#: DW-2 at step 0.5 (1,000 chains x 100,000 steps): acceptance 43 %, energy autocorrelation
#: ~11 steps, the pair distance (hops between the two wells) ~200 steps. Burn-in 5,000 (25 of
#: those), stride 500 (2.5): a quarter of DW-4's steps per chain, for the same guarantees.
DW2_PROTOCOL = DataProtocol(step_size=0.5, burn_in=5_000, stride=500, n_chains=500, n_val_chains=100,
                            init_scale=2.0)


@dataclass(frozen=True)
class DoubleWell(ParticleSystem):
    kind: ClassVar[str] = "double-well"

    a: float = 0.0
    b: float = -4.0
    c: float = 0.9
    d0: float = 4.0
    tau: float = 1.0
    data_protocol: DataProtocol = field(default=DW4_PROTOCOL)

    def pair_potential(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = d - self.d0
        s2 = s * s
        f = (self.a * s + self.b * s2 + self.c * s2 * s2) / self.tau
        df = (self.a + 2.0 * self.b * s + 4.0 * self.c * s2 * s) / self.tau
        d2f = (2.0 * self.b + 12.0 * self.c * s2) / self.tau
        return f, df, d2f

    @property
    def length_scale(self) -> float:
        """``d0``: the centre of the double well in the pair distance (paper C.6)."""
        return self.d0

    @property
    def pair_distance_range(self) -> tuple[float, float]:
        """``(0, 2 d0)``: symmetric about the barrier, holding both preferred distances (paper C.1)."""
        return (0.0, 2.0 * self.d0)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.n_particles} particles in {self.n_dims}-D with a double-well pair potential "
            "(paper §6, C.6).\n"
            f"  u(x) = Σ_(i<j) [a (d_ij - d0) + b (d_ij - d0)^2 + c (d_ij - d0)^4] / τ, "
            f"a = {self.a:g}, b = {self.b:g}, c = {self.c:g}, d0 = {self.d0:g}, τ = {self.tau:g}.\n"
            "  Each unordered pair counted once (the paper's 1/(2τ) Σ_(i,j) is the same sum).\n"
            "  Energies in kT; configurations are CoM-free; symmetries: "
            + ", ".join(self.symmetries)
            + ".\n"
            f"  CoM-free dimension (N-1)D = {self.n_dof}; Gaussian NLL constant 0.5 (N-1) D log 2π = "
            f"{self.prior_log_normaliser():.3f}.\n"
            + self.describe_scales()
        )


def make_dw2() -> DoubleWell:
    """DW-2: two particles; the free energy along their distance is known exactly (paper Fig. 3b)."""
    return DoubleWell(name="dw2", n_particles=2, n_dims=2, data_protocol=DW2_PROTOCOL)


def make_dw4() -> DoubleWell:
    """DW-4: four frustrated particles with five metastable minima (paper §7.5)."""
    return DoubleWell(name="dw4", n_particles=4, n_dims=2)


def make_double_well(n_particles: int, n_dims: int = 2) -> DoubleWell:
    """The paper's double-well potential with ``n_particles`` particles, named ``dw<N>``.

    For systems beyond the paper's (e.g. ``dw8``): every model takes its defaults from the kind
    and length scale, so they match DW-4's. The data protocol is DW-4's, measured for 4
    particles only: measure the slowest mode before trusting reference data of another size.
    """
    if isinstance(n_particles, bool) or not isinstance(n_particles, int) or n_particles < 2:
        raise ConfigError(f"a double well needs an integer number of particles >= 2, got {n_particles!r}")
    return DoubleWell(name=f"dw{n_particles}", n_particles=n_particles, n_dims=n_dims)
