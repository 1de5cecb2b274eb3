"""The metastable-states task (paper §7.5, Table 1, Fig. 7): smoke runs of every supported model,
the reference rows' meaning, settings, refusals and the plot's helpers.

The clustering itself is tested on hand-built configurations in tests/test_minima.py.
"""

from __future__ import annotations

import math

import pytest
from conftest import run_task_smoke

import eqbench
from eqbench.errors import ConfigError
from eqbench.runner import plan_cells
from eqbench.tasks.metastable_states import VARIANTS, TASK, bin_label, parse_bin_label

TASK_NAME = "metastable-states"
MODELS = ("kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "gaussian")
#: Continuous flows run the smoke profile with 4 RK4 steps instead of 20 (5x cheaper).
CNF_MODELS = ("kernel-flow", "gradient-flow", "schnet-flow", "node")
ROUND_METRICS = ("distinct_minima", "distinct_minima_eps_half", "distinct_minima_eps_double", "n_samples",
                 "n_nonfinite", "n_unconverged", "n_saddles", "n_minima", "lowest_minimum_energy")
LJ_BINS = ("m70_m60", "m80_m70", "minf_m80")
#: The five DW-4 minima (SPEC §2).
DW4_MINIMA = (-25.7922, -25.3124, -24.3524, -23.4654, -21.0665)


def _values(results, variant: str, metric: str) -> list[float]:
    return [r.value for cell in results for r in cell.records if r.variant == variant and r.metric == metric]


def _overrides(model: str) -> dict:
    return {"model_config": {"steps": 4}} if model in CNF_MODELS else {}


def test_every_registered_model_is_covered() -> None:
    """A newly registered model must be added to MODELS (and so to the smoke tests)."""
    assert {e.name for e in eqbench.list_models()} == set(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_smoke_dw4(model: str, tmp_path) -> None:
    results, table = run_task_smoke(TASK_NAME, model, "dw4", tmp_path, overrides=_overrides(model),
                                    expect_metrics=ROUND_METRICS + ("new_minima", "structure_energy", "eps"))
    assert {cell.config["params"]["variant"] for cell in results} == set(VARIANTS)
    assert set(table["variant"]) == set(VARIANTS)
    # Counts are whole numbers, each round accounts for every sample, rounds are numbered.
    for cell in results:
        by_step: dict[int, dict[str, float]] = {}
        for r in cell.records:
            if r.metric.startswith(("distinct_minima", "new_minima", "n_")) and r.metric != "new_minima_sample_fraction":
                assert r.value == int(r.value) and r.value >= 0, r
            if r.step is not None and r.metric in ROUND_METRICS:
                by_step.setdefault(r.step, {})[r.metric] = r.value
        for counts in by_step.values():
            dropped = counts["n_nonfinite"] + counts["n_unconverged"] + counts["n_saddles"]
            assert counts["n_minima"] + dropped == counts["n_samples"]
            assert 1 <= counts["distinct_minima"] <= min(counts["n_minima"], 5)
    # Round steps: 2 rounds for samplers, one count of the training set.
    assert sorted({r.step for c in results for r in c.records if r.metric == "distinct_minima"
                   and r.variant == "flow"}) == [0, 1]
    assert _values(results, "training", "distinct_minima") == [1.0]
    if model == "kernel-flow":
        _check_dw4_references(results)


def _check_dw4_references(results) -> None:
    """What the references mean on DW-4: the training set is one noisy copy of the global
    minimum (rank 0), so it reaches exactly that minimum; 100 equilibrium samples reach most of
    the five minima and only those; the structures are the minima found."""
    assert _values(results, "training", "lowest_minimum_energy") == pytest.approx([DW4_MINIMA[0]], abs=1e-3)
    assert _values(results, "training", "structure_energy") == pytest.approx([DW4_MINIMA[0]], abs=1e-3)
    for variant in ("mcmc-short", "mcmc-long"):
        assert min(_values(results, variant, "distinct_minima")) >= 3
        energies = _values(results, variant, "structure_energy")
        assert all(min(abs(e - m) for m in DW4_MINIMA) < 1e-3 for e in energies), energies
        assert len(_values(results, variant, "structure_x")) == 4 * len(energies)
        # New minima are exactly the ones other than the training minimum.
        for distinct, new in zip(_values(results, variant, "distinct_minima"), _values(results, variant, "new_minima")):
            assert new == distinct - 1


def test_smoke_lj13_kernel_flow(tmp_path) -> None:
    metrics = ROUND_METRICS + tuple(f"distinct_minima_{b}" for b in LJ_BINS) + tuple(f"new_minima_{b}" for b in LJ_BINS)
    results, _ = run_task_smoke(TASK_NAME, "kernel-flow", "lj13", tmp_path, overrides={"model_config": {"steps": 4}},
                                expect_metrics=metrics + ("mcmc_energy_evaluations", "structure_z"))
    for variant in VARIANTS:
        for step_total, *bins in zip(*(_values(results, variant, m) for m in
                                       ("distinct_minima",) + tuple(f"distinct_minima_{b}" for b in LJ_BINS))):
            assert sum(bins) <= step_total  # minima above -60 count in the total only
            assert bins[2] <= 1  # one state below -80: the icosahedral global minimum
        assert all(e > -83.0897 for e in _values(results, variant, "lowest_minimum_energy"))
    # The training set of LJ-13 is 100 MCMC samples: it reaches the icosahedron (~14% of samples).
    assert _values(results, "training", "distinct_minima_minf_m80") == [1.0]
    assert _values(results, "mcmc-long", "mcmc_energy_evaluations") == [20 * (100 + 5 * 10)] * 2


def test_unsupported_system_is_refused_before_any_work(cli, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"does not support system 'dw2'; supported: dw4, lj13"):
        plan_cells(TASK_NAME, "kernel-flow", "dw2")
    out = cli("run", "--task", TASK_NAME, "--model", "kernel-flow", "--system", "dw2", "--results", str(tmp_path))
    assert out.returncode == 2
    assert "does not support system 'dw2'" in out.stderr
    assert not (tmp_path / "cells").exists()


@pytest.mark.parametrize(("override", "message"), [
    ({"variant": ["flows"]}, r"unknown variant 'flows'.*valid: flow, training, mcmc-short, mcmc-long"),
    ({"eps": {"dw4": 0.01}}, r"setting eps gives no value for system 'lj13'"),
    ({"eps": -1.0}, r"eps must be a positive number"),
    ({"training_set": "noise"}, r"unknown training_set 'noise'; valid: minimum, mcmc"),
    ({"mcmc_stride": "auto"}, r"mcmc_stride \(or 'protocol'\) must be an integer >= 1"),
    ({"energy_bins": [[-60.0, -70.0]]}, r"low < high"),
    ({"mcmc_short_samples": 20000}, r"mcmc_short_samples must be at most 10000"),
    ({"ml_iterations": 0, "mix_iterations": 0}, r"ml_iterations \+ mix_iterations must be >= 1"),
])
def test_invalid_settings_are_refused(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_cells(TASK_NAME, "kernel-flow", "dw4", "smoke", overrides=override)


def test_settings_resolve_per_system_and_plain_values() -> None:
    cells = plan_cells(TASK_NAME, "node", "lj13", "paper", overrides={"eps": 0.005})
    assert [c.params["variant"] for c in cells] == list(VARIANTS)
    from eqbench.tasks.metastable_states import Settings

    lj = eqbench.get_system("lj13")
    s = Settings.resolve(cells[3].params, lj)
    assert s.eps == 0.005 and s.n_samples == 1000 and s.rounds == 10
    protocol = lj.data_protocol  # "protocol": the reference data's Metropolis settings
    assert (s.mcmc_chains, s.mcmc_burn_in, s.mcmc_stride) == (protocol.n_chains, protocol.burn_in, protocol.stride)
    assert (s.mcmc_chains, s.mcmc_burn_in, s.mcmc_stride) == (200, 65000, 4000)
    assert s.energy_bins == ((-70.0, -60.0), (-80.0, -70.0), (-math.inf, -80.0))
    dw = Settings.resolve(cells[0].params, eqbench.get_system("dw4"))
    assert dw.training_set == "minimum" and dw.n_samples == 10000 and dw.energy_bins == ()
    assert dw.structure_bins == ((-math.inf, math.inf),)


def test_unrecoverable_train_minimum_fails_the_cell_with_its_reason(tmp_path) -> None:
    """DW-4 has five minima: asking for the sixth is a failed cell that says why."""
    cells = eqbench.run(TASK_NAME, "gaussian", "dw4", "smoke", overrides={"train_minimum": 7, "variant": ["training"]},
                        results_dir=tmp_path, progress=False)
    assert [c.status for c in cells] == ["failed"]
    assert "train_minimum must be below 5" in cells[0].reason


def test_bin_labels_round_trip() -> None:
    for low, high in ((-70.0, -60.0), (-80.0, -70.0), (-math.inf, -80.0), (-72.5, 3.0), (-math.inf, math.inf)):
        label = bin_label(low, high)
        assert label.replace("_", "").replace(".", "").isalnum()
        assert parse_bin_label(f"new_minima_eps_half_{label}") == ("new_minima_eps_half", low, high)
    assert bin_label(-80.0, -70.0) == "m80_m70" and bin_label(-math.inf, -80.0) == "minf_m80"
    assert parse_bin_label("distinct_minima") is None
    assert parse_bin_label("distinct_minima_eps_half") is None


def test_task_metadata() -> None:
    assert TASK.systems == ("dw4", "lj13")
    assert TASK.grid_axes == ("variant",)
    assert set(TASK.profiles()) == {"smoke", "quick", "paper", "calibrate"}


def test_plot_reads_the_collected_csv_and_keeps_one_copy_of_each_reference(tmp_path) -> None:
    """Two models ran the training reference: the figure shows it once, each flow under its
    model's name, and draws from results.csv alone."""
    import pandas as pd

    from eqbench.plots import write_task_plots
    from eqbench.records import RECORD_COLUMNS
    from eqbench.tasks.metastable_states import _count_table, _dedupe_references

    rows = []
    for model, flow_counts in (("kernel-flow", (40, 44)), ("node", (10, 12))):
        for step, count in enumerate(flow_counts):
            rows.append({"model": model, "variant": "flow", "step": step, "value": count})
        rows.append({"model": model, "variant": "training", "step": 0, "value": 7})
    table = pd.DataFrame([{**{c: "" for c in RECORD_COLUMNS}, "task": TASK_NAME, "system": "lj13", "seed": 0,
                           "profile": "quick", "status": "ok", "metric": f"distinct_minima_{bin_label(-80.0, -70.0)}",
                           **row} for row in rows])
    table = pd.concat([table, table.assign(metric="distinct_minima")], ignore_index=True)
    deduped = _dedupe_references(table)
    assert len(deduped[deduped["method"] == "training"]) == 2  # one per metric, not one per model
    labels, mean, std = _count_table(deduped, "distinct_minima", ["kernel-flow", "node", "training"])
    assert labels == ["[−80, −70)"]
    assert mean.tolist() == [[42.0, 11.0, 7.0]]
    assert std[0, 0] == pytest.approx(8 ** 0.5) and std[0, 2] == 0.0  # sample std of 40, 44

    table.to_csv(tmp_path / "results.csv", index=False)
    written = write_task_plots(TASK_NAME, tmp_path)
    assert sorted(p.name for p in written) == ["metastable_counts_lj13_quick.png", "metastable_counts_lj13_quick.svg"]
