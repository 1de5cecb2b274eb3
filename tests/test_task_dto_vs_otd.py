"""dto-vs-otd (paper §7.2, Fig. 4): smoke per trainable CNF, the NFE bookkeeping, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_task_smoke

import eqbench
from eqbench.errors import ConfigError
from eqbench.runner import plan_cells
from eqbench.tasks.dto_vs_otd import ForwardNfeLog, growth

TRAINABLE_CNFS = ["kernel-flow", "gradient-flow", "schnet-flow", "node", "en-flow"]


@pytest.mark.parametrize("model", TRAINABLE_CNFS)
def test_smoke_every_trainable_cnf(model, tmp_path):
    results, table = run_task_smoke(
        "dto-vs-otd", model, "dw4", tmp_path,
        expect_metrics=("nfe_per_iteration", "nfe_forward_per_iteration", "nfe_growth", "nll_test",
                        "nll_test_train_solver", "train_loss", "eval_nfe_per_solve"))
    assert sorted(cell.config["params"]["variant"] for cell in results) == ["dto", "otd"]
    iterations = results[0].config["params"]["iterations"]
    nfe = table[table["metric"] == "nfe_per_iteration"]
    forward = table[table["metric"] == "nfe_forward_per_iteration"]
    # DTO: 20 RK4 steps of 4 evaluations each, every iteration, backward through autograd.
    dto_nfe = nfe[nfe["variant"] == "dto"]
    assert len(dto_nfe) == iterations and (dto_nfe["value"] == 80).all()
    assert (forward[forward["variant"] == "dto"]["value"] == 80).all()
    # OTD: dopri5 takes at least one step (6 evaluations + 1), and the adjoint adds evaluations.
    otd_total = nfe[nfe["variant"] == "otd"].set_index("step")["value"]
    otd_forward = forward[forward["variant"] == "otd"].set_index("step")["value"]
    assert (otd_forward >= 7).all() and (otd_total > otd_forward).all()
    # Both are scored with the same reference solver, stated in the unit; the NLL is plausible.
    nll = table[table["metric"] == "nll_test"]
    assert len(nll) == 2 and nll["unit"].str.contains("dopri5 atol=1e-10").all()
    assert nll["value"].between(0.0, 40.0).all(), nll["value"].tolist()
    own = table[table["metric"] == "nll_test_train_solver"].set_index("variant")["unit"]
    assert "RK4 20 steps" in own["dto"] and "dopri5" in own["otd"]


@pytest.mark.parametrize("model, system, message", [
    ("kernel-flow", "lj13", "does not support system 'lj13'; supported: dw4"),
    ("real-nvp", "dw4", "cannot run model 'real-nvp': it is not a continuous flow"),
    ("gaussian", "dw4", "cannot run model 'gaussian'"),
])
def test_unsupported_combinations_are_refused(model, system, message):
    with pytest.raises(ConfigError, match=message):
        plan_cells("dto-vs-otd", model, system, "smoke")


@pytest.mark.parametrize("override, message", [
    ({"model_config": {"solver": "otd"}}, "must not set 'solver'.*grid axis"),
    ({"model_config": {"dtype": "float32"}}, "must not set 'dtype'"),
    ({"solver": ["rk4"]}, "solver must be one of dto, otd"),
    ({"eval_solver": "euler"}, "eval_solver must be one of dto, otd"),
    ({"dtype": "float16"}, "dtype must be float32 or float64"),
    ({"iterations": 0}, "iterations"),
])
def test_bad_settings_are_refused_before_work(override, message):
    with pytest.raises(ConfigError, match=message):
        plan_cells("dto-vs-otd", "kernel-flow", "dw4", "smoke", overrides=override)


def test_profiles_cover_both_solvers_and_the_papers_runs():
    quick = plan_cells("dto-vs-otd", "kernel-flow", "dw4", "quick")
    assert sorted(c.params["variant"] for c in quick) == ["dto", "otd"]
    paper = plan_cells("dto-vs-otd", "kernel-flow", "dw4", "paper")
    assert len(paper) == 6 and {c.seed for c in paper} == {0, 1, 2}  # 3 runs per method (C.7)
    assert {c.params["n_test"] for c in paper} == {10000}


def test_growth_compares_the_first_and_last_tenth():
    first, last, ratio = growth([10.0] * 10 + [15.0] * 80 + [20.0] * 10)
    assert (first, last, ratio) == (10.0, 20.0, 2.0)
    assert growth([80.0, 80.0]) == (80.0, 80.0, 1.0)
    assert math.isnan(growth([0.0, 5.0])[2])
    with pytest.raises(ValueError):
        growth([])


def test_forward_nfe_log_records_each_solve_and_restores_the_flow():
    torch.manual_seed(0)
    flow = eqbench.build_model("kernel-flow", "dw4", {"solver": "otd", "dtype": "float64"})
    z = torch.randn(3, 4, 2, dtype=torch.float64)
    z = z - z.mean(dim=1, keepdim=True)
    with ForwardNfeLog(flow) as log:
        flow.eval()
        with torch.no_grad():
            flow.forward(z)
            first = flow.last_solve_nfe
            flow.with_solver(mode="dto")
            flow.forward(z)
    assert log.nfe == [first, 80] and first >= 7
    assert "integrate" not in flow.__dict__
