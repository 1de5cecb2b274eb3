"""Reference data (SPEC §3): the sampler, the diagnostics, the cache, and agreement with the field.

Tolerances are derived from the stated statistics, never tuned: each test says where its
number comes from.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, signal, stats

import eqbench
from eqbench.data import diagnostics as diag
from eqbench.data import external, store
from eqbench.data.mcmc import run_metropolis
from eqbench.errors import ConfigError, DataError
from eqbench.geometry import pairwise_distances


def _pool(name: str, split: str):
    return store.load_pool(eqbench.get_system(name), split)


# ------------------------------------------------------------------------------ own data quality
@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_own_data_passes_spec_checks(name):
    """Configurational temperature within 1 ± 0.03 (SPEC §3), stride >= autocorrelation time,
    burn-in >= 10 autocorrelation times of the slowest mode, no drift between the halves of the
    chains, no repeated rows, CoM-free, zero overlap between any two of train / val / test."""
    system = eqbench.get_system(name)
    pools = {split: _pool(name, split) for split in store.SPLITS}
    for split, (x, d) in pools.items():
        assert abs(d["configurational_temperature"] - 1.0) <= store.TEMPERATURE_TOLERANCE, d
        assert all(d["checks"].values()), d["checks"]
        assert d["n_samples"] == len(x) == system.data_protocol.size(split)
        assert d["energy_stderr_method"].startswith("batch means, one batch per chain"), d
    assert pools["train"][1]["n_samples"] == pools["test"][1]["n_samples"] == 10_000
    assert diag.count_duplicate_rows(np.concatenate([x for x, _ in pools.values()])) == 0
    for first, second in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert diag.count_overlapping_rows(pools[first][0], pools[second][0]) == 0
    train, test = pools["train"][0], pools["test"][0]
    # Independently recomputed from the arrays, not read from the diagnostics.
    t_conf = system.configurational_temperature(torch.from_numpy(test))
    assert abs(t_conf - 1.0) <= store.TEMPERATURE_TOLERANCE
    assert np.abs(test.mean(axis=1)).max() < 1e-10


@pytest.mark.parametrize("name", ["dw2", "dw4", "lj13"])
def test_splits_agree_within_batch_means_errors(name):
    """Train, val and test are independent draws of one distribution: their mean energies (and
    mean pair distances, the slow mode of DW-4) agree within 3 combined batch-means standard
    errors. This fails when the errors are too small or a split is off (the DW-4 data of format
    1, 2,000-step burn-in: train -22.593 ± 0.017, test -22.499 ± 0.018, 3.7 s.e. apart).

    Each split's mean is recomputed from its stored rows; its error is the diagnostics'
    batch-means error over chains (the stored rows are those chains' states minus at most one
    per chain, so the two means differ by far less than the error)."""
    pools = {split: _pool(name, split) for split in store.SPLITS}
    system = eqbench.get_system(name)
    means = {}
    for split, (x, d) in pools.items():
        energy = system.energy(torch.from_numpy(x)).mean().item()
        assert abs(energy - d["energy_mean"]) < 0.5 * d["energy_stderr"], (split, energy, d["energy_mean"])
        distance = pairwise_distances(torch.from_numpy(x)).mean().item()
        means[split] = (energy, d["energy_stderr"], distance, d["mean_distance_stderr"])
    for first, second in [("train", "val"), ("train", "test"), ("val", "test")]:
        (e1, se1, r1, sr1), (e2, se2, r2, sr2) = means[first], means[second]
        assert abs(e1 - e2) < 3 * math.hypot(se1, se2), (first, second, means)
        assert abs(r1 - r2) < 3 * math.hypot(sr1, sr2), (first, second, means)


def test_dw2_distance_distribution_matches_exact_boltzmann():
    """DW-2 reduces to the 2-D relative vector r = x1 - x2, so p(d) ∝ d exp(-f(d)) exactly.

    The mean distance and the weight of the outer well (d > 4) from MCMC must agree with the
    quadrature within 4 standard errors (rows are decorrelated: stride >> autocorrelation).
    """
    system = eqbench.get_system("dw2")
    x, _ = _pool("dw2", "train")
    d = np.linalg.norm(x[:, 0] - x[:, 1], axis=-1)

    def f(r):
        s = r - 4.0
        return -4.0 * s**2 + 0.9 * s**4

    z = integrate.quad(lambda r: r * math.exp(-f(r)), 0, 12, points=[2.5, 5.5])[0]
    mean_exact = integrate.quad(lambda r: r * r * math.exp(-f(r)), 0, 12, points=[2.5, 5.5])[0] / z
    outer_exact = integrate.quad(lambda r: r * math.exp(-f(r)), 4, 12)[0] / z
    assert abs(d.mean() - mean_exact) < 4 * d.std() / math.sqrt(len(d))
    outer = (d > 4).mean()
    assert abs(outer - outer_exact) < 4 * math.sqrt(outer_exact * (1 - outer_exact) / len(d))
    assert system.n_dof == 2


# ------------------------------------------------------------------------ agreement with the field
def _ks_critical(n: int, m: int, alpha_coefficient: float = 1.95) -> float:
    """Two-sample KS critical value at α = 0.001 (coefficient 1.95), large-sample formula."""
    return alpha_coefficient * math.sqrt((n + m) / (n * m))


@pytest.mark.skipif(external.reference_data_dir() is None, reason="community reference data not available")
def test_dw4_energies_agree_with_community_data():
    """eqbench's DW-4 energies vs the DEM/EFM DW-4 test file.

    Known flaw of that file (reference_data/README, issue text): it is slightly
    under-equilibrated, mean energy ~-22.45 where long MCMC gives -22.54 ± 0.01. So:
    - our mean must match the long-MCMC value within 3 combined standard errors;
    - our mean may differ from the file's by the known bias (0.09) plus 3 combined s.e.;
    - the KS statistic may exceed the α = 0.001 critical value (sized with the file's
      7,750 unique rows) by the shift that bias causes: 0.09/σ_E · φ(0) ≈ 0.019 for σ_E ≈ 1.9.
    """
    system = eqbench.get_system("dw4")
    ours, d = _pool("dw4", "test")
    theirs = external.load_reference(system, "test")
    e_ours = system.energy(torch.from_numpy(ours)).numpy()
    e_theirs = system.energy(torch.from_numpy(theirs)).numpy()
    n_unique = len(theirs) - diag.count_duplicate_rows(theirs)
    se_ours = d["energy_stderr"]
    se_theirs = e_theirs.std() / math.sqrt(n_unique)
    known_bias = 0.09
    assert abs(e_ours.mean() - (-22.54)) < 3 * math.hypot(se_ours, 0.01)
    assert abs(e_ours.mean() - e_theirs.mean()) < known_bias + 3 * math.hypot(se_ours, se_theirs)
    ks = stats.ks_2samp(e_ours, e_theirs).statistic
    bias_shift = known_bias / e_ours.std() * stats.norm.pdf(0)
    assert ks < _ks_critical(len(e_ours), n_unique) + bias_shift, ks


@pytest.mark.skipif(external.reference_data_dir() is None, reason="community reference data not available")
def test_lj13_energies_agree_with_community_data():
    """eqbench's LJ-13 energies (ordered-pair convention) vs the DEM/EFM LJ-13 val and test files.

    Those files follow the ordered-pair energy (their configurational temperature is 1 with it,
    0.5 with the single count), so agreement checks the convention and the sampler at once.

    The two community files disagree with each other more than independent samples would
    (measured: mean energies -43.00 vs -43.13, KS 0.022 at p = 0.02; their rows carry no chain
    structure to estimate correlations from). A reference cannot check us more tightly than it
    agrees with itself, so each tolerance is the statistical one (3 combined standard errors
    for the mean, the α = 0.001 critical value for KS) plus the files' own val/test discrepancy
    in the same statistic, computed here from the files.
    """
    system = eqbench.get_system("lj13")
    ours, d = _pool("lj13", "test")
    val = external.load_reference(system, "val")
    test = external.load_reference(system, "test")
    e_ours = system.energy(torch.from_numpy(ours)).numpy()
    e_val = system.energy(torch.from_numpy(val)).numpy()
    e_test = system.energy(torch.from_numpy(test)).numpy()
    e_theirs = np.concatenate([e_val, e_test])
    se_theirs = e_theirs.std() / math.sqrt(len(e_theirs))
    own_mean_spread = abs(e_val.mean() - e_test.mean())
    own_ks = stats.ks_2samp(e_val, e_test).statistic
    assert abs(e_ours.mean() - e_theirs.mean()) < 3 * math.hypot(d["energy_stderr"], se_theirs) + own_mean_spread
    ks = stats.ks_2samp(e_ours, e_theirs).statistic
    assert ks < _ks_critical(len(e_ours), len(e_theirs)) + own_ks, ks
    # The single-count energy would put the community data at temperature ~0.5: guard the convention.
    both = torch.from_numpy(np.concatenate([val, test]))
    assert abs(system.configurational_temperature(both) - 1.0) < store.TEMPERATURE_TOLERANCE


# ------------------------------------------------------------------------------------ the sampler
def test_metropolis_is_deterministic_given_seed():
    system = eqbench.get_system("dw4")
    kwargs = dict(n_chains=8, samples_per_chain=3, burn_in=20, stride=5, step_size=0.5, progress=False)
    a = run_metropolis(system, seed=3, **kwargs)
    b = run_metropolis(system, seed=3, **kwargs)
    c = run_metropolis(system, seed=4, **kwargs)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert not np.array_equal(a.samples, c.samples)
    assert a.samples.shape == (3, 8, 4, 2)
    assert np.abs(a.samples.mean(axis=2)).max() < 1e-12  # CoM removed after each step


def test_metropolis_rejects_bad_arguments():
    system = eqbench.get_system("dw4")
    with pytest.raises(ValueError, match="n_chains"):
        run_metropolis(system, n_chains=0, samples_per_chain=1, burn_in=0, stride=1, step_size=0.5, seed=0)


def test_autocorrelation_time_of_ar1_process():
    """An AR(1) process x_t = a x_{t-1} + noise has τ_int = (1 + a) / (1 - a) exactly."""
    rng = np.random.default_rng(0)
    a, steps, chains = 0.8, 20_000, 16
    x = np.zeros((steps, chains))
    noise = rng.normal(size=(steps, chains))
    for t in range(1, steps):
        x[t] = a * x[t - 1] + noise[t]
    expected = (1 + a) / (1 - a)
    assert abs(diag.integrated_autocorrelation_time(x) - expected) < 0.1 * expected


def _ar1(a: float, steps: int, chains: int, seed: int) -> np.ndarray:
    """``[steps, chains]`` of the stationary AR(1) process ``x_t = a x_{t-1} + ε_t``, ε ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    start = rng.normal(scale=1.0 / math.sqrt(1.0 - a * a), size=chains)  # the stationary law
    noise = rng.normal(size=(steps, chains))
    x, _ = signal.lfilter([1.0], [1.0, -a], noise, axis=0, zi=(a * start)[None, :])
    return x


def _ar1_stderr_of_mean(a: float, steps: int, chains: int) -> float:
    """Exact standard error of the grand mean of ``chains`` independent stationary AR(1) chains:
    ``Var(chain mean) = σ² / T² [T + 2 Σ_{k<T} (T - k) a^k]`` with ``σ² = 1 / (1 - a²)``."""
    k = np.arange(1, steps)
    variance = (steps + 2.0 * np.sum((steps - k) * a**k)) / steps**2 / (1.0 - a * a)
    return math.sqrt(variance / chains)


def test_batch_means_stderr_is_right_for_correlated_chains():
    """On AR(1) chains (a = 0.9, τ = 19) the batch-means error must match the exact one within
    15 % (its own relative noise with 400 batches is 1/sqrt(2 * 399) = 3.5 %, so 15 % is four
    of those and an error off by a factor 2 fails), while the independent-rows formula is
    ~sqrt(τ) = 4.4x too small, which is why the diagnostics never use it."""
    a, steps, chains = 0.9, 1_000, 400
    x = _ar1(a, steps, chains, seed=11)
    exact = _ar1_stderr_of_mean(a, steps, chains)
    estimate = diag.batch_means(x)
    assert estimate.n_batches == chains and estimate.batch_length == steps
    assert "one batch per chain" in estimate.method
    assert abs(estimate.stderr / exact - 1.0) < 0.15, (estimate.stderr, exact)
    assert abs(estimate.mean) < 4 * exact
    naive = x.std() / math.sqrt(x.size)
    assert exact / naive > 3.5


def test_batch_means_along_one_long_chain():
    """One AR(1) chain of 400,000 steps cut into 200 batches of 2,000 (≫ τ = 19): the error
    matches the exact one within 20 % (relative noise 1/sqrt(2 * 199) = 5 %); cut into 40,000
    batches of 10 (half a τ) it is ~40 % too small (measured 0.62x), the reason batches along a
    chain must outlast τ and the reason the data diagnostics use one batch per chain."""
    a, steps = 0.9, 400_000
    x = _ar1(a, steps, 1, seed=12)[:, 0]
    exact = _ar1_stderr_of_mean(a, steps, 1)
    long_batches = diag.batch_means(x, batches_per_chain=200)
    assert long_batches.n_batches == 200 and "contiguous batches" in long_batches.method
    assert abs(long_batches.stderr / exact - 1.0) < 0.2, (long_batches.stderr, exact)
    short_batches = diag.batch_means(x, batches_per_chain=40_000)
    assert short_batches.stderr < 0.75 * exact
    with pytest.raises(ValueError, match="batches"):
        diag.batch_means(x[:10], batches_per_chain=20)


def test_drift_z_flags_a_relaxing_chain_and_passes_a_stationary_one():
    """A burn-in that is too short leaves a relaxation in the stored samples; drift_z sees it."""
    stationary = _ar1(0.5, 40, 300, seed=13)
    assert abs(diag.drift_z(stationary)) < 4
    relaxing = stationary + 2.0 * np.exp(-np.arange(40) / 10.0)[:, None]
    assert diag.drift_z(relaxing) < -10
    assert math.isnan(diag.drift_z(stationary[:1]))


# ------------------------------------------------------------------------- the cache and the splits
def test_dataset_key_changes_with_the_format_version(monkeypatch):
    """The cache key hashes the format version, so bumping it never reuses data of an old format."""
    system = eqbench.get_system("dw4")
    keys = {split: store.dataset_key(system, split) for split in store.SPLITS}
    assert len(set(keys.values())) == len(store.SPLITS)
    monkeypatch.setattr(store, "DATA_FORMAT_VERSION", store.DATA_FORMAT_VERSION + 1)
    for split in store.SPLITS:
        assert store.dataset_key(system, split) != keys[split]


def test_validation_split_has_its_own_seed_and_size():
    """``val`` is its own data set: protocol seed and size, different from train and test."""
    for name in ("dw2", "dw4", "lj13"):
        protocol = eqbench.get_system(name).data_protocol
        assert len({protocol.seed(split) for split in store.SPLITS}) == 3
        assert protocol.size("val") == 2_000 < protocol.size("test")
    x = eqbench.load_data("dw4", "val", n=50, seed=1)
    assert x.shape == (50, 4, 2)
    assert torch.equal(x, eqbench.load_data("dw4", "val", n=50, seed=1))
    assert eqbench.load_data("dw4", "val").shape == (2_000, 4, 2)


def test_corrupt_cache_is_regenerated_identically(tmp_path, monkeypatch):
    """Generation is deterministic: a corrupted file is regenerated bit-for-bit (same sha256)."""
    monkeypatch.setenv("EQBENCH_CACHE", str(tmp_path))
    system = eqbench.get_system("dw2")
    path, d = store.ensure_dataset(system, "test")
    original_sha = d["sha256"]
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00" * 8
    path.write_bytes(bytes(data))
    assert store.verify_dataset(system, "test")[0] == "corrupt"
    with pytest.raises(DataError, match="corrupt"):
        store.ensure_dataset(system, "test", regenerate="never")
    with pytest.warns(UserWarning, match="corrupt"):
        _, d2 = store.ensure_dataset(system, "test")
    assert d2["sha256"] == original_sha
    assert store.verify_dataset(system, "test")[0] == "ok"


def test_missing_cache_with_regenerate_never_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EQBENCH_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="missing"):
        store.ensure_dataset(eqbench.get_system("dw4"), "train", regenerate="never")


def test_load_data_subsets_are_seeded_and_nested():
    small = eqbench.load_data("dw4", "train", n=10, seed=5)
    large = eqbench.load_data("dw4", "train", n=100, seed=5)
    other = eqbench.load_data("dw4", "train", n=10, seed=6)
    assert small.shape == (10, 4, 2) and small.dtype == torch.float64
    torch.testing.assert_close(small, large[:10])
    assert not torch.equal(small, other)
    assert eqbench.load_data("dw4", "test").shape == (10_000, 4, 2)
    assert eqbench.load_data("dw4", "train", n=10, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", [-5, 0, 10_001, 2.5, True])
def test_load_data_rejects_bad_sample_counts(n):
    with pytest.raises(ConfigError, match="sample count"):
        eqbench.load_data("dw4", "train", n=n)


def test_load_data_rejects_unknown_split_and_source():
    with pytest.raises(ConfigError, match="valid: train, val, test"):
        eqbench.load_data("dw4", "validation")
    with pytest.raises(ConfigError, match="valid: eqbench, community"):
        eqbench.load_data("dw4", "train", source="internet")


# ------------------------------------------------------------------------------ community loader
def test_reference_file_of_wrong_shape_is_rejected(tmp_path):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros((10, 7)))
    with pytest.raises(DataError, match=r"shape \(10, 7\); dw4 expects \(n, 8\)"):
        external.load_reference_file(path, eqbench.get_system("dw4"))
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not an array")
    with pytest.raises(DataError, match="not a readable"):
        external.load_reference_file(garbage, eqbench.get_system("dw4"))


@pytest.mark.skipif(external.reference_data_dir() is None, reason="community reference data not available")
def test_community_report_shows_known_flaws():
    """The DW-4 files repeat rows, overlap train/test by ~89 % and keep the CoM: all reported."""
    report = external.reference_report(eqbench.get_system("dw4"))
    train, test = report["splits"]["train"], report["splits"]["test"]
    assert train["duplicate_rows"] > 60_000
    assert report["overlap_rows"]["train/test"] > 0.85 * test["n_samples"]
    assert train["max_abs_com_before_removal"] > 1.0
    x = eqbench.load_data("dw4", "test", source="community")
    assert torch.abs(x.mean(dim=1)).max() < 1e-10
    with pytest.raises(DataError, match="valid: val, test"):
        eqbench.load_data("lj13", "train", source="community")


def test_parallel_generation_gives_the_same_bits(tmp_path, monkeypatch):
    """`eqbench data --jobs 2` generates splits side by side in spawned workers; the files must be
    bit-identical to those generated one after the other (generation is deterministic per set)."""
    import json

    harmonic = eqbench.get_system("harmonic")
    digests, reported = {}, {}
    for jobs in (1, 2):
        monkeypatch.setenv("EQBENCH_CACHE", str(tmp_path / f"jobs{jobs}"))
        done = []
        store.ensure_datasets([harmonic], jobs=jobs, on_done=lambda label, seconds: done.append((label, seconds)))
        digests[jobs] = {split: json.loads(store.dataset_paths(harmonic, split)[1].read_text())["sha256"]
                         for split in store.SPLITS}
        reported[jobs] = done
    assert digests[1] == digests[2] and len(set(digests[1].values())) == 3
    for done in reported.values():  # each set reported once as it became ready, with its wall time
        assert sorted(label for label, _ in done) == sorted(f"harmonic {split}" for split in store.SPLITS)
        assert all(seconds > 0 for _, seconds in done)


def test_parallel_workers_generate_on_one_thread_and_a_lone_large_batch_on_every_core(monkeypatch, tmp_path):
    """ensure_datasets' workers pin one torch thread even for a batch large enough that a lone
    generation would use every core (LJ-55: 25 chains x 1,485 pairs), and the caller's count is
    restored after either."""
    import os

    import torch

    monkeypatch.setenv("EQBENCH_CACHE", str(tmp_path))
    lj55 = eqbench.get_system("lj55")
    seen = []

    class Stop(Exception):
        pass

    def fake_generate(system, split, *, progress=None, checkpoint=None):
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(store, "generate_dataset", fake_generate)
    previous = torch.get_num_threads()
    with pytest.raises(Stop):
        store._ensure_in_worker(lj55, "train", "auto")
    with pytest.raises(Stop):
        store.ensure_dataset(lj55, "train")
    assert seen == [1, max(previous, os.cpu_count() or 1)]
    assert torch.get_num_threads() == previous
