"""energy-training (Midgley et al. 2023): reverse-KL training from the energy alone, reverse and
forward ESS, no training data read, failed cells, known answers, profiles, report table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli, run_task_smoke

import eqbench
from eqbench.errors import ConfigError
from eqbench.records import CellStore
from eqbench.runner import plan_cells
from eqbench.tasks.energy_training import TASK
from eqbench.tasks.reporting import with_settings

SCALARS = ("n_parameters", "train_wall_s", "iterations_done", "final_kl_loss", "sample_wall_s", "score_wall_s",
           "n_samples", "n_samples_zero_weight", "n_samples_undefined", "ess_fraction", "forward_ess_fraction",
           "forward_ess_fraction_undefined", "mean_energy_flow", "mean_energy_flow_std", "mean_energy_reweighted",
           "mean_energy_reweighted_std", "mean_energy_mcmc", "mean_energy_mcmc_std", "energy_w1_flow",
           "energy_w1_reweighted", "energy_w2_flow", "energy_w2_reweighted", "distance_w2_flow",
           "distance_w2_reweighted", "kl_estimate", "nll_test", "forward_log_w_std", "dist_tv_flow",
           "dist_tv_reweighted", "coord_w2_flow", "coord_w2_aligned_flow", "sample_metrics_wall_s")
STEPPED = ("kl_loss", "energy_edge", "energy_hist_flow", "energy_hist_reweighted", "energy_hist_mcmc")


def _scalars(table: pd.DataFrame) -> dict[str, tuple[float, str]]:
    flat = table[table["step"].isna()]
    assert not flat["metric"].duplicated().any()
    return {r["metric"]: (float(r["value"]), str(r["unit"])) for _, r in flat.iterrows()}


@pytest.mark.parametrize("model", ["kernel-flow", "real-nvp", pytest.param("se3-acf", marks=pytest.mark.slow)])
def test_smoke_dw4_records_units_and_no_training_data(model, tmp_path, monkeypatch):
    """Every record with a unit that says what it is; the only reference data read is the test
    split (reverse KL at λ = 1 needs none); the report table has one row for the cell."""
    from eqbench.data import store

    read: list[str] = []
    original = store.load_pool

    def spy(system, split, *args, **kwargs):
        read.append(split)
        return original(system, split, *args, **kwargs)

    monkeypatch.setattr(store, "load_pool", spy)
    results, table = run_task_smoke("energy-training", model, "dw4", tmp_path, expect_metrics=SCALARS + STEPPED)
    assert read and set(read) == {"test"}, read
    assert TASK.splits_read() == ("test",)
    values = _scalars(table)
    iw = model in ("real-nvp", "se3-acf")  # log_prob an IW estimate of the marginal: extended-space weights
    assert ("nll_test_k1_gap" in values) == iw
    assert values["iterations_done"][0] == results[0].config["params"]["iterations"] == 4
    n_samples, n_test = (results[0].config["params"][k] for k in ("n_samples", "n_test"))
    for metric in ("ess_fraction", "forward_ess_fraction"):
        assert 0.0 <= values[metric][0] <= 1.0, metric
    assert values["ess_fraction"][0] >= 1.0 / n_samples - 1e-12
    # Units: estimator, sample count and split; the W2s are not squared; IW flows say one-draw.
    assert f"reverse ESS of the {n_samples} flow samples" in values["ess_fraction"][1]
    forward_unit = values["forward_ess_fraction"][1]
    assert f"{n_test} of {n_test} MCMC test-split" in forward_unit
    assert ("extended-space one-draw" in forward_unit) == iw and ("exact log q" in forward_unit) != iw
    assert ("IW estimate K=" in values["nll_test"][1]) == iw
    for metric in ("energy_w2_flow", "energy_w2_reweighted", "distance_w2_flow", "distance_w2_reweighted"):
        assert "not squared" in values[metric][1] and "test-split" in values[metric][1], metric
    assert "W1" in values["energy_w1_flow"][1] and "test-split" in values["mean_energy_mcmc"][1]
    assert "KL(q‖p) - log Z" in values["kl_estimate"][1]
    # W1 <= W2 for the same pair of distributions (Jensen).
    assert values["energy_w1_flow"][0] <= values["energy_w2_flow"][0] + 1e-9
    # The field's sample-quality metrics: TV in (0, 1] (two finite sets never match exactly),
    # coordinate W2s positive, finite, not squared, on the profile's subsample sizes.
    for metric in ("dist_tv_flow", "dist_tv_reweighted"):
        assert 0.0 < values[metric][0] <= 1.0 and "test-split" in values[metric][1], metric
    for metric, count in (("coord_w2_flow", 100), ("coord_w2_aligned_flow", 20)):
        value, unit = values[metric]
        assert 0.0 < value < math.inf and "not squared" in unit and f"{count}x{count} configurations" in unit, metric
    assert -24.5 < values["mean_energy_mcmc"][0] < -20.5  # the DW-4 test set
    steps = table.loc[table["metric"] == "kl_loss", "step"].astype(int).tolist()
    assert steps == [0, 3]  # logged every 10 iterations and at the last
    plots = tmp_path / "plots" / "energy-training"
    assert (plots / "kl_training_dw4.png").stat().st_size > 0 and (plots / "energy_histograms_dw4.svg").exists()

    rows = with_settings(CellStore(tmp_path).collect())
    tables = TASK.report_section().extra_tables(rows[rows["status"] == "ok"], pd.DataFrame())
    assert len(tables) == 1 and tables[0].caption.startswith("dw4") and len(tables[0].rows) == 1
    row = dict(zip(tables[0].header, tables[0].rows[0]))
    assert row["model"] == model and float(row["reverse ESS"]) == pytest.approx(values["ess_fraction"][0], rel=1e-3)


def test_failed_cell_on_non_finite_training(tmp_path):
    """A learning rate of 1e30 throws the parameters to ~1e30 in one step: the next loss is not
    finite, and the cell fails with the training loop's reason instead of scoring garbage."""
    cells = eqbench.run("energy-training", "kernel-flow", "dw4", "smoke", overrides={"lr": 1e30},
                        results_dir=tmp_path, progress=False)
    assert [c.status for c in cells] == ["failed"]
    assert "non-finite" in cells[0].reason and "FloatingPointError" in cells[0].reason
    ok = eqbench.run("energy-training", "kernel-flow", "dw4", "smoke", results_dir=tmp_path / "ok", progress=False)
    assert [c.status for c in ok] == ["ok"]  # the same cell at the profile's lr trains


def test_harmonic_prior_flow_known_answers(tmp_path):
    """On ``harmonic`` (u = ½|x|² on U, k = (N-1) D = 9 degrees of freedom) the target is the
    prior and ``PriorFlow`` stays the prior through training, so by hand: every log-weight is
    ½ k log 2π = log Z, reverse and forward ESS are 1, ``kl_estimate`` = u + log q = -log Z =
    -8.270 for every sample, the test NLL is mean ½|x|² + log Z, and the reweighted mean energy
    is k/2 within its standard error. A sign error in log w or a missing Gaussian constant fails."""
    _, table = run_task_smoke("energy-training", "known_answer_models:prior_flow", "harmonic", tmp_path,
                              expect_metrics=SCALARS + STEPPED)
    values = {k: v for k, (v, _) in _scalars(table).items()}
    k = eqbench.get_system("harmonic").n_dof
    log_z = 0.5 * k * math.log(2 * math.pi)
    assert (k, round(log_z, 3)) == (9, 8.27)
    assert values["ess_fraction"] == pytest.approx(1.0, abs=1e-12)
    assert values["forward_ess_fraction"] == pytest.approx(1.0, abs=1e-12)
    assert values["forward_log_w_std"] < 1e-9  # every test log-weight is log Z
    assert values["kl_estimate"] == pytest.approx(-log_z, abs=1e-9)
    assert values["final_kl_loss"] == pytest.approx(-log_z, abs=1e-9)
    test = eqbench.load_data("harmonic", "test", n=200, seed=0).numpy()
    assert values["nll_test"] == pytest.approx(0.5 * (test**2).sum(axis=(1, 2)).mean() + log_z, abs=1e-9)
    se = math.sqrt(0.5 * k / 200)
    assert abs(values["mean_energy_reweighted"] - 0.5 * k) < 4 * se
    assert abs(2 * values["mean_energy_reweighted"] - 0.5 * k) > 4 * se


def test_harmonic_prior_flow_reverse_and_forward_kl_are_zero(tmp_path):
    """With log Z (AIS, exact on harmonic where the base is the target) both KLs of the prior
    flow, which is the target, vanish: reverse_kl = kl_estimate + log Z = 0 exactly, kl_test =
    NLL_test - H(p) = 0 within its error. kl_estimate - log Z (a sign error) is -16.5."""
    _, table = run_task_smoke("energy-training", "known_answer_models:prior_flow", "harmonic", tmp_path,
                              overrides={"kl_divergence": True},
                              expect_metrics=("reverse_kl", "kl_test", "kl_test_stderr"))
    values = {k: v for k, (v, _) in _scalars(table).items()}
    log_z = 0.5 * eqbench.get_system("harmonic").n_dof * math.log(2 * math.pi)
    assert values["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(values["kl_estimate"] - log_z) > 16
    assert abs(values["kl_test"]) < 4 * values["kl_test_stderr"] < 2.0


@pytest.mark.parametrize("override, message", [
    ({"method": "fab"}, "not built"),
    ({"method": "forward-kl"}, "unknown method"),
    ({"iterations": 0}, "iterations"),
    ({"n_test": -1}, "n_test"),
    ({"solver_steps": -2}, "solver_steps"),
])
def test_bad_settings_are_refused_before_work(override, message):
    with pytest.raises(ConfigError, match=message):
        plan_cells("energy-training", "kernel-flow", "dw4", "smoke", overrides=override)


def test_models_by_capability_and_profiles():
    with pytest.raises(ConfigError, match="cannot run model 'gaussian'.*closed form"):
        plan_cells("energy-training", "gaussian", "dw4", "smoke")
    with pytest.raises(ConfigError, match="does not support system 'dw2'"):
        plan_cells("energy-training", "kernel-flow", "dw2", "smoke")
    quick = plan_cells("energy-training", "real-nvp", "lj13", "quick")
    assert sorted(c.seed for c in quick) == [0, 1, 2]
    paper = plan_cells("energy-training", "kernel-flow", "dw4", "paper")[0].params
    # Midgley et al.'s DW-4 budget: 20,000 AIS passes x 8 updates, batch 128, Adam peak lr 2e-4.
    assert (paper["iterations"], paper["kl_batch_size"], paper["optimizer"], paper["lr"]) == (160000, 128, "adam", 2e-4)
    assert paper["method"] == "reverse-kl" and paper["n_samples"] == 10000
    # The peers train at their authors' learning rates (as in bg-reweighting).
    assert plan_cells("energy-training", "se3-acf", "dw4", "quick")[0].params["lr"] == 2e-4


def test_describe_lists_the_settings():
    out = run_cli("describe", "energy-training")
    assert out.returncode == 0, out.stderr
    assert "forward ESS" in out.stdout and "method=reverse-kl" in out.stdout and "kl_batch_size" in out.stdout


def test_smoke_lj13_kernel_flow(tmp_path):
    """LJ-13 runs end to end; its MCMC reference is LJ-13's (ordered-pair energy, ⟨u⟩ near -43 kT)."""
    _, table = run_task_smoke("energy-training", "kernel-flow", "lj13", tmp_path,
                              overrides={"n_samples": 100, "n_test": 100}, expect_metrics=SCALARS + STEPPED)
    values = {k: v for k, (v, _) in _scalars(table).items()}
    assert -50.0 < values["mean_energy_mcmc"] < -35.0
    assert values["n_samples"] == 100 and 0.0 <= values["forward_ess_fraction"] <= 1.0
