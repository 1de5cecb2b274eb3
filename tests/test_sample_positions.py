"""``Flow.sample_positions``: ``sample``'s configurations without ``log q``.

Metrics that never weight samples (density-estimation's sample metrics, metastable-states'
minima) draw through it; a CNF integrates its velocity alone. The tests hold it to the same
configurations as ``sample`` (same generator), show that no trace is computed on the way, and
that the contract catches an override that changes the samples.
"""

from __future__ import annotations

import pytest
import torch

import eqbench
import eqbench.flows.base
import eqbench.flows.cnf as cnf_module
from eqbench.tasks.common import sample_positions, sample_with_log_q
from eqbench.testing import check_flow_quick

CNF_CONFIGS = {"kernel-flow": {"steps": 6}, "gradient-flow": {"steps": 3}, "schnet-flow": {"steps": 3},
               "node": {"steps": 6}, "en-flow": {"steps": 3}}


def _draw(flow, n: int = 5, seed: int = 7):
    flow = flow.double().eval()
    with torch.no_grad():
        x_ref, _ = flow.sample(n, generator=torch.Generator().manual_seed(seed))
        x = flow.sample_positions(n, generator=torch.Generator().manual_seed(seed))
    return x, x_ref


@pytest.mark.parametrize("model", sorted(CNF_CONFIGS))
@pytest.mark.parametrize("system", ["dw4", "lj13"])
def test_cnf_positions_are_the_sampled_configurations(model, system):
    x, x_ref = _draw(eqbench.build_model(model, system, CNF_CONFIGS[model]))
    assert x.shape == x_ref.shape
    assert float((x - x_ref).abs().max()) < 1e-12
    assert float(x.mean(dim=1).abs().max()) < 1e-10  # CoM-free like every sample


@pytest.mark.parametrize("model", ["en-flow", "schnet-flow", "node"])
def test_cnf_positions_compute_no_trace(model, monkeypatch):
    """Neither the brute-force nor the Hutchinson trace runs: the saving is the point."""
    flow = eqbench.build_model(model, "dw4", CNF_CONFIGS[model]).double().eval()

    def refuse(*args, **kwargs):
        raise AssertionError("a trace was computed")

    monkeypatch.setattr(cnf_module, "brute_force_divergence", refuse)
    monkeypatch.setattr(cnf_module, "hutchinson_divergence", refuse)
    flow.nfe = 0
    with torch.no_grad():
        x = flow.sample_positions(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 4, 2) and torch.isfinite(x).all()
    assert flow.nfe == 4 * CNF_CONFIGS[model]["steps"]  # RK4: four velocity evaluations per step
    with pytest.raises(AssertionError, match="trace was computed"):
        flow.sample(3, generator=torch.Generator().manual_seed(0))


def test_adaptive_solver_positions_agree_within_its_tolerance():
    flow = eqbench.build_model("en-flow", "dw4", {"solver": "otd", "atol": 1e-8, "rtol": 1e-8})
    x, x_ref = _draw(flow, n=3)
    dev = float((x - x_ref).abs().max())
    assert dev < 1e-5, dev


@pytest.mark.parametrize("model", ["real-nvp", "g-resflow", "se3-acf"])
def test_other_flows_positions_are_the_sampled_configurations(model):
    x, x_ref = _draw(eqbench.build_model(model, "dw4"))
    assert float((x - x_ref).abs().max()) == 0.0


def test_task_helper_draws_what_sample_with_log_q_draws():
    flow = eqbench.build_model("en-flow", "dw4", {"steps": 2}).double()
    x_ref, _ = sample_with_log_q(flow, 7, batch_size=3, seed=5, progress=False)
    x = sample_positions(flow, 7, batch_size=3, seed=5, progress=False)
    assert x.shape == (7, 4, 2)
    assert float((x - x_ref).abs().max()) < 1e-12


def test_contract_catches_an_override_that_changes_the_samples():
    system = eqbench.get_system("dw4")
    flow = eqbench.build_model("kernel-flow", system, {"steps": 4})

    class Shifted(type(flow)):
        def sample_positions(self, n, *, generator=None):
            return 1.01 * super().sample_positions(n, generator=generator)

    flow.__class__ = Shifted
    with pytest.raises(AssertionError, match="sample_positions differs"):
        check_flow_quick(flow, system)
    flow.__class__ = Shifted.__mro__[1]
    assert "sample_positions_match_sample" in check_flow_quick(flow, system).passed


@pytest.mark.parametrize("module", [eqbench.flows.base, cnf_module])
def test_docstring_examples_run(module):
    import doctest

    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0
