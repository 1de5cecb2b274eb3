"""bg-reweighting (paper §7.4, B.3, Fig. 3b, 6, 10): smoke per model, DW-2 free energy, refusals, plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import run_task_smoke

import eqbench
from eqbench import metrics
from eqbench.errors import ConfigError
from eqbench.runner import plan_cells
from eqbench.tasks.base import CellContext
from eqbench.tasks.bg_reweighting import TASK, sample_cnf_log_q

MODELS = ["kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "en-flow", "se3-acf", "g-resflow"]
NON_EQUIVARIANT = {"node", "real-nvp"}
SCALARS = ("ess_fraction", "forward_ess_fraction", "forward_ess_fraction_undefined", "forward_log_w_std", "n_samples", "n_samples_zero_weight", "n_samples_undefined", "nll_train", "nll_test",
           "mean_energy_flow", "mean_energy_flow_std",
           "mean_energy_reweighted", "mean_energy_reweighted_std", "mean_energy_mcmc", "mean_energy_mcmc_std",
           "energy_w2_flow", "energy_w2_reweighted", "distance_w2_flow", "distance_w2_reweighted",
           "train_wall_s", "score_wall_s", "sample_wall_s")
#: The field's sample-quality metrics (eqbench.sample_metrics via common.sample_quality_records).
SAMPLE_QUALITY = ("energy_w1_flow", "energy_w1_reweighted", "dist_tv_flow", "dist_tv_reweighted", "coord_w2_flow",
                  "coord_w2_aligned_flow", "sample_metrics_wall_s")


def check_sample_quality(table, variant=""):
    """The sample-quality records of one cell are finite and in range, with units that say what they are."""
    values = {m: _scalar(table, m, variant) for m in SAMPLE_QUALITY}
    assert all(math.isfinite(v) for v in values.values()), values
    for metric in ("dist_tv_flow", "dist_tv_reweighted"):
        assert 0.0 < values[metric] <= 1.0, (metric, values[metric])  # finite sets never match exactly
    assert values["coord_w2_flow"] > 0 and values["coord_w2_aligned_flow"] > 0
    assert values["energy_w1_flow"] <= _scalar(table, "energy_w2_flow", variant) + 1e-9  # W1 <= W2 (Jensen)
    units = table[(table["variant"].fillna("") == variant)].set_index("metric")["unit"]
    assert "200 bins" in units["dist_tv_flow"] and "importance-weighted" in units["dist_tv_reweighted"]
    assert "not squared" in units["coord_w2_flow"] and "aligned" in units["coord_w2_aligned_flow"]


def check_training_curve(table, params, variant=""):
    """Both phases' logged curve: ML steps below pretrain_iterations, the λ-mix's from there on, the
    KL term only where the λ-mix weighs it, and each curve ends at the cell's final training loss."""
    pretrain, mix = params["pretrain_iterations"], params["mix_iterations"]
    nll_steps, nll = _stepped(table, "nll_loss", variant)
    assert nll_steps[0] == 0 and nll_steps[-1] == pretrain + mix - 1 and (np.diff(nll_steps) > 0).all()
    assert (nll_steps < pretrain).sum() >= 2 and (nll_steps >= pretrain).sum() >= 2  # first and last of each
    assert pretrain - 1 in nll_steps and pretrain in nll_steps
    assert nll[-1] == _scalar(table, "final_nll_loss", variant)
    kl_steps, kl = _stepped(table, "kl_loss", variant)
    assert len(kl_steps) >= 1 and set(kl_steps) <= set(nll_steps[nll_steps >= pretrain])
    assert mix == 1 or pretrain not in kl_steps  # λ = 0 at the mix's first step: no KL term to log
    assert kl_steps[-1] == nll_steps[-1] and kl[-1] == _scalar(table, "final_kl_loss", variant)
    unit = {m: table.loc[table["metric"] == m, "unit"].iloc[0] for m in ("nll_loss", "kl_loss")}
    assert "one batch" in unit["nll_loss"] and "KL - log Z" in unit["kl_loss"]


HISTOGRAMS = ("energy_edge", "energy_hist_flow", "energy_hist_reweighted", "energy_hist_mcmc")
FREE_ENERGY = ("distance_edge", "free_energy_exact", "free_energy_flow", "free_energy_reweighted",
               "free_energy_reweighted_std", "free_energy_rmse_reweighted")
HUTCHINSON = ("ess_fraction_hutchinson", "mean_energy_hutchinson", "free_energy_hutchinson",
              "free_energy_rmse_hutchinson", "log_q_hutchinson_error_std")


def _scalar(table, metric, variant=""):
    rows = table[(table["metric"] == metric) & (table["variant"].fillna("") == variant)]
    assert len(rows) == 1, (metric, variant, len(rows))
    return float(rows["value"].iloc[0])


def _stepped(table, metric, variant=""):
    rows = table[(table["metric"] == metric) & (table["variant"].fillna("") == variant)].sort_values("step")
    return rows["step"].to_numpy(dtype=int), rows["value"].to_numpy(dtype=float)


@pytest.mark.parametrize("model", MODELS)
def test_smoke_every_model_dw4(model, tmp_path):
    results, table = run_task_smoke("bg-reweighting", model, "dw4", tmp_path,
                                    expect_metrics=SCALARS + SAMPLE_QUALITY + HISTOGRAMS)
    variants = sorted(cell.config["params"]["variant"] for cell in results)
    assert variants == (["", "aug"] if model in NON_EQUIVARIANT else [""])
    fwd = table[table["metric"] == "forward_ess_fraction"]
    assert ((fwd["value"] > 0) & (fwd["value"] <= 1)).all()
    # an importance-weighted density weighs test points with its one-draw extended-space density
    extended = fwd["unit"].str.contains("extended-space one-draw")
    assert extended.all() if model in ("real-nvp", "se3-acf") else not extended.any()
    n_samples = results[0].config["params"]["n_samples"]
    for variant in variants:
        ess = _scalar(table, "ess_fraction", variant)
        assert 1.0 / n_samples - 1e-12 <= ess <= 1.0
        # The MCMC reference is this system's, whatever the model: DW-4 energies near -22.5 kT.
        assert -24.5 < _scalar(table, "mean_energy_mcmc", variant) < -20.5
        check_sample_quality(table, variant)
        check_training_curve(table, results[0].config["params"], variant)
        steps, edges = _stepped(table, "energy_edge", variant)
        assert (steps == np.arange(len(edges))).all() and (np.diff(edges) > 0).all()
        for name in ("energy_hist_flow", "energy_hist_reweighted", "energy_hist_mcmc"):
            bins, density = _stepped(table, name, variant)
            assert (bins == np.arange(len(edges) - 1)).all()
            mass = float((density * np.diff(edges)).sum())
            assert (density >= 0).all() and mass <= 1.0 + 1e-9, (name, mass)
        # The bins are made for the MCMC energies: they hold (almost) all of that mass.
        _, mcmc = _stepped(table, "energy_hist_mcmc", variant)
        assert float((mcmc * np.diff(edges)).sum()) > 0.99
    assert not set(HUTCHINSON + FREE_ENERGY) & set(table["metric"])  # DW-2 only


@pytest.mark.parametrize("model", ["kernel-flow", "real-nvp"])
def test_smoke_dw2_free_energy_profile(model, tmp_path):
    expect = FREE_ENERGY + (HUTCHINSON if model == "kernel-flow" else ())
    _, table = run_task_smoke("bg-reweighting", model, "dw2", tmp_path, overrides={"augment": [False]},
                              expect_metrics=SCALARS + HISTOGRAMS + expect)
    steps, exact = _stepped(table, "free_energy_exact")
    _, edges = _stepped(table, "distance_edge")
    assert len(edges) == len(exact) + 1
    assert exact.min() == pytest.approx(0.0)  # the common reference: the exact minimum
    # The exact DW-2 profile has its two wells near d ≈ 2.5 and 5.5 and the barrier near d = 4.
    centres = 0.5 * (edges[1:] + edges[:-1])
    inner, outer = exact[centres < 4.0].argmin(), exact[centres > 4.0].argmin()
    assert abs(centres[centres < 4.0][inner] - 2.5) < 0.5 and abs(centres[centres > 4.0][outer] - 5.5) < 0.5
    assert exact[np.abs(centres - 4.0).argmin()] > 3.0
    for name in ("reweighted", "hutchinson") if model == "kernel-flow" else ("reweighted",):
        bins, values = _stepped(table, f"free_energy_{name}")
        std_bins, std = _stepped(table, f"free_energy_{name}_std")
        assert set(std_bins) <= set(bins) and (std >= 0).all()
        assert 0.0 < _scalar(table, f"free_energy_coverage_{name}") <= 1.0
    if model == "real-nvp":
        assert not set(HUTCHINSON) & set(table["metric"])  # no divergence to estimate
    plots = tmp_path / "plots" / "bg-reweighting"
    for stem in ("energy_histograms_dw2", "free_energy_dw2", "training_dw2"):
        assert (plots / f"{stem}.png").stat().st_size > 0 and (plots / f"{stem}.svg").stat().st_size > 0


def test_smoke_lj13_kernel_flow(tmp_path):
    _, table = run_task_smoke("bg-reweighting", "kernel-flow", "lj13", tmp_path,
                              overrides={"n_samples": 100, "n_test": 100, "n_train": 50},
                              expect_metrics=SCALARS + SAMPLE_QUALITY + HISTOGRAMS)
    assert set(table["system"]) == {"lj13"}
    check_sample_quality(table)
    units = table.set_index("metric")["unit"]
    assert "100x100 configurations" in units["coord_w2_flow"]  # coord_w2_samples = 100, 100 of each
    assert "20x20 configurations" in units["coord_w2_aligned_flow"]  # coord_w2_aligned_samples = 20


def test_gaussian_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="cannot run model 'gaussian'.*closed form"):
        plan_cells("bg-reweighting", "gaussian", "dw4", "smoke")


def test_augmentation_only_for_non_equivariant_models():
    kernel = plan_cells("bg-reweighting", "kernel-flow", "dw4", "quick")
    node = plan_cells("bg-reweighting", "node", "dw4", "quick")
    assert [c.params["variant"] for c in kernel] == [""] * 3  # three seeds
    assert sorted(c.params["variant"] for c in node) == [""] * 3 + ["aug"] * 3
    assert sorted(c.seed for c in kernel) == [0, 1, 2]


def test_paper_profile_is_the_papers_protocol():
    plans = plan_cells("bg-reweighting", "node", "dw4", "paper")
    params = plans[0].params
    assert params["n_train"] == 1000 and params["lambda_end"] == 0.5
    assert params["n_samples"] == 10000 and params["n_test"] == 10000
    assert params["n_bootstrap"] == 100  # paper C.7: 100 bootstrapped sub-samples
    assert len({p.seed for p in plans}) == 5 and len(plans) == 2 * 5


@pytest.mark.parametrize("override, message", [
    ({"n_samples": 0}, "n_samples"),
    ({"lambda_end": 1.5}, "lambda_end"),
    ({"augment": ["yes"]}, "augment"),
    ({"distance_range": [5.0, 2.0]}, "distance_range"),
    ({"solver_steps": -1}, "solver_steps"),
    ({"free_energy_window": 0}, "free_energy_window"),
])
def test_bad_settings_are_refused_before_work(override, message):
    with pytest.raises(ConfigError, match=message):
        plan_cells("bg-reweighting", "kernel-flow", "dw2", "smoke", overrides=override)


def test_hutchinson_log_q_is_of_the_same_samples():
    """Exact and Hutchinson integrations of the same prior draws give the same configurations;
    the exact log q is the flow's log-density, the Hutchinson one a noisy estimate of it."""
    flow = eqbench.build_model("kernel-flow", "dw2", {"init_scale": 0.3, "steps": 40, "dtype": "float64"})
    torch.manual_seed(0)
    x, log_q = sample_cnf_log_q(flow, 256, ("exact", "hutchinson"), batch_size=128, seed=1, progress=False)
    x_again, log_q_again = sample_cnf_log_q(flow, 256, ("exact",), batch_size=128, seed=1, progress=False)
    torch.testing.assert_close(x, x_again, atol=0, rtol=0)
    torch.testing.assert_close(log_q["exact"], log_q_again["exact"], atol=0, rtol=0)
    with torch.no_grad():  # the inverse solve agrees up to the RK4 discretisation error
        torch.testing.assert_close(log_q["exact"], flow.log_prob(x), atol=1e-3, rtol=0)
    error = log_q["hutchinson"] - log_q["exact"]
    assert float(error.std()) > 0.1  # a real estimate, not the exact trace again
    assert abs(float(error.mean())) < 4 * float(error.std()) / 16  # unbiased: mean within 4 s.e.


def test_clashes_are_zero_weights_in_the_records():
    """Item 4 of "every number means one thing", at task level on LJ-13: six flow samples with
    weights 1, 2, 3, two clashes (particles 1e-30 apart: u = +inf, weight 0) and one NaN log q.
    By hand: Kish ESS = (1+2+3)² / (1+4+9) = 36/14, as a fraction of the 6 drawn 36/84 = 0.4286;
    removing the clashes as "non-finite" reported 36/42 = 0.857."""
    system = eqbench.get_system("lj13")
    grid = torch.stack(torch.meshgrid(*[torch.arange(3.0)] * 3, indexing="ij"), -1).reshape(-1, 3)[:13] * 1.1
    base = grid - grid.mean(0)
    x = base.repeat(6, 1, 1) + 0.01 * torch.randn(6, 13, 3, generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.float64)
    for k in (3, 4):  # a clash: particle 1 a hair's breadth from particle 0 at the origin
        x[k, 0] = 0.0
        x[k, 1] = torch.tensor([1e-30, 0.0, 0.0], dtype=torch.float64)
    u = system.energy(x).numpy()
    assert np.isfinite(u[[0, 1, 2, 5]]).all() and np.isposinf(u[[3, 4]]).all()
    weights = np.array([1.0, 2.0, 3.0])
    log_q = np.concatenate([-u[:3] - np.log(weights), [0.0, 0.0, np.nan]])
    ctx = CellContext(task="bg-reweighting", model="hand-made", system=system,
                      params={"n_bootstrap": 20, "energy_bins": 10, "n_train": 6, "coord_w2_samples": 10,
                              "coord_w2_aligned_samples": 10}, seed=0)
    records = {r.metric: r for r in TASK.reweighting_records(ctx, x, log_q, x[:3]) if r.step is None}
    assert (records["n_samples"].value, records["n_samples_zero_weight"].value,
            records["n_samples_undefined"].value) == (6, 2, 1)
    ess = records["ess_fraction"].value
    assert ess == pytest.approx(36 / 84, rel=1e-9)
    assert abs(ess - 36 / 42) > 0.4  # the old rule's answer fails
    assert "all samples drawn" in records["ess_fraction"].unit
    assert records["mean_energy_reweighted"].value == pytest.approx(float(np.dot(weights, u[:3]) / 6), rel=1e-9)
    assert records["mean_energy_flow"].value == pytest.approx(float(u[:3].mean()), rel=1e-9)
    assert "finite energy" in records["mean_energy_flow"].unit
    assert all(math.isfinite(r.value) for r in records.values())
    # The clashes (weight 0) stay in the unweighted distance histogram: their pair distance 1e-30
    # lies below every test distance, so 2 of the 5 defined samples' mass is outside the range.
    assert records["dist_tv_flow"].value >= 0.5 * 2 / 5 * (1 / 78)  # one of 78 pairs each is a clash
    assert records["energy_w1_reweighted"].value <= records["energy_w2_reweighted"].value + 1e-12
    # Every sample has zero or undefined weight: nothing to reweight, the cell fails.
    with pytest.raises(FloatingPointError, match="positive importance weight"):
        TASK.reweighting_records(ctx, x[3:], np.array([0.0, 0.0, np.nan]), x[:3])


def _only(table, metric):
    rows = table[table["metric"] == metric]
    assert len(rows) == 1, (metric, len(rows))
    return float(rows["value"].iloc[0])


def test_harmonic_prior_flow_end_to_end(tmp_path):
    """Item 8b: the known-answer run. On ``harmonic`` (u = ½|x|² on U, k = (N-1) D = 9) the target
    is the prior; ``PriorFlow`` is the prior and stays it through training, so by hand:
    log w = 0.5 k log 2π for every sample, ESS = 1 exactly; ⟨u⟩_reweighted = k/2 = 4.5 with
    standard error sqrt(k/2 / n); NLL of the test data = mean ½|x|² + 0.5 k log 2π exactly, and
    k/2 (1 + log 2π) = 12.770 within its standard error. A missing Gaussian constant (-8.27), a
    doubled NLL or energy, or a sign error in log w lands far outside each tolerance (checked)."""
    _, table = run_task_smoke("bg-reweighting", "known_answer_models:prior_flow", "harmonic", tmp_path,
                              expect_metrics=SCALARS + HISTOGRAMS)
    system = eqbench.get_system("harmonic")
    k, n_samples, n_test = system.n_dof, 200, 200  # the smoke profile's n_samples and n_test
    constant = 0.5 * k * math.log(2 * math.pi)
    assert (k, round(constant, 3)) == (9, 8.27)
    assert (_only(table, "n_samples"), _only(table, "n_samples_zero_weight"), _only(table, "n_samples_undefined")) \
        == (n_samples, 0, 0)
    # ESS: all weights equal (to rounding of ½|x|² computed from pair distances vs from z).
    assert _only(table, "ess_fraction") == pytest.approx(1.0, abs=1e-12)
    # Reweighted and flow mean energy: k/2 within 4 standard errors; a doubled energy is 4.5 off.
    se_u = math.sqrt(0.5 * k / n_samples)  # Var u = k/2 for u = ½ χ²_k
    for metric in ("mean_energy_reweighted", "mean_energy_flow", "mean_energy_mcmc"):
        assert abs(_only(table, metric) - 0.5 * k) < 4 * se_u, metric
        assert abs(2 * _only(table, metric) - 0.5 * k) > 4 * se_u
    assert _only(table, "mean_energy_reweighted") == pytest.approx(_only(table, "mean_energy_flow"), abs=1e-9)
    # The bootstrap error is the standard error (10 resamples: within a factor 2), not a variance.
    assert 0.5 * se_u < _only(table, "mean_energy_reweighted_std") < 2 * se_u
    # NLL: exact on the same test data, and the analytic value within its standard error.
    test = eqbench.load_data("harmonic", "test", n=n_test, seed=0).numpy()
    half_sq = 0.5 * (test**2).sum(axis=(1, 2))
    nll = _only(table, "nll_test")
    assert nll == pytest.approx(half_sq.mean() + constant, abs=1e-9)
    analytic, se_nll = 0.5 * k * (1 + math.log(2 * math.pi)), math.sqrt(0.5 * k / n_test)
    assert abs(nll - analytic) < 4 * se_nll
    for wrong in (nll - constant, 2 * nll, -nll):  # missing constant, doubled, sign error
        assert abs(wrong - analytic) > 4 * se_nll
    # A sign error in log w (log w = -u + log q = -|x|² - const) gives ESS (E w)² / E w² = (5/9)^(k/2) ≈ 0.07:
    z = np.random.default_rng(0).standard_normal((n_samples, k))
    assert metrics.ess_fraction(-(z**2).sum(1)) == pytest.approx((5 / 9) ** (k / 2), abs=0.05)


def test_community_test_split_scores_the_same_metrics(tmp_path):
    """test_source = community (issue 16): the same trained flow and the same flow samples, scored
    against the EFM/DEM test split instead of eqbench's. What is computed on or compared with the
    test split changes and says so in its unit; what depends on the flow samples alone does not
    change; eqbench's units stay as they were; systems without the split and unknown sources are
    refused with the reason."""
    from eqbench.data.external import reference_data_dir
    from eqbench.planning import NoCellsError

    if reference_data_dir() is None:
        pytest.skip("the community reference data (../shared/reference_data) are not beside this checkout")
    overrides = {"augment": [False]}
    expect = SCALARS + SAMPLE_QUALITY + HISTOGRAMS
    _, own = run_task_smoke("bg-reweighting", "kernel-flow", "dw4", tmp_path / "eqbench", overrides=overrides,
                            expect_metrics=expect)
    results, table = run_task_smoke("bg-reweighting", "kernel-flow", "dw4", tmp_path / "community",
                                    overrides={**overrides, "test_source": "community"}, expect_metrics=expect)
    assert results[0].config["params"]["test_source"] == "community"
    assert not own["unit"].str.contains("community").any()
    units = table[table["step"].isna()].set_index("metric")["unit"]
    on_split = ("nll_test", "forward_ess_fraction", "forward_log_w_std", "mean_energy_mcmc", "mean_energy_mcmc_std",
                "energy_w1_flow", "energy_w2_flow", "energy_w1_reweighted", "energy_w2_reweighted",
                "distance_w2_flow", "distance_w2_reweighted", "dist_tv_flow", "dist_tv_reweighted",
                "coord_w2_flow", "coord_w2_aligned_flow")
    for metric in on_split:
        assert "community test split (EFM/DEM" in units[metric], (metric, units[metric])
    for metric in ("mean_energy_flow", "mean_energy_reweighted", "mean_energy_reweighted_std"):
        assert "compared with mean_energy_mcmc of the community test split" in units[metric], metric
    for metric in ("energy_hist_flow", "energy_hist_mcmc", "energy_edge"):
        assert table.loc[table["metric"] == metric, "unit"].str.contains("community test split").all(), metric
    for metric in ("ess_fraction", "nll_train", "n_samples"):
        assert "community" not in units[metric], metric
    # Same training data and seed: the same flow and samples; only the reference differs.
    for metric in ("nll_train", "ess_fraction", "mean_energy_flow", "mean_energy_reweighted"):
        assert _scalar(table, metric) == pytest.approx(_scalar(own, metric), rel=1e-6), metric
    for metric in ("nll_test", "forward_ess_fraction", "mean_energy_mcmc", "energy_w2_flow", "energy_w1_reweighted",
                   "dist_tv_flow", "coord_w2_flow"):
        assert _scalar(table, metric) != pytest.approx(_scalar(own, metric), rel=1e-9), metric
    # the community reference is the same target: DW-4 energies near -22.5 kT
    assert -24.5 < _scalar(table, "mean_energy_mcmc") < -20.5
    for system in ("harmonic", "dw2"):
        with pytest.raises(NoCellsError, match=f"no community test split for {system}; available for dw4, lj13"):
            plan_cells("bg-reweighting", "kernel-flow", system, "smoke", overrides={"test_source": "community"})
    with pytest.raises(ConfigError, match="test_source must be one of eqbench, community, got 'efm'"):
        plan_cells("bg-reweighting", "kernel-flow", "dw4", "smoke", overrides={"test_source": "efm"})


def test_every_profile_declares_its_test_split():
    for profile in ("smoke", "quick", "paper", "calibrate"):
        assert TASK.profile(profile)["test_source"] == "eqbench", profile
