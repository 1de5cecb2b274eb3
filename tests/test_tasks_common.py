"""What every registered task owes its users (issue 4), checked across all tasks at once."""

from __future__ import annotations

import pytest

from eqbench.components import DATA_ON_REQUEST, get_system
from eqbench.errors import ConfigError
from eqbench.registry import MODELS, SYSTEMS, TASKS
from eqbench.runner import plan_cells

PAPER_TASKS = ["density-estimation", "bg-reweighting", "metastable-states", "divergence-cost", "dto-vs-otd", "timing"]


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_every_profile_plans_for_every_supported_pair(task):
    """smoke, quick, paper and calibrate resolve to valid cells for each supported (model,
    system); each unsupported pair is refused before any work with a reason naming the task."""
    task_obj = TASKS.get(task)
    assert {"smoke", "quick", "paper", "calibrate"} <= set(task_obj.profiles())
    supported = 0
    for system in task_obj.systems or SYSTEMS.names():
        for model in ("kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "gaussian"):
            try:
                task_obj.check_supported(system, model)
            except ConfigError as exc:
                assert task in str(exc) and len(str(exc)) > len(task) + 20, str(exc)
                continue
            supported += 1
            for profile in ("smoke", "quick", "paper", "calibrate"):
                try:
                    assert plan_cells(task, model, system, profile), (task, model, system, profile)
                except ConfigError as exc:
                    # A system with a smaller data pool than the profile's sample counts (lj55) is
                    # refused with the size and the valid range, and plans once they fit.
                    assert system in DATA_ON_REQUEST and "split holds" in str(exc) and "valid: 1 to" in str(exc), str(exc)
                    fitted = _fit_to_pool(task_obj, get_system(system), task_obj.profile(profile))
                    assert fitted and plan_cells(task, model, system, profile, overrides=fitted), (task, system, profile)
    assert supported >= 2


def _fit_to_pool(task_obj, system, params) -> dict:
    """The sample-count settings of ``params`` cut to what the system's splits hold."""
    fitted = {}
    for key, split in getattr(task_obj, "data_splits", {}).items():
        size = system.data_protocol.size(split)
        value = params.get(key)
        if isinstance(value, list) and any(v is not None and v > size for v in value):
            fitted[key] = [v for v in value if v is None or v <= size] or [size]
        elif isinstance(value, int) and value > size:
            fitted[key] = size
        elif isinstance(value, dict) and any(isinstance(v, int) and v > size for v in value.values()):
            fitted[key] = {m: min(v, size) if isinstance(v, int) else v for m, v in value.items()}
    return fitted


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_task_documents_its_protocol(task):
    import sys

    task_obj = TASKS.get(task)
    doc = sys.modules[type(task_obj).__module__].__doc__ or ""
    assert "paper" in doc.lower() and len(doc) > 300, f"{task}: the module docstring must state the protocol"
    assert task_obj.summary and task_obj.name == task


def test_models_listed_are_the_registered_ones():
    assert {"kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "gaussian"} <= set(MODELS.names())


def test_forward_ess_records_use_the_exact_or_the_one_draw_extended_density():
    """Exact flows: the scored log q serves both the NLL and the weights. Flows with an auxiliary
    variable: the NLL is the K-draw estimate, the weights take the one-draw extended density."""
    import numpy as np
    import torch

    import eqbench
    from eqbench import metrics
    from eqbench.tasks.common import forward_ess_records, nll_records, score_log_q

    class Ctx:
        seed = 0
        params: dict = {}

        @staticmethod
        def record(metric, value, unit):
            return (metric, float(value), unit)

    system = eqbench.get_system("dw4")
    x = torch.randn(40, 4, 2, generator=torch.Generator().manual_seed(0)) * 2
    x = x - x.mean(1, keepdim=True)
    u = system.energy(x)
    for name in ("gaussian", "real-nvp"):
        torch.manual_seed(0)
        flow = eqbench.build_model(name, system)
        scored = score_log_q(Ctx, flow, x)
        (metric, value, unit), (_, undefined, _), (spread, _, _) = forward_ess_records(Ctx, flow, scored, u)
        expected = metrics.forward_ess_fraction(-metrics.as_array(u) - scored.for_weights)
        assert metric == "forward_ess_fraction" and value == expected and undefined == 0.0
        assert spread == "forward_log_w_std"
        nll = nll_records(Ctx, flow, x, "nll_test", scored=scored)
        assert nll[0][1] == -scored.scored.mean()
        if name == "gaussian":
            assert scored.extended is None and "exact log q" in unit
            assert np.allclose(scored.scored, flow.log_prob(x).detach().numpy())
        else:
            assert "extended-space one-draw" in unit and nll[1][0] == "nll_test_k1_gap"
            assert nll[1][1] == -scored.extended.mean() - nll[0][1]
            # the one-draw values are log_prob with K = 1 and the cell's seeded draws
            one = flow.log_prob(x, iw_draws=1, generator=torch.Generator().manual_seed(0)).detach().double().numpy()
            assert np.allclose(scored.extended, one, rtol=0, atol=1e-10)
    # a NaN weight is left out and counted
    u_nan = u.clone()
    u_nan[3] = float("nan")
    records = forward_ess_records(Ctx, flow, scored, u_nan)
    assert records[1][1] == 1.0 and "39 of 40 MCMC test-split configurations" in records[0][2]
