"""Physics of the benchmark systems against independent ground truth (SPEC §1-2, paper §6, C.6).

Every expected number here is computed independently of the code under test: written out by
hand from the energy formula, or from a pure-Python re-implementation with ``math`` that shares
nothing with :mod:`eqbench.systems`, or from autograd. All in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import centred_icosahedron

from eqbench.api import get_system
from eqbench.errors import ConfigError
from eqbench.geometry import (
    apply_permutation,
    random_permutations,
    random_reflections,
    random_rotations,
    remove_com,
)
from eqbench.minima import is_minimum, minimize
from eqbench.systems.lennard_jones import LennardJones

SYSTEMS = ("dw2", "dw4", "lj13")
F64 = torch.float64


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows], dtype=F64)


def _typical(name: str, n: int, seed: int) -> torch.Tensor:
    """Typical configurations: Gaussian clouds for DW, non-overlapping clusters for LJ."""
    system = get_system(name)
    gen = torch.Generator().manual_seed(seed)
    if name == "lj13":
        return system.initial_configurations(n, gen)
    return remove_com(
        2.0 * torch.randn(n, system.n_particles, system.n_dims, generator=gen, dtype=F64)
    )


# --------------------------------------------------------------------------- hand-computed energies
def _dw_pair(d: float) -> float:
    """Double-well pair term written out from SPEC §2: -4 (d-4)² + 0.9 (d-4)⁴ (a = 0, τ = 1)."""
    s = d - 4.0
    return -4.0 * s**2 + 0.9 * s**4


@pytest.mark.parametrize(
    "d, expected",
    [
        (2.0, -1.6),  # s = -2: -16 + 14.4
        (3.0, -3.1),  # s = -1: -4 + 0.9
        (4.0, 0.0),  # s = 0: the barrier top
        (5.0, -3.1),  # s = 1
        (6.0, -1.6),  # s = 2
        (4.0 - math.sqrt(4.0 / 1.8), -16.0 / 3.6),  # the well bottom: -b²/(4c) = -4.444...
    ],
)
def test_dw2_energy_by_hand(d: float, expected: float) -> None:
    dw2 = get_system("dw2")
    x = _t([[0.0, 0.0], [d, 0.0]])
    assert dw2.energy(x).item() == pytest.approx(expected, abs=1e-12)
    # Rotated and shifted copy: only the distance matters.
    y = _t([[1.0, 2.0], [1.0 + d / math.sqrt(2.0), 2.0 + d / math.sqrt(2.0)]])
    assert dw2.energy(y).item() == pytest.approx(expected, abs=1e-12)


def test_dw4_rectangle_by_hand() -> None:
    """A 3 x 4 rectangle: sides 3, 3, 4, 4 and diagonals 5, 5 -> 4 (-3.1) + 2 (0) = -12.4."""
    dw4 = get_system("dw4")
    x = _t([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    assert dw4.energy(x).item() == pytest.approx(-12.4, abs=1e-12)


@pytest.mark.parametrize("side", [2.0, 3.0, 4.5])
def test_dw4_square(side: float) -> None:
    """A square of side s: four sides and two diagonals of length s√2, each unordered pair once."""
    dw4 = get_system("dw4")
    x = _t([[0.0, 0.0], [side, 0.0], [side, side], [0.0, side]])
    expected = 4 * _dw_pair(side) + 2 * _dw_pair(side * math.sqrt(2.0))
    assert dw4.energy(x).item() == pytest.approx(expected, abs=1e-12)


def test_dw4_collinear_by_hand() -> None:
    """Four particles on a line, spacing 2: distances 2, 2, 2, 4, 4, 6 -> 3 (-1.6) + 0 + (-1.6)."""
    dw4 = get_system("dw4")
    x = _t([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [6.0, 0.0]])
    assert dw4.energy(x).item() == pytest.approx(-6.4, abs=1e-12)


def _lj_reference(pos: list[list[float]]) -> tuple[float, float, float]:
    """Pure-Python LJ energy (SPEC §2): ordered-pair LJ sum, single-count sum, oscillator."""
    n = len(pos)
    ordered = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                d = math.dist(pos[i], pos[j])
                ordered += (1.0 / d) ** 12 - 2.0 * (1.0 / d) ** 6
    single = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            d = math.dist(pos[i], pos[j])
            single += (1.0 / d) ** 12 - 2.0 * (1.0 / d) ** 6
    dims = len(pos[0])
    centroid = [sum(p[a] for p in pos) / n for a in range(dims)]
    oscillator = 0.5 * sum((p[a] - centroid[a]) ** 2 for p in pos for a in range(dims))
    return ordered, single, oscillator


def test_lj_dimer_by_hand() -> None:
    """A two-particle LJ system with the lj13 parameters (ordered pairs + oscillator).

    d = 1 (= rm): pair term 1 - 2 = -1, counted twice = -2; particles at ±0.5 from the centroid,
    oscillator ½ (0.25 + 0.25) = 0.25; total -1.75.
    d = 2: pair term 2^-12 - 2·2^-6 = 0.000244140625 - 0.03125 = -0.031005859375, twice
    -0.06201171875; oscillator ½ (1 + 1) = 1; total 0.93798828125.
    """
    dimer = LennardJones(name="lj2", n_particles=2, n_dims=3)
    assert dimer.energy(_t([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])).item() == pytest.approx(
        -1.75, abs=1e-12
    )
    assert dimer.energy(_t([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])).item() == pytest.approx(
        0.93798828125, abs=1e-12
    )


@pytest.mark.parametrize("name", (*SYSTEMS, "lj55"))
def test_pair_energy_of_squared_distances_is_the_pair_potential(name: str) -> None:
    """The energy's fast path (f at d², no square root) is the pair potential's f at d."""
    system = get_system(name)
    d = torch.linspace(0.6, 4.0, 97, dtype=torch.float64)
    expected = system.pair_potential(d)[0]
    assert torch.allclose(system.pair_energy_of_squared(d * d), expected, rtol=1e-12, atol=1e-12)


def test_lj_pair_energy_of_squared_keeps_its_parameters() -> None:
    """rm, ε and τ enter the squared-distance path as they enter pair_potential (by hand:
    rm = 2, ε = 3, τ = 1.5 at d = 2: 2 (1 - 2) = -2; at d = 4: 2 (2^-12 - 2·2^-6))."""
    lj = LennardJones(name="lj2", n_particles=2, n_dims=3, rm=2.0, epsilon=3.0, tau=1.5)
    d2 = torch.tensor([4.0, 16.0], dtype=torch.float64)
    expected = torch.tensor([-2.0, 2.0 * (2.0**-12 - 2.0 * 2.0**-6)], dtype=torch.float64)
    assert torch.allclose(lj.pair_energy_of_squared(d2), expected, rtol=1e-14)


def test_lj13_energy_matches_pure_python_and_counts_ordered_pairs() -> None:
    lj = get_system("lj13")
    x = lj.initial_configurations(4, torch.Generator().manual_seed(3))
    x = x + torch.tensor([0.3, -1.0, 2.0], dtype=F64)  # not CoM-free: the oscillator uses x̄
    energies = lj.energy(x)
    for b in range(x.shape[0]):
        ordered, single, oscillator = _lj_reference(x[b].tolist())
        assert ordered == pytest.approx(2.0 * single, rel=1e-13)
        assert energies[b].item() == pytest.approx(ordered + oscillator, rel=1e-12, abs=1e-12)
        # The pair part is twice the single-count sum (SPEC §2); it is not the single count.
        pair_part = energies[b].item() - oscillator
        assert pair_part == pytest.approx(2.0 * single, rel=1e-12, abs=1e-12)
        assert abs(pair_part - single) > 1.0


# --------------------------------------------------------------------------- symmetries
def _rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bij,bnj->bni", q, x)


@pytest.mark.parametrize("name", SYSTEMS)
def test_energy_invariances(name: str) -> None:
    """u is invariant under rotations, reflections, permutations and translations (paper §5, S1-S3)."""
    system = get_system(name)
    gen = torch.Generator().manual_seed(11)
    x = _typical(name, 64, seed=5)
    u = system.energy(x)
    n, dims = x.shape[0], system.n_dims
    rot = random_rotations(n, dims, generator=gen)
    ref = random_reflections(n, dims, generator=gen)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(n, dtype=F64))
    assert torch.allclose(torch.linalg.det(ref), -torch.ones(n, dtype=F64))
    perm = random_permutations(n, system.n_particles, generator=gen)
    shift = 10.0 * torch.randn(n, 1, dims, generator=gen, dtype=F64)
    transformed = {
        "rotation": _rotate(x, rot),
        "reflection": _rotate(x, ref),
        "permutation": apply_permutation(x, perm),
        "translation": x + shift,
        "all": apply_permutation(_rotate(x, ref), perm) + shift,
    }
    for what, y in transformed.items():
        assert not torch.allclose(y, x), what
        torch.testing.assert_close(
            system.energy(y), u, rtol=1e-10, atol=1e-10, msg=f"{name}: {what}"
        )


# --------------------------------------------------------------------------- derivatives
@pytest.mark.parametrize("name", SYSTEMS)
def test_force_is_minus_autograd_gradient(name: str) -> None:
    system = get_system(name)
    x = _typical(name, 32, seed=7).requires_grad_(True)
    (grad,) = torch.autograd.grad(system.energy(x).sum(), x)
    force = system.force(x.detach())
    torch.testing.assert_close(force, -grad, rtol=1e-9, atol=1e-9 * float(grad.abs().max()))
    torch.testing.assert_close(
        system.gradient(x.detach()), grad, rtol=1e-9, atol=1e-9 * float(grad.abs().max())
    )


@pytest.mark.parametrize("name", SYSTEMS)
def test_laplacian_is_trace_of_autograd_hessian(name: str) -> None:
    system = get_system(name)
    x = _typical(name, 6, seed=9)
    lap = system.laplacian(x)
    for b in range(x.shape[0]):
        flat = x[b].reshape(-1)
        h = torch.autograd.functional.hessian(
            lambda v: system.energy(v.reshape(system.event_shape)), flat
        )
        assert lap[b].item() == pytest.approx(torch.trace(h).item(), rel=1e-8, abs=1e-8)


# --------------------------------------------------------------------------- configurational temperature
def _exact_dw2_samples(n: int, temperature: float, seed: int) -> torch.Tensor:
    """Exact samples of exp(-u/T) for DW-2, CoM-free.

    With the CoM removed, DW-2 is the relative vector r = x1 - x2 in 2-D with density
    ∝ exp(-f(|r|)/T): the angle is uniform and |r| has density ∝ d exp(-f(d)/T). Rejection
    sampling of d from a uniform proposal on [0, 10] with envelope 10 exp(-f_min/T) is exact
    (f(10)/T > 500: the tail beyond is negligible); then x1 = r/2, x2 = -r/2.
    """
    gen = torch.Generator().manual_seed(seed)
    f_min = -16.0 / 3.6
    out: list[torch.Tensor] = []
    have = 0
    while have < n:
        d = 10.0 * torch.rand(400_000, generator=gen, dtype=F64)
        s = d - 4.0
        f = -4.0 * s**2 + 0.9 * s**4
        accept = torch.rand(400_000, generator=gen, dtype=F64) < (d / 10.0) * torch.exp(
            -(f - f_min) / temperature
        )
        out.append(d[accept])
        have += int(accept.sum())
    d = torch.cat(out)[:n]
    angle = 2.0 * math.pi * torch.rand(n, generator=gen, dtype=F64)
    r = torch.stack([d * torch.cos(angle), d * torch.sin(angle)], dim=-1)
    return torch.stack([0.5 * r, -0.5 * r], dim=1)


def test_configurational_temperature_of_exact_dw2_samples() -> None:
    """⟨|∇u|²⟩ / ⟨Δu⟩ is T for exact samples of exp(-u/T) (SPEC §2): 1 at T = 1, 2 at T = 2."""
    dw2 = get_system("dw2")
    at_1 = _exact_dw2_samples(100_000, 1.0, seed=0)
    at_2 = _exact_dw2_samples(100_000, 2.0, seed=1)
    assert dw2.configurational_temperature(at_1) == pytest.approx(1.0, abs=0.02)
    assert dw2.configurational_temperature(at_2) == pytest.approx(
        2.0, abs=0.1
    )  # noisier: std ~0.02


# --------------------------------------------------------------------------- minima (SPEC §2)
_icosahedron = centred_icosahedron


def test_lj13_icosahedral_global_minimum() -> None:
    """The centred icosahedron relaxes to the LJ-13 global minimum, -83.09 (SPEC §2, paper Fig. 7)."""
    lj = get_system("lj13")
    start = _icosahedron(1.0)
    assert len({round(d, 9) for d in torch.pdist(start[0]).tolist()}) > 1
    res = minimize(lj, start, gtol=1e-9)
    assert bool(res.converged[0])
    energy = res.energy.item()
    assert energy == pytest.approx(-83.09, abs=0.01)
    x = res.x[0]
    assert is_minimum(lj, x)
    # Icosahedral symmetry is kept: all 12 outer particles equidistant from the centre one.
    radii = (x[1:] - x[0]).norm(dim=-1)
    assert float(radii.max() - radii.min()) < 1e-7
    # Cross-check with the literature value of the single-count LJ-13 minimum, -44.326801
    # (Wales & Doye 1997, no oscillator): the oscillator compresses the cluster slightly, so the
    # single-count pair part lies just above it, and the ordered-pair total is about twice it.
    ordered, single, oscillator = _lj_reference(x.tolist())
    assert energy == pytest.approx(ordered + oscillator, abs=1e-10)
    assert -44.326801 < single < -44.30


DW4_MINIMA = (-25.79, -25.31, -24.35, -23.47, -21.07)


def test_dw4_has_exactly_the_five_minima_of_spec() -> None:
    """Minimising 200 Gaussian starts finds exactly the five DW-4 minima of SPEC §2 (paper §7.5).

    Saddles are removed with the projected Hessian; energies of distinct minima differ by more
    than 0.4, so grouping converged minima whose energies differ by < 0.05 identifies them.
    """
    dw4 = get_system("dw4")
    gen = torch.Generator().manual_seed(2024)
    starts = 2.5 * torch.randn(200, 4, 2, generator=gen, dtype=F64)
    res = minimize(dw4, starts)
    assert res.x.shape == starts.shape
    assert res.n_converged >= 190, f"{res.n_unconverged} of 200 minimisations did not converge"
    x, energy = res.x[res.converged], res.energy[res.converged]
    minimum = is_minimum(dw4, x)
    energies = sorted(energy[minimum].tolist())
    groups: list[list[float]] = [[energies[0]]]
    for e in energies[1:]:
        if e - groups[-1][-1] < 0.05:
            groups[-1].append(e)
        else:
            groups.append([e])
    found = [sum(g) / len(g) for g in groups]
    assert len(found) == len(DW4_MINIMA), f"minima found at energies {found}"
    for got, want in zip(found, DW4_MINIMA):
        assert got == pytest.approx(want, abs=0.01)
    for g in groups:  # each group is one minimum: its energies agree to rounding
        assert max(g) - min(g) < 1e-8


# --------------------------------------------------------------------------- documentation, shapes
def test_lj13_describe_states_ordered_pair_convention() -> None:
    text = get_system("lj13").describe().lower()
    assert "ordered" in text
    assert "counted twice" in text
    assert "-83.09" in text


@pytest.mark.parametrize("name", SYSTEMS)
def test_describe_and_shapes(name: str) -> None:
    system = get_system(name)
    assert name in system.describe()
    expected = {"dw2": (2, 2), "dw4": (4, 2), "lj13": (13, 3)}[name]
    assert system.event_shape == expected
    x = _typical(name, 3, seed=1)
    assert x.shape == (3, *expected)
    assert system.energy(x).shape == (3,)
    assert system.gradient(x).shape == x.shape
    assert system.laplacian(x).shape == (3,)
    assert system.energy(x[0]).shape == ()
    assert system.n_dof == (expected[0] - 1) * expected[1]
    n, dims = expected
    bad = torch.zeros(3, n + 1, dims, dtype=F64)
    for fn in (system.energy, system.gradient, system.force, system.laplacian):
        with pytest.raises(ValueError, match=rf"\[\.\.\., {n}, {dims}\]"):
            fn(bad)
    with pytest.raises(ValueError, match=rf"\[\.\.\., {n}, {dims}\]"):
        system.energy(torch.zeros(3, n, dims + 1, dtype=F64))
    with pytest.raises(ValueError, match=rf"\[\.\.\., {n}, {dims}\]"):
        system.energy(torch.zeros(n * dims, dtype=F64))


def test_prior_normaliser_constants() -> None:
    """0.5 (N-1) D log 2π: 5.514 for DW-4, 33.082 for LJ-13 (SPEC §1)."""
    assert get_system("dw4").prior_log_normaliser() == pytest.approx(5.514, abs=5e-4)
    assert get_system("lj13").prior_log_normaliser() == pytest.approx(33.082, abs=5e-4)


# --------------------------------------------------------------------------- what a system is
@pytest.mark.parametrize("name, kind, length, lo, hi", [
    ("dw2", "double-well", 4.0, 0.0, 8.0),  # d0; [0, 2 d0], the paper's kernel range (C.1)
    ("dw4", "double-well", 4.0, 0.0, 8.0),
    # rm; σ = 2^(-1/6) rm to the diameter of 13 close-packed (fcc fraction π/(3√2)) spheres of diameter rm
    ("lj13", "lennard-jones", 1.0, 2 ** (-1 / 6), (13 / (math.pi / (3 * math.sqrt(2)))) ** (1 / 3)),
    ("harmonic", "harmonic", math.sqrt(6.0), 0.0, 2 * math.sqrt(6.0)),  # RMS pair distance sqrt(2D), D = 3
])
def test_each_system_declares_its_kind_and_lengths(name, kind, length, lo, hi) -> None:
    system = get_system(name)
    assert system.kind == kind
    assert system.length_scale == pytest.approx(length, rel=1e-12)
    assert system.pair_distance_range == pytest.approx((lo, hi), rel=1e-12)
    assert kind in system.describe()


def test_double_well_lengths_hold_both_preferred_distances() -> None:
    """d0 is the barrier top between the pair potential's two minima d0 ± sqrt(-b/2c), both
    inside the typical range."""
    dw = get_system("dw4")
    d = torch.linspace(0.01, 7.99, 80_001, dtype=F64)
    f, df, d2f = dw.pair_potential(d)
    is_min = (f[1:-1] < f[:-2]) & (f[1:-1] < f[2:])
    minima = d[1:-1][is_min]
    assert len(minima) == 2
    assert minima.tolist() == pytest.approx([4 - math.sqrt(4 / 1.8), 4 + math.sqrt(4 / 1.8)], abs=1e-3)
    lo, hi = dw.pair_distance_range
    assert lo < float(minima[0]) and float(minima[1]) < hi
    _, df0, d2f0 = dw.pair_potential(torch.tensor([dw.length_scale], dtype=F64))
    assert abs(float(df0)) < 1e-12 and float(d2f0) < 0  # a maximum: the barrier


def test_lennard_jones_lengths_are_the_pair_minimum_and_the_zero_crossing() -> None:
    lj = get_system("lj13")
    lo, _ = lj.pair_distance_range
    f, df, d2f = lj.pair_potential(torch.tensor([lj.length_scale, lo], dtype=F64))
    assert abs(float(df[0])) < 1e-12 and float(d2f[0]) > 0 and float(f[0]) == pytest.approx(-1.0)
    assert abs(float(f[1])) < 1e-12  # f(σ) = 0


def test_harmonic_lengths_describe_its_pair_distances() -> None:
    """x_i - x_j ~ N(0, 2 I_D) for the CoM-free standard normal: RMS pair distance sqrt(2D), and
    [0, 2 sqrt(2D)] holds 99 % of the pairs in 3-D (χ²_3 below 12: 0.9926)."""
    system = get_system("harmonic")
    gen = torch.Generator().manual_seed(0)
    x = remove_com(torch.randn(20_000, system.n_particles, system.n_dims, generator=gen, dtype=F64))
    d = (x.unsqueeze(1) - x.unsqueeze(2)).norm(dim=-1)[:, *torch.triu_indices(4, 4, 1)]
    assert float(d.pow(2).mean().sqrt()) == pytest.approx(system.length_scale, rel=0.01)
    inside = float((d < system.pair_distance_range[1]).double().mean())
    assert inside == pytest.approx(0.9926, abs=0.003)


def test_with_particles_is_the_same_potential_named_for_what_it_is() -> None:
    from eqbench.systems.double_well import make_double_well
    from eqbench.systems.lennard_jones import make_lennard_jones

    dw4, lj13, harmonic = get_system("dw4"), get_system("lj13"), get_system("harmonic")
    assert dw4.with_particles(8) == make_double_well(8) and dw4.with_particles(8).name == "dw8"
    assert lj13.with_particles(55) == make_lennard_jones(55) and lj13.with_particles(55).name == "lj55"
    assert dw4.with_particles(4) is dw4
    six = harmonic.with_particles(6)
    assert (six.name, six.kind, six.n_particles, six.n_dims) == ("harmonic6", "harmonic", 6, 3)
    x = remove_com(torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(1), dtype=F64))
    assert torch.allclose(six.energy(x), 0.5 * x.pow(2).sum((-2, -1)), rtol=1e-12)  # ½|x|² at any N
    for bad in (1, 2.5, True):
        with pytest.raises(ConfigError, match="integer >= 2") as info:
            dw4.with_particles(bad)
        assert "\n" not in str(info.value)


def test_a_system_class_must_declare_a_known_kind() -> None:
    from dataclasses import dataclass
    from typing import ClassVar

    from eqbench.systems.base import SYSTEM_KINDS, ParticleSystem

    with pytest.raises(ConfigError, match="declares kind 'banana'; valid: double-well, lennard-jones, harmonic, other"):
        @dataclass(frozen=True)
        class Banana(ParticleSystem):
            kind: ClassVar[str] = "banana"

    @dataclass(frozen=True)
    class Plugin(ParticleSystem):  # says nothing about its kind: eqbench knows only its lengths
        def pair_potential(self, d):
            return d, torch.ones_like(d), torch.zeros_like(d)

        @property
        def length_scale(self) -> float:
            return 2.0

        def describe(self) -> str:
            return "plugin"

    assert Plugin.kind == "other" and "other" in SYSTEM_KINDS
