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
from eqbench.runner import code_versions, plan_cells
from eqbench.tasks.base import REFERENCE_MODEL
from eqbench.tasks.metastable_states import REFERENCE_SETTINGS, VARIANTS, TASK, bin_label, parse_bin_label

TASK_NAME = "metastable-states"
MODELS = ("kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "gaussian", "en-flow", "se3-acf",
          "g-resflow")
#: Continuous flows run the smoke profile with 4 RK4 steps instead of 20 (5x cheaper).
CNF_MODELS = ("kernel-flow", "gradient-flow", "schnet-flow", "node", "en-flow")
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
    # The flow's one λ-mix step (λ = 0.5) evaluates kl_batch_size = 64 energies; ML none. Its data
    # cost what the training set cost: the 1,000 training-split rows searched for the minimum.
    assert _values(results, "flow", "energy_evaluations") == [64.0]
    assert _values(results, "flow", "energy_evaluations_training_data") == _values(
        results, "training", "energy_evaluations") == [1000 * 3000.0]
    assert _values(results, "training", "energy_evaluations_burn_in") == [500 * 40_001.0]
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
    # The eqbench sampling protocol only: tests/test_metastable_protocols.py runs both.
    results, _ = run_task_smoke(TASK_NAME, "kernel-flow", "lj13", tmp_path,
                                overrides={"model_config": {"steps": 4}, "sampling_protocol": "eqbench"},
                                expect_metrics=metrics + ("energy_evaluations", "structure_z"))
    assert len(results) == len(VARIANTS)
    for variant in VARIANTS:
        for step_total, *bins in zip(*(_values(results, variant, m) for m in
                                       ("distinct_minima",) + tuple(f"distinct_minima_{b}" for b in LJ_BINS))):
            assert sum(bins) <= step_total  # minima above -60 count in the total only
            assert bins[2] <= 1  # one state below -80: the icosahedral global minimum
        assert all(e > -83.0897 for e in _values(results, variant, "lowest_minimum_energy"))
    # The training set of LJ-13 is 100 MCMC samples: it reaches the icosahedron (~14% of samples).
    assert _values(results, "training", "distinct_minima_minf_m80") == [1.0]
    # 20 chains x 5 samples x stride 10, and 20 x (burn-in 100 + the start's energy), per round.
    assert _values(results, "mcmc-long", "energy_evaluations") == [20 * 5 * 10] * 2
    assert _values(results, "mcmc-long", "energy_evaluations_burn_in") == [20 * 101] * 2
    assert _values(results, "flow", "energy_evaluations") == [0.0]  # maximum likelihood only


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
    cells = plan_cells(TASK_NAME, "node", "lj13", "paper", overrides={"eps": 0.005, "sampling_protocol": "eqbench"})
    assert [c.params["variant"] for c in cells] == list(VARIANTS)
    from eqbench.tasks.metastable_states import Settings

    lj = eqbench.get_system("lj13")
    s = Settings.resolve(cells[3].params, lj)  # mcmc-long: a reference cell, without the flow's settings
    assert s.eps == 0.005 and s.rounds == 10
    assert Settings.resolve(cells[0].params, lj).n_samples == 1000  # the flow cell has them
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
    assert TASK.grid_axes == ("variant", "sampling_protocol")
    assert set(TASK.profiles()) == {"smoke", "quick", "paper", "calibrate"}


def test_plot_reads_the_collected_csv_and_shows_each_reference_once(tmp_path) -> None:
    """Flow rows of two models and the training reference (one shared cell of model "reference"):
    the figure shows each flow under its model's name and the reference once, drawn from
    results.csv alone. (Before reference cells were shared, each model's run carried its own copy
    of the references and the plot dropped all but one; now there is one copy to begin with.)"""
    import pandas as pd

    from eqbench.plots import write_task_plots
    from eqbench.records import RECORD_COLUMNS
    from eqbench.tasks.metastable_states import _count_table, _method

    rows = []
    for model, flow_counts in (("kernel-flow", (40, 44)), ("node", (10, 12))):
        for step, count in enumerate(flow_counts):
            rows.append({"model": model, "variant": "flow", "step": step, "value": count})
    rows.append({"model": REFERENCE_MODEL, "variant": "training", "step": 0, "value": 7})
    table = pd.DataFrame([{**{c: "" for c in RECORD_COLUMNS}, "task": TASK_NAME, "system": "lj13", "seed": 0,
                           "profile": "quick", "status": "ok", "metric": f"distinct_minima_{bin_label(-80.0, -70.0)}",
                           **row} for row in rows])
    table = pd.concat([table, table.assign(metric="distinct_minima")], ignore_index=True)
    table["method"] = [_method(v, m) for v, m in zip(table["variant"], table["model"])]
    assert len(table[table["method"] == "training"]) == 2  # one per metric
    labels, mean, std = _count_table(table, "distinct_minima", ["kernel-flow", "node", "training"])
    assert labels == ["[−80, −70)"]
    assert mean.tolist() == [[42.0, 11.0, 7.0]]
    assert std[0, 0] == pytest.approx(8 ** 0.5) and std[0, 2] == 0.0  # sample std of 40, 44

    table.drop(columns="method").to_csv(tmp_path / "results.csv", index=False)
    written = write_task_plots(TASK_NAME, tmp_path)
    assert sorted(p.name for p in written) == ["metastable_counts_lj13_quick.png", "metastable_counts_lj13_quick.svg"]


# -- references shared by every model ------------------------------------------------------------


def test_reference_cells_are_the_same_cells_whatever_the_model() -> None:
    """The training set and the MCMC references do not depend on the model: planned for any model,
    with any per-model settings, they are the same cells (model "reference", only the settings
    they use, no model code version); the flow cell stays the model's own."""
    per_model = {"model_config": {"default": {}, "kernel-flow": {"steps": 4}}, "lr": {"default": 5e-3, "node": 1e-3},
                 "ml_iterations": {"default": 3, "node": 5}}
    kernel = plan_cells(TASK_NAME, "kernel-flow", "dw4", "smoke", overrides=per_model)
    node = plan_cells(TASK_NAME, "node", "dw4", "smoke", overrides=per_model)
    assert [c.model for c in kernel] == ["kernel-flow", REFERENCE_MODEL, REFERENCE_MODEL, REFERENCE_MODEL]
    assert kernel[0].cell_id != node[0].cell_id
    assert [c.cell_id for c in kernel[1:]] == [c.cell_id for c in node[1:]]
    for cell in kernel[1:]:
        assert set(cell.params) <= REFERENCE_SETTINGS and "model_config" not in cell.params
        assert cell.code == code_versions(TASK_NAME, None) and "model" not in cell.code
    # A reference setting still makes a different reference cell.
    other = plan_cells(TASK_NAME, "node", "dw4", "smoke", overrides={"eps": 0.02})
    assert not {c.cell_id for c in other[1:]} & {c.cell_id for c in node[1:]}
    with pytest.raises(ConfigError, match="names the model-independent reference cells"):
        plan_cells(TASK_NAME, REFERENCE_MODEL, "dw4")


def test_reference_settings_and_flow_settings_cover_every_profile_setting() -> None:
    """Every setting is either used by the references (kept in their cells) or by the flow only
    (dropped from them): a new setting must be placed in one of the two sets, or a reference
    cell would silently ignore it (or depend on the model)."""
    from eqbench.config import TRAINING_DEFAULTS
    from eqbench.tasks.metastable_states import _FLOW_ONLY

    for name, profile in TASK.profiles().items():
        settings = set(profile) - {"seeds"}
        assert settings <= REFERENCE_SETTINGS | set(_FLOW_ONLY) | set(TRAINING_DEFAULTS), (name, settings)
        assert REFERENCE_SETTINGS <= settings, name


def test_sweep_runs_each_reference_once_and_a_later_run_reuses_them(tmp_path, monkeypatch) -> None:
    """A sweep over two models plans and runs each reference cell once (3 reference + 2 flow cells,
    not 8); a later run of a third model reads the three back (one new cell file: its flow); the
    report's table and the figure show each reference once beside the three flows."""
    import re

    from eqbench import report
    from eqbench.plots import write_task_plots
    from eqbench.records import CellStore
    from eqbench.sweep import plan_sweep, sweep
    from eqbench.tasks import metastable_states

    overrides = {"model_config": {"default": {}, "kernel-flow": {"steps": 4}}}
    plan, results = sweep(TASK_NAME, ["kernel-flow", "gaussian"], ["dw4"], "smoke", overrides=overrides,
                          results_dir=tmp_path, progress=False)
    assert sorted(c.model for c in plan.todo) == ["gaussian", "kernel-flow"] + [REFERENCE_MODEL] * 3
    assert all(r.status == "ok" for r in results), [r.reason for r in results]
    cells_dir = tmp_path / "cells" / TASK_NAME
    files = {p.stem for p in cells_dir.glob("*.json")}
    assert len(files) == 5
    store = CellStore(tmp_path)
    by_variant = {store.read(TASK_NAME, f).config["params"]["variant"]: store.read(TASK_NAME, f) for f in files
                  if store.read(TASK_NAME, f).config["model"] == REFERENCE_MODEL}
    assert sorted(by_variant) == ["mcmc-long", "mcmc-short", "training"]
    assert all(r.model == REFERENCE_MODEL for c in by_variant.values() for r in c.records)
    assert not plan_sweep(TASK_NAME, ["kernel-flow", "gaussian"], ["dw4"], "smoke", overrides=overrides,
                          results_dir=tmp_path).todo  # all finished, references included

    later = eqbench.run(TASK_NAME, "real-nvp", "dw4", "smoke", overrides=overrides, results_dir=tmp_path,
                        progress=False)
    assert [c.status for c in later] == ["ok"] * 4
    new = {p.stem for p in cells_dir.glob("*.json")} - files
    assert [store.read(TASK_NAME, f).config["model"] for f in new] == ["real-nvp"]
    for cell in later[1:]:  # read back, not rerun
        assert cell.started_at == by_variant[cell.config["params"]["variant"]].started_at

    table = store.collect()
    html = report.render_report(tmp_path)
    meta = html.split('id="task-metastable-states"')[1].split("</section>")[0]
    results_table = re.search(r'<table class="results">.*?</table>', meta, re.S).group(0)
    shown = [tuple(re.findall(r"<td[^>]*>(.*?)</td>", row)[1:3]) for row in re.findall(r"<tr>(.*?)</tr>",
                                                                                        results_table, re.S)]
    shown = [row for row in shown if row]
    assert sorted(shown) == sorted([("gaussian", "flow"), ("kernel-flow", "flow"), ("real-nvp", "flow"),
                                    (REFERENCE_MODEL, "mcmc-long"), (REFERENCE_MODEL, "mcmc-short"),
                                    (REFERENCE_MODEL, "training")])
    drawn: list[list[str]] = []
    original = metastable_states._bars

    def spy(ax, labels, methods, *args):
        drawn.append(list(methods))
        return original(ax, labels, methods, *args)

    monkeypatch.setattr(metastable_states, "_bars", spy)
    assert write_task_plots(TASK_NAME, tmp_path, table=table)
    assert drawn[0] == ["gaussian", "kernel-flow", "real-nvp", "training", "mcmc-short", "mcmc-long"]
