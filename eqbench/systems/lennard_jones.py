"""Lennard-Jones cluster with a CoM oscillator: LJ-13 (paper §6, C.6; SPEC §2).

``u(x) = (ε/τ) Σ_{i≠j} [(rm/d_ij)¹² - 2 (rm/d_ij)⁶] + ½ Σ_i |x_i - x̄|²`` with ε = rm = τ = 1.

The pair sum runs over **ordered** pairs: each unordered pair is counted twice. The paper's
formula (``ε/(2τ) Σ_{i,j}``) reads like the single count, but every LJ-13 number it reports
(Table 1's energy bins, the global minimum -83.09 of Fig. 7) and the public LJ-13 data of
later work follow the ordered-pair energy (SPEC §2). Libraries that count each pair once (e.g.
bgflow) give pair energies half as large; compare with care. That convention is registered as
``lj13-single`` (:func:`make_lj13_single`): bgflow's ``LennardJonesPotential``
(``bgflow/distribution/energy/lennard_jones.py``) sums ``ε [(rm/d)^12 - 2 (rm/d)^6]`` over ordered
pairs and halves it, and adds ``½ oscillator_scale Σ_i |x_i - x̄|²`` with scale 1, as does the SE(3)
augmented coupling flow's ``eacf/targets/target_energy/leonard_jones.py`` (``ε/(2τ) Σ_(i≠j)`` plus
``0.5 Σ |x_i - x̄|²``): the same rm form, ε = rm = τ = 1 and oscillator as eqbench's, only the pair
count differs.

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

__all__ = ["LJ55_PROTOCOL", "LJ_PROTOCOL", "LJ_SINGLE_PROTOCOL", "LennardJones", "mackay_icosahedron", "make_lennard_jones",
           "make_lj13", "make_lj13_single", "make_lj55"]

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

#: ``lj13-single`` (bgflow's single-count energy, a hotter target than lj13's), measured with
#: eqbench's generator. Step by the paper's rule (C.4: maximise acceptance x step from short
#: trajectories; 256 chains equilibrated 20,000 steps at step 0.1, then 2,000-3,000 steps per
#: step size): 0.025: α 0.610, α·s 0.0153; 0.035: 0.485, 0.0170; 0.040: 0.434, 0.0173 (the
#: maximum); 0.045: 0.384, 0.0173; 0.050: 0.343-0.337, 0.0172-0.0168; 0.055: 0.300, 0.0165; 0.060:
#: 0.268, 0.0161; 0.065: 0.239, 0.0155; 0.075: 0.187, 0.0140; 0.1: 0.104, 0.0104; 0.125: 0.061,
#: 0.0077; 0.15: 0.036, 0.0054. The optimum is flat (0.04-0.05 within 1 %); 0.04 is its maximum.
#: At 0.04: acceptance 43 %; the loose-cluster starts (~25 kT above equilibrium) relax within
#: ~8,000 steps. Integrated autocorrelation times (Sokal window 5) on 256 chains x 250,000
#: production steps after 50,000 burn-in (seed 11): energy 1,900, mean pair distance 2,123 (the
#: slowest mode); the halves of the trace (125,000 steps) give 1,750-1,990, the two halves of the
#: chains 1,895 / 1,905 and 2,118 / 2,128; an independent run of 128 chains x 120,000 steps
#: (seed 7) gave 1,908 / 2,134. Burn-in 45,000 (21 of the slowest times), stride 2,800 (1.32 of
#: them); 200 chains of 51 stored samples, 50 for the validation set, as for lj13 (same cost per
#: step): 38 M chain-steps per 10,000 samples, 70 % of lj13's. Generated (`eqbench data
#: lj13-single --jobs 2`, 296 s of CPU, 13.8 min wall on 2 cores shared with other jobs): train /
#: val / test acceptance 0.433 / 0.431 / 0.433, configurational temperature 0.994 ± 0.010 / 0.982
#: ± 0.025 / 0.995 ± 0.010, <u> 0.64 ± 0.07 / 0.42 ± 0.15 / 0.58 ± 0.07, autocorrelation times
#: (energy / mean distance) 1,904 / 2,069, 1,868 / 2,081, 1,876 / 2,079; no duplicates, no overlap.
LJ_SINGLE_PROTOCOL = DataProtocol(step_size=0.04, burn_in=45_000, stride=2_800, n_chains=200, n_val_chains=50,
                                  init_scale=1.0)

#: ``lj55`` (lj13's convention), measured with eqbench's generator (``studies/lj55-data``). Start:
#: lj13's loose cluster (radius 1.2 rm N^(1/3) = 4.6 rm) sits ~600 kT above equilibrium and had
#: not collapsed after 50,000 steps (128 chains, step 0.012: <u> +288 -> -303); ``init_scale``
#: 0.6 (radius 2.7 rm) starts at -47 and reaches -311 in 22,000 steps, -323 in 40,000. Step by the
#: paper's rule (C.4), 64 chains after that 40,000-step equilibration, 1,000 steps per step size:
#: 0.005: α 0.516, α·s 0.00258; 0.006: 0.438, 0.00263 (the maximum); 0.007: 0.366, 0.00256;
#: 0.008: 0.303, 0.00242; 0.009: 0.240, 0.00216; 0.010: 0.198, 0.00198; 0.012: 0.123, 0.00148;
#: 0.014: 0.072, 0.00100. At 0.006 (acceptance 0.436) a 100,000-step production of the same
#: chains still drifted by ~2 kT (<u> -322.0 -> -324.1) and its integrated autocorrelation times
#: grew with the trace (energy / mean pair distance: 900 / 1,000 from 10,000 steps, 3,700 / 4,100
#: from 50,000, 5,840 / 6,920 from 100,000): a lower bound, the slowest mode (the mean pair
#: distance, as for LJ-13) at least ~6,900 steps. The first protocol built on that (burn-in
#: 150,000, stride 10,000) made data whose own 400,000-step production traces measured 11,240 /
#: 14,340 (validation split, 13 chains; acceptance 0.436, configurational temperature 1.017 ±
#: 0.010, <u> -326.0 ± 1.2, no drift, 937 s): stride 0.70 of the slowest time, so its
#: stride check failed. The second (burn-in 300,000, stride 20,000; 1,633 s / 2,045 s for train /
#: test on two one-thread workers) measured on its 820,000-step traces: train energy / mean
#: distance 14,760 / 20,650, test 19,180 / 25,790 (stride 0.97 / 0.78 of the slowest: failed
#: again), acceptance 0.436, configurational temperature 0.994 ± 0.008 / 1.002 ± 0.007, <u>
#: -326.03 ± 0.56 / -325.97 ± 0.49, no drift, no duplicates. The times still grow with the trace
#: (x1.4-1.8 per doubling), so the slowest mode is longer than any single estimate; an
#: Ornstein-Uhlenbeck reading of the mean distance (stationary variance 8.1e-4, per-step squared
#: change 4.1e-7) gives only ~4,000 steps, so the slow part is structural, not the breathing of
#: the cluster. Hence burn-in 400,000 and stride 40,000 (15 and 1.55 of 25,790). A smaller pool
#: than LJ-13's, stated: every step costs ~0.06 ms per chain (19x LJ-13's pairs), so 10,000
#: samples at this stride alone are 400 M chain-steps (~7 h on one core); 1,000 training and 1,000
#: test configurations from 25 chains each, 500 validation from 13: ~51 M chain-steps per large
#: split.
LJ55_PROTOCOL = DataProtocol(step_size=0.006, burn_in=400_000, stride=40_000, n_chains=25, n_val_chains=13,
                             n_train=1_000, n_val=500, n_test=1_000, init_scale=0.6)

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

    def pair_energy(self, d: torch.Tensor) -> torch.Tensor:
        # The same expression as pair_potential's f, without the two derivatives (a third of
        # the cost of an energy evaluation in Metropolis sampling).
        q2 = (self.rm / d).square()
        q6 = q2 * q2 * q2
        return (self.epsilon / self.tau) * (q6 * q6 - 2.0 * q6)

    def pair_energy_of_squared(self, d2: torch.Tensor) -> torch.Tensor:
        # f needs (rm/d)^2 only: skipping the square root makes LJ-55 Metropolis ~1.6x faster.
        q6 = (self.rm * self.rm / d2) ** 3
        return (self.epsilon / self.tau) * (q6 * (q6 - 2.0))

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
        The ball's radius is ``1.2 rm N^(1/3)`` times the protocol's ``init_scale``: LJ-55's
        loose start (radius 4.6 rm, the equilibrium cluster's ~2 rm) took ~40,000 steps to collapse.
        """
        radius = 1.2 * self.data_protocol.init_scale * self.rm * (self.n_particles ** (1.0 / 3.0))
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
        single = self.pair_multiplicity == 1.0
        pair_sum = "Σ_(i<j)" if single else "Σ_(i≠j)"
        lj13_itself = self.n_particles == 13 and self.n_dims == 3 and self.pair_multiplicity in (1.0, 2.0)
        if single:
            convention = (
                "  CONVENTION: the pair sum runs over UNORDERED pairs (each pair counted once), as in bgflow's\n"
                "  LennardJonesPotential and the SE(3) augmented coupling flow's energy-only training (Midgley\n"
                "  et al. 2023). Its pair part is exactly half the ordered-pair one of lj13 (Köhler et al. 2020;\n"
                "  the E-NF / EFM / DEM data sets), the oscillator is the same: exp(-u) here is the ordered-pair\n"
                "  energy with τ = 2 in the pair part and the oscillator still at τ = 1 (not lj13 at\n"
                "  temperature 2, which would also halve the oscillator). A hotter, looser target: NLLs,\n"
                "  energies and ESS on it cannot be compared with lj13's.\n"
            )
            if lj13_itself:
                convention += ("  Global minimum -38.7722 (centred icosahedron; its pair part alone -44.3268,\n"
                               "  the textbook LJ13 value in ε; lj13's is -83.09).\n")
        else:
            convention = (
                "  CONVENTION: the pair sum runs over ORDERED pairs (each pair counted twice), as in every\n"
                "  LJ-13 number of the paper (global minimum -83.09, Table 1's energy bins) and in the public\n"
                "  LJ-13 data sets of later work. Single-count libraries give pair energies half as large.\n"
            )
            if self.n_particles == 55 and self.n_dims == 3 and self.pair_multiplicity == 2.0:
                convention += (
                    "  lj13's energy with 55 particles, the size the flow-matching and diffusion-sampler papers\n"
                    "  (EFM, Klein et al. 2023; iDEM / DEM) report on; their LJ-13 files follow this ordered-pair\n"
                    "  count, their LJ-55 files are not in ../shared/reference_data and were not checked.\n"
                    "  Global minimum -491.6413: the two-shell Mackay icosahedron, whose pair part alone is\n"
                    "  2 x -279.248470 (Cambridge Cluster Database).\n"
                )
            if lj13_itself:
                convention += (
                    "  Users: Köhler et al. 2020 and the E-NF / EFM / DEM LJ-13 data sets (their configurational\n"
                    "  temperature is 1 with this energy, 0.5 with the single count: ../shared/reference_data/\n"
                    "  README.md). bgflow and the SE(3) coupling flow's energy-only training use the single count\n"
                    "  (`lj13-single`): its pair part is half this one, the oscillator the same, i.e. this energy\n"
                    "  with τ = 2 in the pair part only; NLLs and energies of the two are not comparable.\n"
                )
        return (
            f"{self.name}: {self.n_particles} Lennard-Jones particles in {self.n_dims}-D with a harmonic "
            "CoM oscillator (paper §6, C.6).\n"
            f"  u(x) = (ε/τ) {pair_sum} [(rm/d_ij)^12 - 2 (rm/d_ij)^6] + ½ Σ_i |x_i - x̄|^2, "
            f"ε = {self.epsilon:g}, rm = {self.rm:g}, τ = {self.tau:g}.\n"
            + convention
            + "  Energies in kT; configurations are CoM-free; symmetries: "
            + ", ".join(self.symmetries)
            + ".\n"
            f"  CoM-free dimension (N-1)D = {self.n_dof}; Gaussian NLL constant 0.5 (N-1) D log 2π = "
            f"{self.prior_log_normaliser():.3f}.\n"
            + self.describe_scales()
        )


def make_lj13() -> LennardJones:
    """LJ-13: 13 particles in 3-D, global minimum -83.09 (icosahedron, paper Fig. 7)."""
    return LennardJones(name="lj13", n_particles=13, n_dims=3)


def make_lj13_single() -> LennardJones:
    """LJ-13 in the single-count convention of bgflow and the SE(3) augmented coupling flow
    (Midgley et al. 2023): pair sum over unordered pairs, the same CoM oscillator; global minimum
    -38.7722 (-44.3268 without the oscillator). Its own data protocol, :data:`LJ_SINGLE_PROTOCOL`."""
    return LennardJones(name="lj13-single", n_particles=13, n_dims=3, pair_multiplicity=1.0,
                        data_protocol=LJ_SINGLE_PROTOCOL)


def mackay_icosahedron(n_shells: int, spacing: float = 1.0) -> torch.Tensor:
    """Mackay icosahedron of ``n_shells`` shells around a central particle, ``[1, N, 3]``
    float64 with ``N = 1 + Σ_k (10 k² + 2)``: 13 (one shell), 55 (two), 147 (three).

    Shell ``k`` holds the points ``spacing · (a v_i + b v_j + c v_l)`` with ``a + b + c = k`` on
    every face ``(v_i, v_j, v_l)`` of the unit icosahedron (vertices, edge points and face points,
    each once), so its vertices sit at radius ``k · spacing``. Relaxed, it is the
    global minimum of LJ-13 and LJ-55 (Wales & Doye 1997, Cambridge Cluster Database: -44.326801
    and -279.248470 ε for the single-count pair energy alone).

    Example:
        >>> mackay_icosahedron(2).shape
        torch.Size([1, 55, 3])
    """
    if isinstance(n_shells, bool) or not isinstance(n_shells, int) or n_shells < 1:
        raise ConfigError(f"a Mackay icosahedron needs an integer number of shells >= 1, got {n_shells!r}")
    phi = (1.0 + math.sqrt(5.0)) / 2.0
    corners = []
    for a in (-1.0, 1.0):
        for b in (-phi, phi):
            corners += [(0.0, a, b), (a, b, 0.0), (b, 0.0, a)]
    v = torch.tensor(corners, dtype=torch.float64)
    v = v / v.norm(dim=-1, keepdim=True)
    edge = float((v[0] - v[1:]).norm(dim=-1).min())
    near = (torch.cdist(v, v) - edge).abs() < 1e-9
    faces = [(i, j, k) for i in range(12) for j in range(i + 1, 12) for k in range(j + 1, 12)
             if near[i, j] and near[j, k] and near[i, k]]
    points = [torch.zeros(3, dtype=torch.float64)]
    for shell in range(1, n_shells + 1):
        seen: set[tuple[int, ...]] = set()
        for i, j, k in faces:
            for a in range(shell + 1):
                for b in range(shell + 1 - a):
                    c = shell - a - b
                    # A point is identified by its barycentric weights on the 12 vertices.
                    weights = [0] * 12
                    weights[i], weights[j], weights[k] = a, b, c
                    key = tuple(weights)
                    if key not in seen:
                        seen.add(key)
                        points.append(spacing * (a * v[i] + b * v[j] + c * v[k]))
    return torch.stack(points).unsqueeze(0)


def make_lj55() -> LennardJones:
    """LJ-55: 55 particles in 3-D, lj13's convention (ordered pairs, CoM oscillator) and its
    own measured data protocol, :data:`LJ55_PROTOCOL`. Its global minimum is the two-shell Mackay
    icosahedron (:func:`mackay_icosahedron`)."""
    return LennardJones(name="lj55", n_particles=55, n_dims=3, data_protocol=LJ55_PROTOCOL)


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
