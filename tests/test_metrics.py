"""eqbench.metrics: every function against a case with a known answer (SPEC §1; paper C.7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from eqbench import metrics


# -- NLL and importance weights ------------------------------------------------------------------

def test_nll_is_the_mean_negative_log_density():
    assert metrics.nll([-1.0, -2.0, -3.0]) == pytest.approx(2.0)
    assert metrics.nll(torch.tensor([0.5, 1.5])) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        metrics.nll([])


def test_log_weights_are_minus_energy_minus_log_q():
    log_w = metrics.log_weights(torch.tensor([1.0, -2.0]), np.array([0.5, -0.25]))
    np.testing.assert_allclose(log_w, [-1.5, 2.25])
    with pytest.raises(ValueError, match="one value per sample"):
        metrics.log_weights([1.0, 2.0], [1.0])


def test_normalized_weights_sum_to_one_and_zero_weights_are_allowed():
    w = metrics.normalized_weights([np.log(1.0), np.log(3.0), -np.inf])
    np.testing.assert_allclose(w, [0.25, 0.75, 0.0])
    # A shift by the unknown log Z changes nothing, even far beyond exp's range.
    np.testing.assert_allclose(metrics.normalized_weights([1000.0, 1000.0 + np.log(3.0)]), [0.25, 0.75])


@pytest.mark.parametrize("bad", [[0.0, np.nan], [0.0, np.inf], [-np.inf, -np.inf], []])
def test_undefined_weights_raise(bad):
    with pytest.raises(ValueError):
        metrics.normalized_weights(bad)


# -- ESS -----------------------------------------------------------------------------------------

def test_ess_of_equal_weights_is_one():
    assert metrics.ess_fraction(np.full(50, -3.7)) == pytest.approx(1.0)


def test_ess_of_one_dominating_weight_is_one_over_n():
    log_w = np.full(100, -np.inf)
    log_w[17] = 2.0
    assert metrics.ess_fraction(log_w) == pytest.approx(1 / 100)
    log_w = np.full(100, -800.0)
    log_w[3] = 0.0
    assert metrics.ess_fraction(log_w) == pytest.approx(1 / 100)


def test_ess_hand_computed():
    # w = 1, 2, 3, 4: (Σw)² / (n Σw²) = 100 / (4 · 30)
    log_w = np.log([1.0, 2.0, 3.0, 4.0])
    assert metrics.ess_fraction(log_w) == pytest.approx(100 / 120)
    assert metrics.ess_fraction(log_w + 123.0) == pytest.approx(100 / 120)


def test_ess_of_gaussian_proposal_matches_the_closed_form():
    # p = N(0, 1), q = N(0, s²): n / ESS -> E_q[(p/q)²] = s² / sqrt(2 s² - 1) for s² > 1/2.
    s = 2.0
    x = np.random.default_rng(0).normal(0.0, s, size=200_000)
    log_w = scipy.stats.norm.logpdf(x) - scipy.stats.norm.logpdf(x, scale=s)
    expected = math.sqrt(2 * s**2 - 1) / s**2
    assert metrics.ess_fraction(log_w) == pytest.approx(expected, abs=0.01)


def test_infinite_energies_are_zero_weights_that_count_in_the_ess():
    """Issue "every number means one thing", item 4: six samples, weights 1, 2, 3 (finite energy),
    two clashes (u = +inf: weight 0) and one NaN log q (undefined). By hand: Σw = 6, Σw² = 14,
    Kish ESS = 36/14; as a fraction of the 5 defined samples 36/70, of all 6 drawn 36/84.
    Dropping the clashes as "non-finite" (the old rule) gave 36/42 = 0.857."""
    weights = np.array([1.0, 2.0, 3.0])
    u = np.array([0.5, -1.0, 2.0, np.inf, np.inf, 1.0])
    log_q = np.concatenate([-u[:3] - np.log(weights), [0.3, -7.0, np.nan]])  # log w = -u - log q = log w_i
    iw = metrics.importance_weights(u, log_q)
    assert (iw.n_total, iw.n_zero_weight, iw.n_undefined) == (6, 2, 1)
    np.testing.assert_array_equal(iw.defined, [True, True, True, True, True, False])
    np.testing.assert_allclose(iw.log_w[:3], np.log(weights), rtol=0, atol=1e-12)
    assert np.isneginf(iw.log_w[3:]).all()
    assert metrics.ess_fraction(iw.log_w) == pytest.approx(36 / 70, rel=1e-12)
    assert metrics.ess_fraction(iw.log_w, n_total=iw.n_total) == pytest.approx(36 / 84, rel=1e-12)
    dropped = metrics.ess_fraction(np.log(weights))  # what removing the clashes reports
    assert dropped == pytest.approx(36 / 42) and abs(dropped - 36 / 84) > 0.4
    # The reweighted mean ignores the clashes' infinite energy (0 · inf is 0 in the sum, not NaN).
    assert metrics.weighted_mean(u[iw.defined], iw.log_w) == pytest.approx((0.5 - 2.0 + 6.0) / 6.0, rel=1e-12)
    with pytest.raises(ValueError, match="n_total"):
        metrics.ess_fraction(iw.log_w, n_total=4)


@pytest.mark.parametrize("energy, log_q", [
    (np.nan, 0.0),       # energy undefined
    (-np.inf, 0.0),      # infinite weight
    (1.0, np.nan),       # log q undefined
    (1.0, np.inf),       # infinite density
    (1.0, -np.inf),      # zero density at a sample of q: an infinite weight
    (np.inf, np.nan),    # a clash whose log q is undefined is undefined, not zero
])
def test_undefined_weights_are_left_out_and_counted(energy, log_q):
    iw = metrics.importance_weights([0.0, energy], [0.0, log_q])
    assert (iw.n_total, iw.n_zero_weight, iw.n_undefined) == (2, 0, 1)
    assert iw.log_w.tolist() == [0.0]


def test_weighted_histogram_and_w2_keep_zero_weights_out_of_the_mass():
    """A clash (u = +inf, weight 0) adds no mass to a reweighted histogram or W2; unweighted, it is
    mass beyond the bins (missing area), not dropped."""
    u = np.array([0.25, 0.75, np.inf])
    log_w = np.array([0.0, np.log(3.0), -np.inf])
    edges = np.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(metrics.histogram_density(u, edges, log_w), [0.5, 1.5])  # (1/4, 3/4) / 0.5
    np.testing.assert_allclose(metrics.histogram_density(u, edges), [2 / 3, 2 / 3])  # 1/3 of the mass beyond
    w = metrics.normalized_weights(log_w)
    # The weighted quantile function of {0.25: 1/4, 0.75: 3/4} against the point mass at 0.75: W2² = 1/4 · 0.5².
    assert metrics.wasserstein_1d(u, [0.75], weights_a=w) == pytest.approx(0.25)


# -- reweighted means and the bootstrap ------------------------------------------------------------

def test_weighted_mean_hand_computed_and_unweighted():
    assert metrics.weighted_mean([1.0, 2.0, 4.0]) == pytest.approx(7 / 3)
    assert metrics.weighted_mean([1.0, 2.0, 4.0], np.log([1.0, 1.0, 2.0])) == pytest.approx(11 / 4)


def test_reweighting_recovers_the_target_mean_within_its_bootstrap_error():
    # Samples of q = N(0, 2²) reweighted to p ∝ exp(-(x - 1)²/2): E_p[x] = 1, E_p[x²] = 2.
    x = np.random.default_rng(1).normal(0.0, 2.0, size=20_000)
    log_w = metrics.log_weights(0.5 * (x - 1.0) ** 2, scipy.stats.norm.logpdf(x, scale=2.0))
    mean = metrics.weighted_mean(x, log_w)
    std = metrics.bootstrap_std(metrics.weighted_mean, x, log_w, n_resamples=100, seed=0)
    assert 0.005 < std < 0.05
    assert abs(mean - 1.0) < 4 * std
    assert metrics.weighted_mean(x**2, log_w) == pytest.approx(2.0, abs=0.1)
    assert abs(metrics.weighted_mean(x) - 1.0) > 20 * std  # without weights: the proposal's mean, 0


def test_bootstrap_resamples_rows_jointly_and_reproducibly():
    values, tags = np.arange(10.0), np.arange(10.0) * 2
    stats = metrics.bootstrap(lambda a, b: b - 2 * a, values, tags, n_resamples=7, seed=3)
    assert stats.shape == (7, 10)
    assert (stats == 0).all()  # the two arrays were indexed by the same rows
    first = metrics.bootstrap(np.mean, values, n_resamples=5, seed=3)
    np.testing.assert_array_equal(first, metrics.bootstrap(np.mean, values, n_resamples=5, seed=3))
    with pytest.raises(ValueError):
        metrics.bootstrap(np.mean, values, tags[:3])


def test_bootstrap_std_of_a_mean_is_the_standard_error():
    x = np.random.default_rng(2).normal(size=2_000)
    std = metrics.bootstrap_std(np.mean, x, n_resamples=400, seed=1)
    assert std == pytest.approx(1 / math.sqrt(2_000), rel=0.15)


def test_bootstrap_std_skips_infinite_resamples_per_element():
    calls = iter(range(100))

    def statistic(x):
        k = next(calls)
        return np.array([float(k), np.inf if k % 2 else float(k), np.inf])

    std = metrics.bootstrap_std(statistic, np.zeros(3), n_resamples=6, seed=0)
    assert std[0] == pytest.approx(np.std([0, 1, 2, 3, 4, 5], ddof=1))
    assert std[1] == pytest.approx(np.std([0, 2, 4], ddof=1))
    assert np.isnan(std[2])


# -- histograms and free-energy profiles -------------------------------------------------------------

def test_histogram_density_counts_mass_outside_the_range_as_missing():
    density = metrics.histogram_density([0.5, 1.5, 1.6, 9.0], [0.0, 1.0, 2.0])
    np.testing.assert_allclose(density, [0.25, 0.5])
    reweighted = metrics.histogram_density([0.5, 1.5], [0.0, 1.0, 2.0], np.log([3.0, 1.0]))
    np.testing.assert_allclose(reweighted, [0.75, 0.25])


def test_radial_free_energy_rayleigh_and_maxwell_known_answers():
    edges = np.linspace(0.1, 4.0, 30)
    for n_dims, dist in ((2, scipy.stats.rayleigh), (3, scipy.stats.maxwell)):
        prob = np.diff(dist.cdf(edges))
        expected = -np.log(prob / (prob.sum() * np.diff(edges)))
        computed = metrics.radial_free_energy(edges, lambda d: 0.5 * d**2, n_dims)
        np.testing.assert_allclose(computed, expected, atol=1e-9)
    # Energies far from zero (unnormalised) change nothing.
    shifted = metrics.radial_free_energy(edges, lambda d: 0.5 * d**2 + 500.0, 3)
    np.testing.assert_allclose(shifted, computed, atol=1e-9)


def _assert_profile_matches(estimate, exact, std, min_bins):
    ok = np.isfinite(estimate) & (exact - exact.min() < 4.0)
    assert ok.sum() >= min_bins
    deviation = np.abs(estimate[ok] - exact[ok])
    assert (deviation < 4 * std[ok] + 0.05).all(), (deviation.max(), std[ok].max())


def test_free_energy_profile_of_samples_reproduces_minus_log_p():
    # |r| for r ~ N(0, 1) in 1-D (half-normal): p(d) ∝ exp(-d²/2) on d >= 0.
    d = np.abs(np.random.default_rng(3).normal(size=40_000))
    edges = np.linspace(0.0, 3.0, 16)
    estimate = metrics.free_energy_profile(d, edges)
    std = metrics.bootstrap_std(lambda v: metrics.free_energy_profile(v, edges), d, n_resamples=100, seed=0)
    exact = metrics.radial_free_energy(edges, lambda r: 0.5 * r**2, 1)
    _assert_profile_matches(estimate, exact, std, min_bins=14)
    wrong = metrics.radial_free_energy(edges, lambda r: 0.5 * r**2, 2)  # the test can fail
    with pytest.raises(AssertionError):
        _assert_profile_matches(estimate, wrong, std, min_bins=14)


def test_reweighted_free_energy_profile_reproduces_the_target():
    # Uniform samples on [0, 3] reweighted to p(d) ∝ d exp(-d²/2): the 2-D radial profile.
    d = np.random.default_rng(4).uniform(0.0, 3.0, size=60_000)
    log_w = np.log(d) - 0.5 * d**2
    edges = np.linspace(0.2, 3.0, 15)

    def profile(v, lw):
        return metrics.free_energy_profile(v, edges, lw)

    estimate = profile(d, log_w)
    std = metrics.bootstrap_std(profile, d, log_w, n_resamples=100, seed=0)
    exact = metrics.radial_free_energy(edges, lambda r: 0.5 * r**2, 2)
    _assert_profile_matches(estimate, exact, std, min_bins=13)
    unweighted = metrics.free_energy_profile(d, edges)
    assert np.abs(unweighted - exact).max() > 1.0


def test_free_energy_profile_marks_empty_bins_infinite():
    f = metrics.free_energy_profile([0.5, 0.6], [0.0, 1.0, 2.0])
    assert f[0] == pytest.approx(0.0) and np.isposinf(f[1])
    assert np.isposinf(metrics.free_energy_profile([5.0], [0.0, 1.0, 2.0])).all()


def test_dw2_mcmc_distance_profile_matches_the_exact_radial_profile():
    """The Jacobian d^(D-1) and the CoM-free reduction of the DW-2 profile, checked on MCMC data."""
    import eqbench

    system = eqbench.get_system("dw2")
    x = eqbench.load_data("dw2", split="test")
    d = metrics.pair_distances(x)[:, 0]
    edges = np.linspace(1.5, 6.5, 21)

    def pair_energy(r):
        return system.pair_potential(torch.from_numpy(r))[0].numpy()

    exact = metrics.radial_free_energy(edges, pair_energy, system.n_dims)
    estimate = metrics.free_energy_profile(d, edges)
    std = metrics.bootstrap_std(lambda v: metrics.free_energy_profile(v, edges), d, n_resamples=100, seed=0)
    _assert_profile_matches(estimate, exact, std, min_bins=14)
    without_jacobian = metrics.radial_free_energy(edges, pair_energy, 1)
    with pytest.raises(AssertionError):
        _assert_profile_matches(estimate, without_jacobian, std, min_bins=14)


# -- Wasserstein distances -------------------------------------------------------------------------

def test_w1_matches_scipy_with_and_without_weights():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=300), rng.normal(1.0, 2.0, size=500)
    wa, wb = rng.random(300), rng.random(500)
    assert metrics.wasserstein_1d(a, b, p=1) == pytest.approx(scipy.stats.wasserstein_distance(a, b))
    assert metrics.wasserstein_1d(a, b, 1, wa, wb) == pytest.approx(scipy.stats.wasserstein_distance(a, b, wa, wb))


def test_w2_of_equal_sizes_is_the_rms_of_sorted_differences():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=400), rng.exponential(size=400)
    expected = math.sqrt(np.mean((np.sort(a) - np.sort(b)) ** 2))
    assert metrics.wasserstein_1d(a, b) == pytest.approx(expected)
    assert metrics.wasserstein_1d(b, a) == pytest.approx(expected)


def test_w2_hand_computed_and_shift():
    # {0, 1} vs {0, 3}: sorted differences 0 and 2 -> sqrt((0 + 4) / 2)
    assert metrics.wasserstein_1d([1.0, 0.0], [0.0, 3.0]) == pytest.approx(math.sqrt(2.0))
    # {0} vs {0, 2} weighted 3:1 -> the quantile of b is 2 on a quarter of [0, 1]
    assert metrics.wasserstein_1d([0.0], [0.0, 2.0], weights_b=[3.0, 1.0]) == pytest.approx(1.0)
    a = np.random.default_rng(7).normal(size=100)
    assert metrics.wasserstein_1d(a, a + 0.7) == pytest.approx(0.7)
    assert metrics.wasserstein_1d(a, a[::-1]) == pytest.approx(0.0, abs=1e-12)


def test_integer_weights_equal_repeated_samples():
    a, w = np.array([0.3, -1.0, 2.5]), np.array([1, 3, 2])
    b = np.random.default_rng(8).normal(size=7)
    assert metrics.wasserstein_1d(a, b, 2, w) == pytest.approx(metrics.wasserstein_1d(np.repeat(a, w), b, 2))


def test_w2_between_gaussians_matches_the_closed_form():
    # W2(N(0, 1), N(1, 2²)) = sqrt((0 - 1)² + (1 - 2)²)
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=100_000), rng.normal(1.0, 2.0, size=80_000)
    assert metrics.wasserstein_1d(a, b) == pytest.approx(math.sqrt(2.0), abs=0.02)


def test_wasserstein_refuses_bad_input():
    with pytest.raises(ValueError):
        metrics.wasserstein_1d([0.0, np.nan], [0.0])
    with pytest.raises(ValueError):
        metrics.wasserstein_1d([0.0, 1.0], [0.0], weights_a=[1.0, -1.0])
    with pytest.raises(ValueError):
        metrics.wasserstein_1d([0.0], [1.0], p=0.5)


def test_pair_distances_and_distance_w2():
    x = np.array([[[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]])
    np.testing.assert_allclose(metrics.pair_distances(x), [[5.0, 1.0, math.sqrt(18.0)]])
    rng = np.random.default_rng(10)
    xa = rng.normal(size=(50, 4, 2))
    assert metrics.distance_wasserstein(xa, xa[::-1]) == pytest.approx(0.0, abs=1e-12)
    # Scaling every configuration by 2 doubles every distance: W_p(d, 2d) = ||d||_p over pooled pairs.
    d = metrics.pair_distances(xa).ravel()
    assert metrics.distance_wasserstein(xa, 2 * xa) == pytest.approx(math.sqrt(np.mean(d**2)))
    # A per-configuration weight counts like repeating that configuration.
    w = rng.integers(1, 4, size=50)
    xb = rng.normal(size=(30, 4, 2))
    assert metrics.distance_wasserstein(xa, xb, weights_a=w) == pytest.approx(
        metrics.distance_wasserstein(np.repeat(xa, w, axis=0), xb))
    assert metrics.distance_wasserstein(torch.from_numpy(xa), xb) == pytest.approx(metrics.distance_wasserstein(xa, xb))


# -- forward ESS (Midgley et al. 2023) -----------------------------------------------------------

def test_forward_ess_is_one_for_equal_weights_and_shift_invariant():
    assert metrics.forward_ess_fraction(np.full(50, -3.7)) == pytest.approx(1.0, abs=1e-12)
    # Two weights 1 and 4 by hand: n² / (Σw · Σ1/w) = 4 / (5 · 1.25) = 0.64, whatever log Z.
    for shift in (0.0, 800.0, -800.0):
        assert metrics.forward_ess_fraction(np.log([1.0, 4.0]) + shift) == pytest.approx(0.64, rel=1e-12)
    # Not Kish's ESS of the same weights ((1 + 4)² / (1 + 16) / 2 = 0.735): a different estimator.
    assert metrics.ess_fraction(np.log([1.0, 4.0])) == pytest.approx(25 / 34)


@pytest.mark.parametrize("scale, dims", [(1.5, 1), (1.2, 3), (0.8, 2)])
def test_forward_ess_of_a_mismatched_gaussian(scale, dims):
    """p = N(0, I_d), q = N(0, s² I_d), x ~ p: the fraction tends to 1 / E_p[p/q] =
    (sqrt(2 s² - 1) / s²)^d (needs 2 s² > 1), e.g. 0.8315 for s = 1.5 in 1-D."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(400_000, dims))
    log_p = -0.5 * (x**2).sum(1)
    log_q = -0.5 * (x**2).sum(1) / scale**2 - dims * math.log(scale)
    expected = (math.sqrt(2 * scale**2 - 1) / scale**2) ** dims
    assert expected < 0.95
    assert metrics.forward_ess_fraction(log_p - log_q) == pytest.approx(expected, abs=0.01)


def test_forward_ess_of_a_shifted_gaussian():
    """q = N(μ, 1), p = N(0, 1): E_p[p/q] = exp(μ²), so the fraction tends to exp(-μ²)."""
    x = np.random.default_rng(12).normal(size=400_000)
    for mu in (0.3, 0.7):
        log_w = -0.5 * x**2 + 0.5 * (x - mu) ** 2
        assert metrics.forward_ess_fraction(log_w) == pytest.approx(math.exp(-mu**2), abs=0.01)


def test_forward_ess_sees_a_missed_mode_that_reverse_ess_does_not():
    """Target ½N(-4, 1) + ½N(4, 1), flow N(4, 1): the flow's own samples reweight perfectly well
    (reverse ESS ≈ 1: w = p/q ≈ ½ where q puts its mass), the target's samples do not (half of
    them lie where q is tiny: forward ESS ≈ 0)."""
    rng = np.random.default_rng(13)

    def log_p(x):
        return np.logaddexp(-0.5 * (x + 4) ** 2, -0.5 * (x - 4) ** 2) - math.log(2)

    def log_q(x):
        return -0.5 * (x - 4) ** 2

    x_q = rng.normal(4.0, 1.0, size=20_000)
    x_p = np.where(rng.random(20_000) < 0.5, -4.0, 4.0) + rng.normal(size=20_000)
    assert metrics.ess_fraction(log_p(x_q) - log_q(x_q)) > 0.99
    assert metrics.forward_ess_fraction(log_p(x_p) - log_q(x_p)) < 1e-3


def test_forward_ess_of_zero_infinite_and_undefined_weights():
    assert metrics.forward_ess_fraction([0.0, np.inf]) == 0.0  # q(x) = 0 at a test point
    assert metrics.forward_ess_fraction([0.0, -np.inf]) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        metrics.forward_ess_fraction([0.0, np.nan])
    with pytest.raises(ValueError):
        metrics.forward_ess_fraction([])
    assert metrics.forward_ess_fraction(torch.tensor([1.0, 1.0])) == pytest.approx(1.0)
