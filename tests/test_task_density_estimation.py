"""density-estimation (paper §7.3): smoke per model, cell expansion, settings checks, plot."""

from __future__ import annotations

import pytest
from conftest import run_task_smoke

from eqbench.errors import ConfigError
from eqbench.runner import plan_cells

MODELS = ["kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "gaussian"]
NON_EQUIVARIANT = {"node", "real-nvp"}


@pytest.mark.parametrize("model", MODELS)
def test_smoke_every_model_dw4(model, tmp_path):
    results, table = run_task_smoke("density-estimation", model, "dw4", tmp_path,
                                    expect_metrics=("nll_train", "nll_test", "n_parameters", "fit_wall_s"))
    variants = sorted(cell.config["params"]["variant"] for cell in results)
    assert variants == (["", "aug"] if model in NON_EQUIVARIANT else [""])
    nll = table[table["metric"] == "nll_test"]
    # real NVP's CoM-free density is an importance-weighted estimate (paper B.2): the unit says so,
    # and the gap to the one-draw estimate is recorded beside it.
    assert (nll["unit"] == ("nats, IW estimate K=64" if model == "real-nvp" else "nats, exact")).all()
    gap = table[table["metric"] == "nll_test_k1_gap"]
    assert len(gap) == (len(nll) if model == "real-nvp" else 0)
    # An NLL of a 6-dimensional density fitted to data is far below the untrained ~19 nats and
    # far above the impossible: a sign error or a missing constant lands outside this range.
    assert nll["value"].between(0.0, 40.0).all(), nll["value"].tolist()


def test_smoke_lj13_kernel_flow(tmp_path):
    _, table = run_task_smoke("density-estimation", "kernel-flow", "lj13", tmp_path,
                              overrides={"n_test": 20, "iterations": 2})
    assert set(table["system"]) == {"lj13"}


def test_augmentation_only_for_non_equivariant_models():
    kernel = plan_cells("density-estimation", "kernel-flow", "dw4", "quick")
    node = plan_cells("density-estimation", "node", "dw4", "quick")
    assert {c.params["variant"] for c in kernel} == {""}
    assert {c.params["variant"] for c in node} == {"", "aug"}
    assert len(node) == 2 * len(kernel) == 2 * 3


def test_paper_profile_is_the_papers_protocol():
    plans = plan_cells("density-estimation", "node", "lj13", "paper")
    sizes = sorted({p.params["n_train"] for p in plans})
    assert sizes == [10, 100, 1000, 10000]
    assert {p.params["n_test"] for p in plans} == {10000}
    assert len({p.seed for p in plans}) == 5
    assert len(plans) == 4 * 2 * 5


@pytest.mark.parametrize("override, message", [
    ({"n_train": [0]}, "n_train"),
    ({"augment": ["yes"]}, "augment"),
    ({"iterations": -3}, "iterations"),
])
def test_bad_settings_are_refused_before_work(override, message):
    with pytest.raises(ConfigError, match=message):
        plan_cells("density-estimation", "kernel-flow", "dw4", "smoke", overrides=override)
