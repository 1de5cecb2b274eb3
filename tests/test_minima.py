"""The minimiser and the minimum check of the metastable-states task (paper §7.5, SPEC §5).

Expected values are hand-computed from the double-well formula of SPEC §2,
u = -4 (d-4)² + 0.9 (d-4)⁴ per pair: its wells lie at (d-4)² = 4/1.8 with depth -16/3.6 and
curvature f'' = -8 + 10.8 (d-4)² = 16; the barrier top d = 4 has f'' = -8.
"""

from __future__ import annotations

import math

import pytest
import torch

from eqbench.api import get_system
from eqbench.geometry import (
    apply_permutation,
    random_orthogonal,
    random_permutations,
    random_reflections,
    remove_com,
)
from eqbench.minima import (
    MinimizationResult,
    census_of_minima,
    distinct_minima,
    hessian,
    hessians,
    is_minimum,
    minimize,
    novel_minima,
    projected_hessian_eigenvalues,
    sorted_distance_signature,
    zero_mode_basis,
)

F64 = torch.float64
WELL = math.sqrt(4.0 / 1.8)  # |d - 4| at the bottom of a double-well pair term
WELL_ENERGY = -16.0 / 3.6  # -b² / (4c)


def _dimer(d: float) -> torch.Tensor:
    return torch.tensor([[0.0, 0.0], [d, 0.0]], dtype=F64)


def test_dw2_relaxes_to_both_wells() -> None:
    """Starts inside each well end at its bottom: d = 4 ∓ √(4/1.8), u = -16/3.6."""
    dw2 = get_system("dw2")
    starts = torch.stack([_dimer(3.0), _dimer(1.5), _dimer(5.0), _dimer(7.0)])
    starts = starts + torch.tensor([5.0, -2.0], dtype=F64)  # not CoM-free: the result must be
    res = minimize(dw2, starts, gtol=1e-8)
    assert isinstance(res, MinimizationResult)
    assert res.x.shape == starts.shape
    assert bool(res.converged.all())
    assert bool((res.grad_norm < 1e-8).all())
    assert bool((res.steps > 0).all())
    d = (res.x[:, 0] - res.x[:, 1]).norm(dim=-1)
    expected = torch.tensor([4.0 - WELL, 4.0 - WELL, 4.0 + WELL, 4.0 + WELL], dtype=F64)
    torch.testing.assert_close(d, expected, rtol=0, atol=1e-8)
    torch.testing.assert_close(
        res.energy, torch.full((4,), WELL_ENERGY, dtype=F64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(res.x.mean(dim=1), torch.zeros(4, 2, dtype=F64), rtol=0, atol=1e-12)
    for x in res.x:
        assert is_minimum(dw2, x)
        # The one internal mode is the stretch, with eigenvalue 2 f''(d*) = 2 · 16.
        torch.testing.assert_close(
            projected_hessian_eigenvalues(dw2, x), torch.tensor([32.0], dtype=F64)
        )


def test_dw2_barrier_top_is_a_saddle() -> None:
    """d = 4 exactly: gradient zero, stretch eigenvalue 2 f''(4) = 2 · (-8) = -16."""
    dw2 = get_system("dw2")
    x = _dimer(4.0)
    assert float(dw2.gradient(x).abs().max()) == 0.0
    res = minimize(dw2, x.unsqueeze(0))
    assert bool(res.converged[0]) and int(res.steps[0]) == 0  # already stationary: nothing to do
    assert not is_minimum(dw2, res.x[0])
    torch.testing.assert_close(
        projected_hessian_eigenvalues(dw2, x), torch.tensor([-16.0], dtype=F64)
    )


def test_dw4_collinear_stationary_point_is_a_saddle() -> None:
    """Four particles equally spaced by 2 on a line (u = 3 (-1.6) + 2 · 0 + (-1.6) = -6.4).

    By hand it is stationary: f'(2) = -12.8, f'(4) = 0, f'(6) = +12.8, and on each particle the
    forces of its neighbours at 2 and 6 (or at 2 on both sides) cancel. Bending the line lowers
    the energy, so the check must reject it, and an independent probe along the negative
    eigenvector must find lower energy.
    """
    dw4 = get_system("dw4")
    x = torch.tensor([[-3.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [3.0, 0.0]], dtype=F64)
    assert dw4.energy(x).item() == pytest.approx(-6.4, abs=1e-12)
    assert float(dw4.gradient(x).abs().max()) < 1e-12
    evals = projected_hessian_eigenvalues(dw4, x)
    assert evals.shape == (8 - 3,)  # 2 translations + 1 rotation removed
    assert float(evals[0]) < -1.0
    assert not is_minimum(dw4, x)

    # Independent probe: the Hessian's most negative direction outside the zero modes.
    h = hessian(dw4, x)
    q = zero_mode_basis(dw4, x)
    p = torch.eye(8, dtype=F64) - q @ q.T
    w, v = torch.linalg.eigh(p @ h @ p)
    direction = v[:, 0].reshape(4, 2)
    assert float(w[0]) == pytest.approx(float(evals[0]), rel=1e-10)
    for eps in (1e-3, 1e-2):
        assert dw4.energy(x + eps * direction).item() < -6.4
    # Pushed off the saddle, the minimiser finds a true minimum well below it.
    res = minimize(dw4, (x + 1e-2 * direction).unsqueeze(0))
    assert bool(res.converged[0]) and res.energy.item() < -20.0
    assert is_minimum(dw4, res.x[0])


def test_zero_modes_are_zero_modes() -> None:
    """At minima the Hessian annihilates the translation and rotation modes (LJ's CoM oscillator
    depends on x - x̄ only, so its zero modes are the same)."""
    for name, start, k in (
        (
            "dw4",
            2.5 * torch.randn(1, 4, 2, generator=torch.Generator().manual_seed(0), dtype=F64),
            3,
        ),
        ("lj13", None, 6),
    ):
        system = get_system(name)
        if start is None:
            start = system.initial_configurations(1, torch.Generator().manual_seed(0))
        res = minimize(system, start, gtol=1e-9)
        x = res.x[0]
        q = zero_mode_basis(system, x)
        assert q.shape == (system.dim, k)
        torch.testing.assert_close(q.T @ q, torch.eye(k, dtype=F64), rtol=0, atol=1e-12)
        h = hessian(system, x)
        assert float((h @ q).abs().max()) < 1e-6 * float(h.abs().max())
        assert projected_hessian_eigenvalues(system, x).shape == (system.dim - k,)


def test_zero_mode_basis_of_degenerate_geometry() -> None:
    """A collinear LJ-13 configuration has only 2 rotation modes (none about its axis): 3 + 2."""
    lj = get_system("lj13")
    x = torch.zeros(13, 3, dtype=F64)
    x[:, 2] = torch.arange(13, dtype=F64)
    assert zero_mode_basis(lj, x).shape == (39, 5)
    assert projected_hessian_eigenvalues(lj, x).shape == (39 - 5,)


def test_batched_hessians_and_minimum_check_match_single() -> None:
    lj = get_system("lj13")
    x = minimize(lj, lj.initial_configurations(4, torch.Generator().manual_seed(1))).x
    x = torch.cat(
        [x, lj.initial_configurations(2, torch.Generator().manual_seed(2))]
    )  # 2 non-stationary
    batch = hessians(lj, x)
    for b in range(x.shape[0]):
        torch.testing.assert_close(batch[b], hessian(lj, x[b]), rtol=1e-12, atol=1e-9)
    flags = is_minimum(lj, x)
    assert isinstance(flags, torch.Tensor) and flags.dtype == torch.bool and flags.shape == (6,)
    assert flags.tolist() == [is_minimum(lj, xb) for xb in x]
    assert bool(flags[:4].all())


def test_lj13_random_starts_converge_to_minima() -> None:
    lj = get_system("lj13")
    starts = lj.initial_configurations(24, torch.Generator().manual_seed(4))
    res = minimize(lj, starts)
    assert bool(res.converged.all()), res.grad_norm
    assert bool((res.energy <= lj.energy(starts)).all())
    assert bool((res.energy > -83.0897).all())  # nothing below the icosahedral global minimum
    assert bool(is_minimum(lj, res.x).all())
    torch.testing.assert_close(res.x.mean(dim=1), torch.zeros(24, 3, dtype=F64), rtol=0, atol=1e-12)


def test_unconverged_rows_are_flagged_not_dropped() -> None:
    """SPEC §5: minimisations that stop above the tolerance are returned and marked."""
    lj = get_system("lj13")
    starts = lj.initial_configurations(8, torch.Generator().manual_seed(5))
    res = minimize(lj, starts, max_steps=3)
    assert res.x.shape == starts.shape and res.energy.shape == (8,)
    assert not bool(res.converged.any())
    assert res.n_unconverged == 8 and res.n_converged == 0
    assert bool((res.grad_norm >= res.gtol).all())
    assert bool((res.steps <= 3).all())
    # No momentum: every accepted step lowers the energy.
    assert bool((res.energy < lj.energy(starts)).all())


def test_dw4_energy_is_monotone_over_steps() -> None:
    """Running longer never raises the energy of any configuration (a non-momentum method)."""
    dw4 = get_system("dw4")
    starts = 2.5 * torch.randn(64, 4, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    previous = dw4.energy(starts)
    for n_steps in (1, 2, 4, 8, 16, 200):
        energy = minimize(dw4, starts, max_steps=n_steps).energy
        assert bool(
            (energy <= previous + 1e-10 * previous.abs()).all()
        )  # rounding slack of the line search
        previous = energy


def test_minimize_validates_input() -> None:
    dw4 = get_system("dw4")
    with pytest.raises(ValueError, match=r"\[B, 4, 2\]"):
        minimize(dw4, torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4, 2\]"):
        minimize(dw4, torch.zeros(3, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4, 2\]"):
        is_minimum(dw4, torch.zeros(5, 2, dtype=F64))
    empty = minimize(dw4, torch.zeros(0, 4, 2, dtype=F64))
    assert empty.x.shape == (0, 4, 2) and empty.n_converged == 0


def test_sorted_distance_signature_is_invariant() -> None:
    gen = torch.Generator().manual_seed(8)
    x = remove_com(torch.randn(16, 13, 3, generator=gen, dtype=F64))
    q = random_reflections(16, 3, generator=gen)
    y = (
        apply_permutation(
            torch.einsum("bij,bnj->bni", q, x), random_permutations(16, 13, generator=gen)
        )
        + 3.0
    )
    sig = sorted_distance_signature(x)
    assert sig.shape == (16, 78)
    assert bool((sig[:, 1:] >= sig[:, :-1]).all())
    torch.testing.assert_close(sorted_distance_signature(y), sig, rtol=1e-12, atol=1e-12)


# -- distinct minima: clustering on hand-built configurations (paper §7.5, SPEC §5) -----------

# Two DW-4 minima built by hand and relaxed: a rhombus (u = -23.47) and a bent chain of
# short bonds (u = -25.31). A perfect square of side 2.5 relaxes, by symmetry, to a saddle.
_RHOMBUS = [[-2.4, 0.0], [0.0, 1.2], [2.4, 0.0], [0.0, -1.2]]
_CHAIN = [[0.0, 0.0], [2.5, 0.0], [5.0, 0.3], [7.5, 0.0]]
_SQUARE = [[0.0, 0.0], [2.5, 0.0], [2.5, 2.5], [0.0, 2.5]]


def _relaxed(system, coords) -> torch.Tensor:
    res = minimize(system, torch.tensor([coords], dtype=F64), gtol=1e-9)
    assert bool(res.converged[0]) and is_minimum(system, res.x[0])
    return res.x[0]


def _symmetry_copies(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` copies of ``x`` under random rotations/reflections, permutations and translations."""
    gen = torch.Generator().manual_seed(seed)
    n_particles, n_dims = x.shape
    q = random_orthogonal(n, n_dims, generator=gen)
    copies = torch.einsum("bij,nj->bni", q, x)
    copies = apply_permutation(copies, random_permutations(n, n_particles, generator=gen))
    return copies + 5.0 * torch.randn(n, 1, n_dims, generator=gen, dtype=F64)


def test_symmetry_copies_of_one_minimum_count_once_two_minima_twice() -> None:
    dw4 = get_system("dw4")
    a, b = _relaxed(dw4, _RHOMBUS), _relaxed(dw4, _CHAIN)
    assert abs(float(dw4.energy(a) - dw4.energy(b))) > 0.1  # two different minima
    copies_a = _symmetry_copies(a, 40, seed=1)
    one = census_of_minima(dw4, copies_a, eps=0.01)
    assert (one.n_input, one.n_minima, one.n_distinct) == (40, 40, 1)
    assert one.n_unconverged == one.n_saddles == one.n_nonfinite == 0

    mixed = torch.cat([copies_a, _symmetry_copies(b, 25, seed=2)])
    mixed = mixed[torch.randperm(65, generator=torch.Generator().manual_seed(3))]
    two = census_of_minima(dw4, mixed, eps=0.01)
    assert two.n_distinct == 2
    # Each component holds exactly the copies of one minimum.
    sizes = sorted(torch.bincount(two.labels).tolist())
    assert sizes == [25, 40]
    expected = sorted([float(dw4.energy(a)), float(dw4.energy(b))])
    torch.testing.assert_close(two.distinct_energies(), torch.tensor(expected, dtype=F64), rtol=0, atol=1e-9)
    assert two.count_in(-math.inf, math.inf) == 2
    assert two.counts([(-math.inf, expected[1] - 1e-6), (expected[1] - 1e-6, 0.0)]) == [1, 1]


def test_lj13_rotated_permuted_minimum_counts_once() -> None:
    lj = get_system("lj13")
    x = minimize(lj, lj.initial_configurations(1, torch.Generator().manual_seed(11))).x[0]
    census = census_of_minima(lj, _symmetry_copies(x, 30, seed=4), eps=1e-3)
    assert census.n_minima == 30 and census.n_distinct == 1


def test_saddles_are_dropped_and_counted() -> None:
    """The collinear DW-4 stationary point (see above) converges at once but is a saddle; the
    square relaxes along its symmetric (breathing) mode to another saddle."""
    dw4 = get_system("dw4")
    collinear = torch.tensor([[[-3.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [3.0, 0.0]]], dtype=F64)
    square = torch.tensor([_SQUARE], dtype=F64)
    minimum = _relaxed(dw4, _RHOMBUS).unsqueeze(0)
    census = census_of_minima(dw4, torch.cat([collinear, minimum, square, collinear]), eps=0.01)
    assert census.n_saddles == 3 and census.n_unconverged == 0
    assert census.n_minima == 1 and census.n_distinct == 1
    torch.testing.assert_close(census.distinct_energies(), dw4.energy(minimum), rtol=0, atol=1e-9)


def test_unconverged_and_nonfinite_are_dropped_and_counted() -> None:
    lj = get_system("lj13")
    starts = lj.initial_configurations(6, torch.Generator().manual_seed(5))
    bad = starts[:2].clone()
    bad[0, 0, 0] = float("nan")
    bad[1, 1] = bad[1, 0]  # two particles on top of each other: infinite LJ energy
    census = census_of_minima(lj, torch.cat([starts, bad]), eps=1e-3, max_steps=2)
    assert census.n_input == 8 and census.n_nonfinite == 2
    assert census.n_unconverged == 6  # two steps cannot reach |∇u| < 1e-6 from random starts
    assert census.n_minima == 0 and census.n_distinct == 0
    assert census.distinct_energies().numel() == 0
    full = census_of_minima(lj, starts, eps=1e-3)
    assert full.n_unconverged == 0 and full.n_minima == 6


def test_counts_at_half_and_double_eps() -> None:
    """The five DW-4 minima: the closest pair of signatures lies 0.551 apart (the -25.79 and
    -24.35 minima), every other pair more than 2.3 apart. Thresholds below 0.551 count five,
    up to 2.3 four; ε/2 and 2ε move the count exactly as the separations say."""
    dw4 = get_system("dw4")
    starts = 2.5 * torch.randn(400, 4, 2, generator=torch.Generator().manual_seed(12), dtype=F64)
    census = census_of_minima(dw4, starts, eps=0.4)
    assert census.n_distinct == 5
    torch.testing.assert_close(census.distinct_energies(),
                               torch.tensor([-25.7922, -25.3124, -24.3524, -23.4654, -21.0665], dtype=F64),
                               rtol=0, atol=1e-4)
    separation = census.closest_distinct_separation()
    assert 0.5 < separation < 0.6
    assert census.with_eps(0.2).n_distinct == 5  # ε/2
    doubled = census.with_eps(0.8)  # 2ε: the two closest minima merge
    assert doubled.n_distinct == 4 and doubled.eps == 0.8
    # The merged component keeps the lower energy as its representative.
    assert -24.35 not in [round(e, 2) for e in doubled.distinct_energies().tolist()]
    assert census.n_distinct == 5  # with_eps returns a new census


def test_single_linkage_is_transitive_and_order_independent() -> None:
    """A chain of signatures spaced 0.6 ε is one component though its ends lie 1.2 ε apart;
    the partition agrees with scipy's connected components for any row order."""
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial.distance import cdist

    eps = 0.1
    chain = torch.tensor([[0.0, 0.0], [0.06, 0.0], [0.12, 0.0], [0.5, 0.0]], dtype=F64)
    assert distinct_minima(chain, eps).tolist() == [0, 0, 0, 1]
    assert distinct_minima(chain.flip(0), eps).tolist() == [0, 1, 1, 1]

    gen = torch.Generator().manual_seed(7)
    centres = 3.0 * torch.randn(12, 5, generator=gen, dtype=F64)
    points = centres[torch.randint(12, (300,), generator=gen)] + 0.05 * torch.randn(300, 5, generator=gen, dtype=F64)
    n_ref, ref = connected_components(cdist(points.numpy(), points.numpy()) < 0.3, directed=False)
    for chunk_size in (7, 2048):  # leaders merged across chunks and within one
        for seed in range(3):
            perm = torch.randperm(300, generator=torch.Generator().manual_seed(seed))
            labels = distinct_minima(points[perm], 0.3, chunk_size=chunk_size)
            assert int(labels.max()) + 1 == n_ref
            # Same partition: two rows share a label here iff they share one in scipy's answer.
            same = labels[:, None] == labels[None, :]
            same_ref = torch.from_numpy(ref[perm.numpy()][:, None] == ref[perm.numpy()][None, :])
            assert bool((same == same_ref).all())
    assert distinct_minima(torch.zeros(0, 5, dtype=F64), 0.1).shape == (0,)
    with pytest.raises(ValueError, match="eps"):
        distinct_minima(points, 0.0)


def test_novel_minima_are_those_the_reference_never_reached() -> None:
    dw4 = get_system("dw4")
    a, b = _relaxed(dw4, _RHOMBUS), _relaxed(dw4, _CHAIN)
    reference = census_of_minima(dw4, _symmetry_copies(a, 5, seed=8), eps=0.01)
    found = census_of_minima(dw4, torch.cat([_symmetry_copies(a, 3, seed=9), _symmetry_copies(b, 4, seed=10)]),
                             eps=0.01)
    novel = novel_minima(found, reference)
    energies = found.distinct_energies()
    assert novel.tolist() == [bool(abs(float(e - dw4.energy(b))) < 1e-9) for e in energies]
    assert int(novel.sum()) == 1
    assert not bool(novel_minima(reference, reference).any())
