"""divergence-cost (paper §7.1, Fig. 3a, 3c): smoke per CNF, refusals, budget skips, the power-law
fit on data with a known slope, and the Hutchinson error statistics on fields with a known trace."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import run_task_smoke

import eqbench
from eqbench.errors import ConfigError
from eqbench.runner import plan_cells
from eqbench.tasks.divergence_cost import (
    fit_power_law,
    hutchinson_error,
    hutchinson_from_jacobian,
    jacobian,
    predict_seconds,
    rademacher_variance,
    random_cluster,
    reference_radius,
)

CNF_MODELS = ["kernel-flow", "gradient-flow", "schnet-flow", "node", "en-flow"]


@pytest.mark.parametrize("model", CNF_MODELS)
def test_smoke_every_cnf_dw4(model, tmp_path):
    results, table = run_task_smoke(
        "divergence-cost", model, "dw4", tmp_path,
        expect_metrics=("eval_time_s", "eval_time_std_s", "eval_repeats", "time_exponent", "hutchinson_rel_error",
                        "hutchinson_abs_error", "hutchinson_rel_rmse_analytic", "hutchinson_rel_error_exponent"))
    params = results[0].config["params"]
    times = table[table["metric"] == "eval_time_s"]
    methods = set(times["variant"])
    closed_form = model in ("kernel-flow", "gradient-flow")  # the models with a closed-form divergence
    expected = {"velocity", "brute-force", "hutchinson"} | ({"closed-form"} if closed_form else set())
    assert methods == expected
    assert set(times["step"].astype(int)) == set(params["particle_counts"])
    assert (times["value"] > 0).all()
    # The exponents are fitted per method, over the timed counts only.
    assert set(table[table["metric"] == "time_exponent"]["variant"]) == expected
    err = table[table["variant"] == "hutchinson"]
    direct = err[err["metric"] == "hutchinson_direct_rel_dev"]["value"]
    assert len(direct) == len(params["particle_counts"]) and (direct < 1e-4).all(), direct.tolist()
    if closed_form:
        closed = err[err["metric"] == "closed_form_rel_dev"]["value"]
        assert (closed < 1e-4).all(), closed.tolist()
    # An unbiased estimator: each count's mean error lies within 5 standard errors of 0.
    bias = err[err["metric"] == "hutchinson_rel_bias"].set_index("step")["value"]
    stderr = err[err["metric"] == "hutchinson_rel_bias_stderr"].set_index("step")["value"]
    assert ((bias.abs() / stderr) < 5).all(), (bias / stderr).tolist()
    n_est = err[err["metric"] == "hutchinson_estimates"]["value"]
    assert (n_est == params["error_configs"] * params["error_probes"]).all()


def test_smoke_lj13_kernel_flow_is_3d(tmp_path):
    _, table = run_task_smoke("divergence-cost", "kernel-flow", "lj13", tmp_path,
                              overrides={"particle_counts": [3, 13], "methods": ["closed-form", "hutchinson"]})
    assert set(table["system"]) == {"lj13"}
    assert set(table[table["metric"] == "eval_time_s"]["variant"]) == {"closed-form", "hutchinson"}


def test_each_count_builds_a_system_of_its_own_with_the_defaults_of_its_kind(tmp_path, monkeypatch):
    """N particles of dw4's potential are a system named for what it is (``dw8``), not dw4 with
    another count, and the model takes that system's defaults: the node's widths follow N·D
    (DW-4's [64, 64] up to N·D = 32, LJ-13's [64, 128, 64] at N·D = 40)."""
    import eqbench.components as components

    real_build = components.build_model
    built = []

    def spy(model, system, config=None):
        flow = real_build(model, system, config)
        s = components.get_system(system)
        built.append((s.name, s.n_particles, s.kind, s.length_scale, getattr(flow, "hidden", None)))
        return flow

    monkeypatch.setattr(components, "build_model", spy)
    run_task_smoke("divergence-cost", "node", "dw4", tmp_path,
                   overrides={"particle_counts": [3, 8, 20], "methods": ["velocity"], "error_configs": 1,
                              "error_probes": 10})
    assert ("dw3", 3, "double-well", 4.0, (64, 64)) in built
    assert ("dw8", 8, "double-well", 4.0, (64, 64)) in built
    assert ("dw20", 20, "double-well", 4.0, (64, 128, 64)) in built


@pytest.mark.parametrize("model", ["real-nvp", "gaussian"])
def test_models_without_a_divergence_are_refused(model):
    with pytest.raises(ConfigError, match="divergence-cost cannot run model .*no velocity field or divergence"):
        plan_cells("divergence-cost", model, "dw4", "smoke")


def test_other_systems_are_refused():
    with pytest.raises(ConfigError, match="does not support system 'dw2'; supported: dw4, lj13"):
        plan_cells("divergence-cost", "kernel-flow", "dw2", "smoke")


@pytest.mark.parametrize("override, message", [
    ({"methods": ["exact-ish"]}, "methods must be a non-empty list of velocity, closed-form"),
    ({"particle_counts": [1, 4]}, "particle_counts"),
    ({"fit_points": 1}, "fit_points"),
    ({"min_repeats": 5, "repeats": 3}, "min_repeats"),
    ({"time": 2.0}, "time must be a number in"),
    ({"error_configs": -1}, "error_configs"),
])
def test_bad_settings_are_refused_before_work(override, message):
    with pytest.raises(ConfigError, match=message):
        plan_cells("divergence-cost", "kernel-flow", "dw4", "smoke", overrides=override)


def test_over_budget_counts_are_skipped_with_the_predicted_cost(tmp_path):
    """A tiny budget: the first count is measured, every later one is predicted over budget and
    recorded as skipped (with its predicted seconds) instead of run; the cell still succeeds."""
    results = eqbench.run("divergence-cost", "kernel-flow", "dw4", "smoke", results_dir=tmp_path, progress=False,
                          overrides={"budget_s": 1e-6, "methods": ["velocity", "brute-force"]})
    (cell,) = results
    assert cell.status == "ok", cell.reason
    by = {(r.metric, r.variant, r.step): r for r in cell.records}
    for method in ("velocity", "brute-force"):
        assert ("eval_time_s", method, 2) in by
        for n in (4, 8):
            assert ("eval_time_s", method, n) not in by
            skipped = by[("eval_time_skipped", method, n)]
            assert skipped.value > 0 and "not run: over budget_s" in skipped.unit
    assert ("hutchinson_error_skipped", "hutchinson", 8) in by
    assert not any(r.metric == "time_exponent" for r in cell.records)  # one point is no fit


# ------------------------------------------------------------------------------ the power law
def test_fit_power_law_recovers_a_known_exponent():
    counts = [2, 4, 8, 16, 32, 64, 128]
    exact = [3e-4 * n ** 2.5 for n in counts]
    fit = fit_power_law(counts, exact, points=4)
    assert fit.exponent == pytest.approx(2.5, abs=1e-9)
    assert fit.prefactor == pytest.approx(3e-4, rel=1e-9)
    assert fit.counts == (16, 32, 64, 128)
    assert fit.stderr == pytest.approx(0.0, abs=1e-9)
    # Multiplicative noise: the slope stays near 2.5 and its standard error covers the miss.
    noisy = [t * math.exp(0.05 * s) for t, s in zip(exact, [1, -1, 1, -1, 1, -1, 1])]
    fit = fit_power_law(counts, noisy, points=4)
    assert abs(fit.exponent - 2.5) < 0.1 and 0 < fit.stderr < 0.1
    assert abs(fit.exponent - 2.5) < 3 * fit.stderr


def test_fit_power_law_uses_the_largest_counts():
    """A fixed overhead flattens small counts: all points underestimate the asymptotic N^3."""
    counts = [2, 4, 8, 16, 32, 64, 128]
    values = [1e-3 + 1e-7 * n ** 3 for n in counts]
    assert fit_power_law(counts, values, points=2).exponent == pytest.approx(3.0, abs=0.05)
    assert fit_power_law(counts, values).exponent < 2.0


def test_fit_power_law_needs_two_counts():
    with pytest.raises(ValueError, match="at least 2 distinct counts"):
        fit_power_law([8, 8], [1.0, 1.1])
    with pytest.raises(ValueError, match="at least 2 distinct counts"):
        fit_power_law([8, 16], [1.0, float("nan")])


def test_predict_seconds_extrapolates_the_local_slope():
    assert predict_seconds([], 8) is None
    assert predict_seconds([(4, 1.0)], 8) == pytest.approx(8.0)  # default slope 3
    assert predict_seconds([(4, 1.0), (8, 4.0)], 16) == pytest.approx(16.0)  # slope 2
    assert predict_seconds([(4, 1.0), (8, 0.5)], 16) == pytest.approx(1.0)  # never cheaper: slope >= 1


# ------------------------------------------------------------------------------ Hutchinson error
def test_rademacher_variance_matches_enumeration():
    """The closed-form variance of εᵀJε equals the variance over all 2^n sign vectors."""
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=5)), dtype=torch.float64)  # [32, 5]
    values = torch.einsum("ki,bij,kj->kb", signs, jac, signs)
    trace = jac.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert torch.allclose(values.mean(0), trace, atol=1e-12)  # unbiased, exactly
    assert torch.allclose(values.var(0, unbiased=False), rademacher_variance(jac), atol=1e-10)


def test_hutchinson_error_is_consistent_on_a_known_trace():
    """Many probes of a fixed J: the estimates' mean converges to tr J (bias within 4 standard
    errors), and the sampled RMS error to the analytic one."""
    g = torch.Generator().manual_seed(1)
    jac = torch.randn(4, 12, 12, generator=g, dtype=torch.float64) + 3 * torch.eye(12, dtype=torch.float64)
    exact = jac.diagonal(dim1=-2, dim2=-1).sum(-1)
    estimates = hutchinson_from_jacobian(jac, 20_000, g)
    assert estimates.shape == (20_000, 4)
    e = hutchinson_error(estimates, exact, rademacher_variance(jac))
    assert abs(e.rel_bias) < 4 * e.rel_bias_stderr
    assert e.rel_rmse == pytest.approx(e.rel_rmse_analytic, rel=0.03)
    assert e.divergence_rms == pytest.approx(float(exact.pow(2).mean().sqrt()))
    assert e.n_estimates == 80_000
    # A biased "estimator" (every estimate shifted by 10 % of the RMS trace) is caught.
    shifted = hutchinson_error(estimates + 0.1 * e.divergence_rms, exact)
    assert abs(shifted.rel_bias) > 10 * shifted.rel_bias_stderr
    assert math.isnan(shifted.rel_rmse_analytic)


def test_hutchinson_error_of_a_diagonal_jacobian_is_zero():
    """Rademacher probes estimate the trace of a diagonal matrix exactly (ε_i² = 1)."""
    jac = torch.diag_embed(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]], dtype=torch.float64))
    e = hutchinson_error(hutchinson_from_jacobian(jac, 100, torch.Generator().manual_seed(0)),
                         jac.diagonal(dim1=-2, dim2=-1).sum(-1), rademacher_variance(jac))
    assert e.rel_error == 0.0 and e.rel_rmse_analytic == 0.0


def test_hutchinson_error_refuses_a_zero_divergence():
    with pytest.raises(ValueError, match="zero"):
        hutchinson_error(torch.ones(5, 2), torch.zeros(2))


def test_jacobian_of_a_flow_matches_its_divergences():
    """tr J equals the closed form, and εᵀJε equals flow.divergence(method="hutchinson", noise=ε)."""
    system = eqbench.get_system("dw4").with_particles(6)
    torch.manual_seed(0)
    flow = eqbench.build_model("kernel-flow", system, {"dtype": "float64", "init_scale": 0.1})
    x = random_cluster(3, 6, 2, 4.0, torch.Generator().manual_seed(2), torch.float64)
    jac = jacobian(flow, 0.3, x)
    assert jac.shape == (3, 12, 12)
    _, closed = flow.divergence(0.3, x, "closed-form")
    assert torch.allclose(jac.diagonal(dim1=-2, dim2=-1).sum(-1), closed, rtol=1e-9, atol=1e-9)
    eps = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(3)).double() * 2 - 1
    _, hutch = flow.divergence(0.3, x, "hutchinson", noise=eps)
    flat = eps.reshape(3, -1)
    assert torch.allclose(torch.einsum("bi,bij,bj->b", flat, jac, flat), hutch, rtol=1e-9, atol=1e-9)


def test_random_clusters_have_the_requested_density():
    g = torch.Generator().manual_seed(0)
    x = random_cluster(4000, 5, 3, 2.0, g)
    assert torch.allclose(x.mean(dim=-2), torch.zeros(4000, 3, dtype=torch.float64), atol=1e-12)
    # Positions uniform in a ball of radius 2, then centred: reference_radius inverts that.
    assert reference_radius(x) == pytest.approx(2.0, rel=0.02)
    assert (x.norm(dim=-1) < 4.0).all()
