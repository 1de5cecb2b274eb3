"""A short `run` trains every paper model on DW-4 and improves its test NLL (issue "Models", done-when)."""

from __future__ import annotations

import pytest

import eqbench


# The SchNet flow's run (~50 s) is slow-marked: its training path is the gradient flow's (same
# autograd divergence, same loop), which stays in the default run.
@pytest.mark.parametrize("model", ["kernel-flow", "gradient-flow", pytest.param("schnet-flow", marks=pytest.mark.slow),
                                   "node", "real-nvp"])
def test_short_run_improves_test_nll(model, tmp_path):
    # 10 RK4 steps instead of 20 halves the cost of the autograd-divergence models; the run
    # checks that training lowers the test NLL, not the solver's accuracy.
    model_config = {} if model == "real-nvp" else {"steps": 10}
    cells = eqbench.run(task="test-nll", model=model, system="dw4", profile="smoke", results_dir=tmp_path,
                        overrides={"n_test": 200, "iterations": 30, "model_config": model_config})
    assert len(cells) == 1 and cells[0].status == "ok", cells[0].reason
    metrics = {r.metric: r.value for r in cells[0].records}
    assert metrics["nll_test"] < metrics["nll_test_untrained"] - 1.0, metrics
