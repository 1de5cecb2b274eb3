"""timing (paper B.1, Table 2): smoke per trainable model, ratio bookkeeping, budget planning,
interleaving. Wall-clock values are recorded, never asserted against a limit."""

from __future__ import annotations

import pytest
from conftest import run_task_smoke

from eqbench.errors import ConfigError, EqbenchError
from eqbench.runner import plan_cells
from eqbench.tasks.timing import model_config_for, ratio_stats
from eqbench.timing import TimingStats, budget_plan, interleaved_epochs

TRAINABLE = ["kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "en-flow", "se3-acf", "g-resflow"]


@pytest.mark.parametrize("model", TRAINABLE)
def test_smoke_every_trainable_model(model, tmp_path):
    results, table = run_task_smoke(
        "timing", model, "dw4", tmp_path,
        expect_metrics=("train_iteration_s", "train_iteration_s_std", "sample_iteration_s", "sample_iteration_s_std",
                        "train_ratio_to_reference", "sample_ratio_to_reference", "n_parameters"))
    # one cell per model; the simple gradient flow also gets its closed-form row
    variants = sorted(table["variant"].fillna("").unique())
    peers = model in ("se3-acf", "g-resflow")  # also timed against the E(n) CNF (tasks/timing.toml)
    assert variants == (["", "closed-form"] if model == "gradient-flow" else ["", "vs en-flow"] if peers else [""])
    table = table[table["variant"].fillna("") == ""]
    value = table.set_index("metric")["value"]
    params = next(c for c in results if c.config["params"]["estimators"] == "table-2").config["params"]
    for phase in ("train", "sample"):
        assert value[f"{phase}_iteration_s"] > 0
        assert value[f"{phase}_timed_iterations"] == params[f"{phase}_epochs"] * params[f"{phase}_iterations"]
        ratio = value[f"{phase}_ratio_to_reference"]
        if model == "kernel-flow":
            assert ratio == 1.0 and f"reference_{phase}_iteration_s" not in value
        else:  # the ratio is the ratio of the recorded means, measured in the same cell
            assert ratio == pytest.approx(value[f"{phase}_iteration_s"] / value[f"reference_{phase}_iteration_s"],
                                          rel=1e-12)


def test_estimators_axis_times_table_2_and_the_closed_form():
    """Table 2's estimators for the Table 2 row; the closed form for the gradient flow's second row
    (variant "closed-form"); no second row for a model whose default already is Table 2's."""
    plans = plan_cells("timing", "gradient-flow", "dw4", "smoke")
    by = {p.params["estimators"]: p for p in plans}
    assert set(by) == {"table-2", "closed-form"}
    assert by["closed-form"].params["variant"] == "closed-form" and by["table-2"].params["variant"] == ""
    assert model_config_for("gradient-flow", by["table-2"].params) == {"train_divergence": "hutchinson",
                                                                       "eval_divergence": "brute-force"}
    assert model_config_for("gradient-flow", by["closed-form"].params) == {"train_divergence": "exact",
                                                                           "eval_divergence": "exact"}
    for model in ("kernel-flow", "schnet-flow", "node"):
        assert [p.params["estimators"] for p in plan_cells("timing", model, "dw4", "smoke")] == ["table-2"]
        assert model_config_for(model, {"estimators": "closed-form"}) == {}
    with pytest.raises(EqbenchError, match="estimators = \"closed-form\" only, and model 'node'"):
        plan_cells("timing", "node", "dw4", "smoke", overrides={"estimators": ["closed-form"]})
    with pytest.raises(EqbenchError, match="estimators must be one of table-2, closed-form"):
        plan_cells("timing", "node", "dw4", "smoke", overrides={"estimators": "fast"})


def test_closed_form_models_are_refused():
    with pytest.raises(ConfigError, match="timing cannot run model 'gaussian': it is fitted in closed form"):
        plan_cells("timing", "gaussian", "dw4", "smoke")


@pytest.mark.parametrize("override, message", [
    ({"reference_model": "kernel-flw"}, "did you mean 'kernel-flow'"),
    ({"train_epochs": 1}, "train_epochs must be >= 2"),
    ({"warmup": 0}, "warmup"),
    ({"budget_s": 0}, "budget_s"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_settings_are_refused_before_work(override, message):
    with pytest.raises(EqbenchError, match=message):
        plan_cells("timing", "node", "dw4", "smoke", overrides=override)


def test_paper_profile_is_table_2():
    (plan,) = plan_cells("timing", "schnet-flow", "lj13", "paper")
    p = plan.params
    assert (p["batch_size"], p["train_epochs"], p["train_iterations"], p["sample_epochs"], p["sample_iterations"]) \
        == (64, 10, 10, 10, 10)
    assert p["reference_model"] == "kernel-flow"


def test_budget_plan_cuts_iterations_first_then_epochs():
    assert budget_plan(0.1, 10, 10, 100.0) == (10, 10)  # 10 s fits
    assert budget_plan(1.0, 10, 10, 50.0) == (10, 5)  # fewer iterations per epoch
    assert budget_plan(2.0, 10, 10, 20.0) == (10, 1)
    assert budget_plan(10.0, 10, 10, 30.0) == (3, 1)  # then fewer epochs
    assert budget_plan(100.0, 10, 10, 30.0) == (2, 1)  # never below 2 epochs of 1 iteration


def test_ratio_stats():
    ratio, std = ratio_stats([2.0, 4.0], [1.0, 1.0])
    assert ratio == 3.0 and std == pytest.approx(1.4142135623730951)
    assert ratio_stats([3.0], [1.5]) == (2.0, 0.0)
    with pytest.raises(ValueError):
        ratio_stats([1.0], [])


def test_interleaved_epochs_alternate_the_order():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    seconds = interleaved_epochs(steps, epochs=3, iterations={"a": 2, "b": 1})
    assert calls == ["a", "a", "b", "b", "a", "a", "a", "a", "b"]
    assert [len(v) for v in seconds.values()] == [3, 3] and all(s >= 0 for v in seconds.values() for s in v)


def test_timing_stats_quartiles():
    stats = TimingStats.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats.n, stats.median, stats.mean, stats.p25, stats.p75, stats.minimum) == (5, 3.0, 3.0, 2.0, 4.0, 1.0)
    assert stats.std == pytest.approx(1.5811388300841898)
    assert TimingStats.of([2.0]).std == 0.0


def test_reference_is_timed_when_the_model_differs_only_in_settings(tmp_path):
    """kernel-flow in float64 against the default (float32) kernel flow: a real ratio, not 1."""
    _, table = run_task_smoke("timing", "kernel-flow", "dw4", tmp_path, overrides={"model_config": {"dtype": "float64"}})
    value = table.set_index("metric")["value"]
    assert "reference_train_iteration_s" in value
    assert value["train_ratio_to_reference"] == pytest.approx(
        value["train_iteration_s"] / value["reference_train_iteration_s"], rel=1e-12)


def test_gradient_flow_is_timed_with_table_2_estimators_unless_told():
    """Table 2 (paper B.1) trains the simple gradient flow with Hutchinson and samples it by brute
    force; its closed-form default is timed only when model_config asks for it."""
    import eqbench

    paper = model_config_for("gradient-flow", {"model_config": {}})
    flow = eqbench.build_model("gradient-flow", "dw4", paper)
    assert (flow.train_divergence, flow.eval_divergence) == ("hutchinson", "brute-force")
    closed = model_config_for("gradient-flow", {"model_config": {"train_divergence": "exact",
                                                                 "eval_divergence": "exact"}})
    flow = eqbench.build_model("gradient-flow", "dw4", closed)
    assert (flow.train_divergence, flow.eval_divergence) == ("exact", "exact") and flow.has_closed_form_divergence
    assert model_config_for("kernel-flow", {"model_config": {"steps": 5}}) == {"steps": 5}


def test_reference_model_is_a_grid_axis():
    """A list of references gives one cell per reference, each named by its variant; the kernel
    flow's is the Table 2 row (no variant); a model is never timed against itself elsewhere."""
    plans = plan_cells("timing", "real-nvp", "dw4", "smoke", overrides={"reference_model": ["kernel-flow", "node"]})
    assert {p.params["reference_model"]: p.params["variant"] for p in plans} == {"kernel-flow": "", "node": "vs node"}
    # per model, as a profile sets it for the coupling flows
    table = {"default": "kernel-flow", "real-nvp": ["kernel-flow", "node"]}
    assert len(plan_cells("timing", "real-nvp", "dw4", "smoke", overrides={"reference_model": table})) == 2
    assert len(plan_cells("timing", "schnet-flow", "dw4", "smoke", overrides={"reference_model": table})) == 1
    own = plan_cells("timing", "node", "dw4", "smoke", overrides={"reference_model": ["kernel-flow", "node"]})
    assert [p.params["reference_model"] for p in own] == ["kernel-flow"]
    with pytest.raises(EqbenchError, match="its own reference_model"):
        plan_cells("timing", "node", "dw4", "smoke", overrides={"reference_model": "node"})
    both = plan_cells("timing", "gradient-flow", "dw4", "smoke", overrides={"reference_model": ["kernel-flow", "node"]})
    assert sorted(p.params["variant"] for p in both) == ["", "closed-form", "closed-form, vs node", "vs node"]
