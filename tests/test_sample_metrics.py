"""Known-answer tests of eqbench.alignment and eqbench.sample_metrics (dist TV, coordinate W2, energy W1/W2).

Each expected value is computed by hand in the comment beside it, so a missing factor ½, a W2²
reported as W2, a distance averaged instead of summed over particles, or a sign error fails.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from scipy.stats import ortho_group, special_ortho_group

import eqbench.alignment
import eqbench.sample_metrics
from eqbench.alignment import aligned_squared_distance, kabsch_rotation, optimal_permutation
from eqbench.errors import ConfigError
from eqbench.sample_metrics import coordinate_w2, distance_histogram_tv, energy_wasserstein


@pytest.mark.parametrize("module", [eqbench.alignment, eqbench.sample_metrics])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def _transformed_copy(x: np.ndarray, seed: int, *, reflect: bool) -> np.ndarray:
    """``x`` permuted, rotated (and mirrored), translated: the same configuration up to symmetry."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    q = special_ortho_group.rvs(d, random_state=seed)
    if reflect:
        q = q @ np.diag([-1.0] + [1.0] * (d - 1))
    return x[rng.permutation(n)] @ q + rng.normal(size=d) * 5.0


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("n_particles,n_dims", [(4, 2), (13, 3), (5, 3)])
@pytest.mark.parametrize("seed", range(5))
def test_rotated_reflected_permuted_translated_copy_aligns_to_zero(n_particles, n_dims, seed):
    x = np.random.default_rng(100 + seed).normal(size=(n_particles, n_dims))
    y = _transformed_copy(x, seed, reflect=True)
    assert aligned_squared_distance(x, y) < 1e-10
    y_rot = _transformed_copy(x, seed, reflect=False)
    assert aligned_squared_distance(x, y_rot, reflections=False) < 1e-10
    # the batched form ([m, N, D]) gives the same numbers as one pair at a time
    batch = aligned_squared_distance(x, np.stack([y, y_rot, x]))
    assert batch.shape == (3,) and np.all(batch < 1e-10)


@pytest.mark.parametrize("n_particles,n_dims", [(4, 2), (13, 3)])
@pytest.mark.parametrize("seed", range(3))
def test_rotations_only_cannot_undo_a_reflection(n_particles, n_dims, seed):
    # A generic random configuration is chiral: its mirror image is no rotation of it.
    x = np.random.default_rng(200 + seed).normal(size=(n_particles, n_dims))
    mirror = _transformed_copy(x, seed, reflect=True)
    assert aligned_squared_distance(x, mirror, reflections=True) < 1e-10
    assert aligned_squared_distance(x, mirror, reflections=False) > 1e-2


def test_kabsch_recovers_the_rotation_and_respects_det():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    x -= x.mean(axis=0)
    q = special_ortho_group.rvs(3, random_state=1)
    r = kabsch_rotation(x, x @ q + 2.0, reflections=False)
    np.testing.assert_allclose(r, q, atol=1e-12)
    p = ortho_group.rvs(3, random_state=3)
    p = p if np.linalg.det(p) < 0 else -p  # an improper orthogonal matrix
    assert np.linalg.det(kabsch_rotation(x, x @ p, reflections=True)) == pytest.approx(-1.0)
    np.testing.assert_allclose(kabsch_rotation(x, x @ p, reflections=True), p, atol=1e-12)
    assert np.linalg.det(kabsch_rotation(x, x @ p, reflections=False)) == pytest.approx(1.0)


def test_known_small_cases_by_hand():
    # Two particles at (±1, 0) vs (0, ±3): after rotation each particle is 2 away: 2 · 2² = 8
    # (summed over particles; averaged would be 4). Unaligned: |(1,0)-(0,3)|² · 2 = 10 · 2 = 20.
    x = np.array([[1.0, 0.0], [-1.0, 0.0]])
    y = np.array([[0.0, 3.0], [0.0, -3.0]])
    assert aligned_squared_distance(x, y) == pytest.approx(8.0, abs=1e-12)
    assert aligned_squared_distance(x, y, reflections=False) == pytest.approx(8.0, abs=1e-12)
    # 1-D, three particles, permutation only (O(1) = {±1}): centred x = (-2, -1, 3), y = (3, -2, -1)
    # → π = (1, 2, 0) gives 0; the unpermuted distance is 25 + 1 + 16 = 42.
    x1 = np.array([[0.0], [1.0], [5.0]])
    y1 = np.array([[5.0], [0.0], [1.0]]) + 10.0
    assert optimal_permutation(x1, y1 - 10.0).tolist() == [2, 0, 1]
    assert aligned_squared_distance(x1, y1) == pytest.approx(0.0, abs=1e-12)
    # Equilateral triangle of side 1 vs side 2 (same centroid): best is to superpose them, each
    # vertex radius 1/√3 vs 2/√3, so 3 · (1/√3)² = 1.
    tri = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert aligned_squared_distance(tri, 2.0 * tri[[2, 0, 1]] @ np.array([[0.0, 1.0], [-1.0, 0.0]])) == \
        pytest.approx(1.0, abs=1e-12)


def test_alignment_bad_input():
    with pytest.raises(ConfigError, match="same shape"):
        aligned_squared_distance(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ConfigError, match="max_rounds"):
        aligned_squared_distance(np.zeros((3, 2)), np.zeros((3, 2)), max_rounds=0)
    with pytest.raises(ConfigError):
        kabsch_rotation(np.zeros((3, 2)), np.zeros((3, 3)), reflections=True)


# ---------------------------------------------------------------- distance histogram TV


def _pairs_1d(distances) -> np.ndarray:
    """Two-particle 1-D configurations ``[n, 2, 1]`` whose one pair distance is each value given."""
    d = np.asarray(distances, dtype=np.float64)
    return np.stack([-d / 2, d / 2], axis=1)[:, :, None]


def test_tv_identical_sets_is_zero_and_disjoint_is_one():
    x = np.random.default_rng(0).normal(size=(50, 4, 2))
    assert distance_histogram_tv(x, x) == 0.0
    data = _pairs_1d([1.0, 3.0])           # bins=4 over [1, 3]: q = (½, 0, 0, ½)
    assert distance_histogram_tv(_pairs_1d([2.2, 2.2]), data, bins=4) == pytest.approx(1.0)  # p = (0, 0, 1, 0)
    # Every sample distance beyond the data's range: all mass outside, TV 1 (not undefined).
    assert distance_histogram_tv(_pairs_1d([10.0, 12.0]), data, bins=4) == pytest.approx(1.0)


def test_tv_of_known_histograms_by_hand():
    data = _pairs_1d([0.0, 1.0, 2.0, 3.0])     # bins [0,1), [1,2), [2,3]: q = (¼, ¼, ½)
    samples = _pairs_1d([0.5, 0.5, 1.5, 2.5])  # p = (½, ¼, ¼)
    assert distance_histogram_tv(samples, data, bins=3) == pytest.approx(0.25)  # ½ (¼ + 0 + ¼)
    # Half of the sample mass beyond the range counts fully: ½ (|½ - ½| + |0 - ½| + ½) = ½.
    assert distance_histogram_tv(_pairs_1d([1.0, 10.0]), _pairs_1d([1.0, 3.0]), bins=4) == pytest.approx(0.5)


def test_tv_pools_all_unordered_pairs():
    # Three particles on a line at 0, 1, 3: pair distances 1, 2, 3 (three pairs, each once).
    data = np.array([[[0.0], [1.0], [3.0]]])          # bins over [1, 3], 2 bins: [1,2) ∋ 1; [2,3] ∋ 2, 3
    samples = np.array([[[0.0], [1.0], [2.0]]])       # distances 1, 1, 2: p = (⅔, ⅓) vs q = (⅓, ⅔)
    assert distance_histogram_tv(samples, data, bins=2) == pytest.approx(1.0 / 3.0)


def test_tv_weights_move_the_answer_the_right_way():
    data = _pairs_1d([0.5, 2.5])                       # bins=2 over [0.5, 2.5]: q = (½, ½)
    samples = _pairs_1d([0.5, 0.5, 2.5])               # p = (⅔, ⅓): TV = ⅙
    assert distance_histogram_tv(samples, data, bins=2) == pytest.approx(1.0 / 6.0)
    # weights ¼, ¼, ½ restore p = (½, ½): TV 0; all weight on the first sample: p = (1, 0), TV ½
    assert distance_histogram_tv(samples, data, bins=2, log_w=np.log([1.0, 1.0, 2.0])) == pytest.approx(0.0)
    assert distance_histogram_tv(samples, data, bins=2, log_w=[0.0, -np.inf, -np.inf]) == pytest.approx(0.5)


def test_tv_bad_input():
    x = np.zeros((2, 3, 2))
    x[:, 1, 0] = 1.0
    with pytest.raises(ConfigError, match="bins"):
        distance_histogram_tv(x, x, bins=0)
    with pytest.raises(ConfigError, match="n_particles"):
        distance_histogram_tv(x, np.zeros((2, 4, 2)))
    with pytest.raises(ConfigError, match="log_w"):
        distance_histogram_tv(x, x, log_w=[0.0])
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ConfigError, match="non-finite"):
        distance_histogram_tv(bad, x)


# ---------------------------------------------------------------- coordinate W2


def test_coordinate_w2_of_two_point_masses():
    a = np.repeat(np.array([[[1.0, 0.0], [-1.0, 0.0]]]), 3, axis=0)
    b = np.repeat(np.array([[[0.0, 3.0], [0.0, -3.0]]]), 5, axis=0)
    # W2 between point masses = the distance between the points: √20 unaligned, √8 aligned
    assert coordinate_w2(a, b, align="none") == pytest.approx(math.sqrt(20.0), abs=1e-12)
    assert coordinate_w2(a, b, align="permutation-rotation") == pytest.approx(math.sqrt(8.0), abs=1e-12)


def test_coordinate_w2_sums_over_particles_gaussian_closed_form():
    # Configurations (g, -g) of two particles in 1-D: |x - y|² = 2 (g - h)², so the coordinate W2
    # is √2 times the 1-D W2 of g vs h, closed form √(Δμ² + Δσ²) = √(9 + 1). Exact OT on 1,000
    # samples each; the finite-sample error of W2 here is about 0.05 (tolerance 0.15, while √2
    # missing, i.e. averaging over particles, would be off by 1.3).
    rng = np.random.default_rng(0)
    g, h = rng.normal(0.0, 1.0, 1000), rng.normal(3.0, 2.0, 1000)
    xs, xd = np.stack([g, -g], 1)[:, :, None], np.stack([h, -h], 1)[:, :, None]
    expected = math.sqrt(2.0) * math.sqrt(9.0 + 1.0)
    assert coordinate_w2(xs, xd, align="none") == pytest.approx(expected, abs=0.15)


def test_coordinate_w2_aligned_sees_through_symmetry_unaligned_does_not():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 13, 3))
    x -= x.mean(axis=1, keepdims=True)
    copy = np.stack([_transformed_copy(c, 10 + i, reflect=i % 2 == 1) for i, c in enumerate(x)])
    copy = copy[rng.permutation(len(copy))]
    assert coordinate_w2(x, copy, align="permutation-rotation") < 1e-6
    assert coordinate_w2(x, copy, align="none") > 1.0
    # rotations only: the mirrored half cannot be aligned, the W2 stays clearly positive
    assert coordinate_w2(x, copy, align="permutation-rotation", reflections=False) > 0.1


def test_aligned_w2_never_exceeds_unaligned_on_the_same_subsample():
    # Each aligned cost is at most the unaligned one (the identity is among the starts and no
    # alternation step increases the distance; CoM-free sets, so centring changes nothing), hence
    # so is the optimal transport cost. Same n_max and seed: the same subsample.
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(30, 13, 3)), rng.normal(size=(40, 13, 3))
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    for reflections in (True, False):
        aligned = coordinate_w2(a, b, align="permutation-rotation", n_max=25, seed=1, reflections=reflections)
        plain = coordinate_w2(a, b, align="none", n_max=25, seed=1)
        assert 0.0 < aligned < plain
    costs = aligned_squared_distance(a[0], b)
    assert np.all(costs <= np.square(a[0] - b).sum(axis=(1, 2)) + 1e-12)


def test_coordinate_w2_subsamples_reproducibly():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 4, 2)), rng.normal(size=(300, 4, 2)) + 1.0
    w_a = coordinate_w2(a, b, align="none", n_max=50, seed=3)
    assert w_a == coordinate_w2(a, b, align="none", n_max=50, seed=3)
    assert w_a != coordinate_w2(a, b, align="none", n_max=50, seed=4)
    assert w_a != coordinate_w2(a, b, align="none")  # default n_max = 1,000 ≥ 300: every sample


def test_coordinate_w2_bad_input():
    x = np.random.default_rng(0).normal(size=(3, 4, 2))
    with pytest.raises(ConfigError, match="none, permutation-rotation"):
        coordinate_w2(x, x, align="rotation")
    with pytest.raises(ConfigError, match="n_max"):
        coordinate_w2(x, x, align="none", n_max=0)
    with pytest.raises(ConfigError, match="n_particles"):
        coordinate_w2(x, x[:, :3], align="none")


# ---------------------------------------------------------------- energy W1 / W2


def test_energy_w2_of_two_gaussians_closed_form():
    # W2² = (μ1 - μ2)² + (σ1 - σ2)² = 9 + 1; returned not squared: √10 = 3.162. With 200,000
    # samples each the estimate is within about 0.01 (tolerance 0.03); W2² (10) or (σ1 + σ2)²
    # (√18 = 4.24) would fail. W1 of two Gaussians of equal σ is the shift.
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 1.0, 200_000), rng.normal(3.0, 2.0, 200_000)
    assert energy_wasserstein(a, b, p=2) == pytest.approx(math.sqrt(10.0), abs=0.03)
    assert energy_wasserstein(a, rng.normal(-2.0, 1.0, 200_000), p=1) == pytest.approx(2.0, abs=0.02)


def test_energy_weights_move_the_answer_the_right_way():
    u_samples, u_data = [0.0, 10.0], [0.0, 0.0]
    assert energy_wasserstein(u_samples, u_data, p=1) == pytest.approx(5.0)      # ½ · 10
    assert energy_wasserstein(u_samples, u_data, p=2) == pytest.approx(math.sqrt(50.0))  # √(½ · 100)
    # more weight on the sample at the data's energy brings the distributions together
    assert energy_wasserstein(u_samples, u_data, p=1, log_w=np.log([3.0, 1.0])) == pytest.approx(2.5)
    # weight zero on a clash (u = +inf) leaves it out
    assert energy_wasserstein([0.0, np.inf], u_data, p=2, log_w=[0.0, -np.inf]) == 0.0


def test_energy_wasserstein_bad_input():
    with pytest.raises(ConfigError, match="1 or 2"):
        energy_wasserstein([0.0], [0.0], p=3)
    with pytest.raises(ConfigError, match="log_w"):
        energy_wasserstein([0.0, 1.0], [0.0], p=1, log_w=[0.0])
    with pytest.raises(ConfigError, match="1-D"):
        energy_wasserstein(np.zeros((2, 2)), [0.0], p=1)
