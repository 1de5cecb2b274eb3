"""The E(n)-equivariant CNF (eqbench.flows.en_flow; Satorras et al. NeurIPS 2021).

Float64 throughout, one thread. The EGNN starts at the identity to ~1e-3 (coordinate heads at
Xavier gain 0.001), where a wrong sign or factor hides below any tolerance: most tests scale the
coordinate heads up (:func:`_strong`) so the field moves particles by O(1).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import eqbench
from eqbench.errors import ConfigError
from eqbench.flows import cnf as cnf_module
from eqbench.flows.en_flow import DEFAULTS, ENFlow, build
from eqbench.geometry import (
    apply_permutation,
    com_free_basis,
    random_permutations,
    random_reflections,
    random_rotations,
    remove_com,
)
from eqbench.testing import check_flow
from eqbench.train import TrainConfig, fit

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _strong(flow: ENFlow, factor: float = 300.0) -> ENFlow:
    """Scale every coordinate head's last layer (Xavier gain 0.001 -> 0.3): displacements of O(1)."""
    with torch.no_grad():
        for layer in flow.egnn.layers:
            layer.coord_mlp[-1].weight.mul_(factor)
    return flow


def _flow(name: str, factor: float = 300.0, **config) -> ENFlow:
    torch.manual_seed(0)
    return _strong(build(eqbench.get_system(name), {"dtype": "float64", **config}), factor)


def _configs(name: str, n: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    system = eqbench.get_system(name)
    return remove_com(torch.randn(n, system.n_particles, system.n_dims, generator=_gen(seed), dtype=F64) * scale)


def _flat_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    return torch.autograd.functional.jacobian(lambda v: fn(v.reshape(shape)).reshape(-1), x.reshape(-1))


def _layer_count(h: int) -> int:
    """One EGNN layer with attention: edge MLP, node MLP, coordinate MLP (no last bias), gate."""
    edge = (2 * h + 2) * h + h + h * h + h
    node = 2 * h * h + h + h * h + h
    coord = h * h + h + h
    gate = h + 1
    return edge + node + coord + gate


# ====================================================================== parameter count, defaults
def test_parameter_count_is_the_same_on_every_system_and_pinned_by_hand():
    h, layers = 32, 3
    assert _layer_count(h) == 7 * h * h + 9 * h + 1 == 7_457
    dead = 2 * h * h + h + h * h + h  # the last layer's node MLP: feeds nothing the velocity reads
    assert dead == 3_136
    total = 2 * h + layers * _layer_count(h)
    assert total == 22_435 and total - dead == 19_299
    assert total + (h + 1) == 22_468  # the authors' module adds embedding_out (Linear(32, 1)), also unused
    for name in ("dw4", "lj13", "dw2"):
        flow = build(eqbench.get_system(name))
        assert flow.n_parameters == 19_299, name
        assert sum(p.numel() for p in flow.parameters()) == 19_299  # the dead node MLP is not built
        assert flow.egnn.layers[layers - 1].node_mlp is None
    small = build(eqbench.get_system("dw4"), {"hidden": 8, "layers": 2})
    assert small.n_parameters == 2 * 8 + 2 * _layer_count(8) - (3 * 64 + 16)
    no_gate = build(eqbench.get_system("dw4"), {"attention": False})
    assert no_gate.n_parameters == 19_299 - 3 * (h + 1)


def test_defaults_are_the_authors_for_every_system():
    assert DEFAULTS == {"hidden": 32, "layers": 3, "attention": True, "tanh": True, "coords_range": 15.0,
                        "condition_time": True}
    for name in ("dw4", "lj13"):
        flow = build(eqbench.get_system(name))
        assert (flow.hidden, flow.layers, flow.attention, flow.tanh, flow.coords_range, flow.condition_time) == (
            32, 3, True, True, 15.0, True)
        assert flow.train_divergence == "hutchinson" and flow.eval_divergence == "exact"
        assert flow.solver.mode == "dto" and flow.solver.steps == 20
        assert next(flow.parameters()).dtype == torch.float32
        assert flow.egnn.layers[0].coords_range == pytest.approx(5.0)  # 15 split over 3 layers
        assert set(flow.symmetries) == {"permutation", "rotation", "reflection", "translation"}
        assert not flow.has_closed_form_divergence
    otd = build(eqbench.get_system("dw4"), {"solver": "otd", "atol": 1e-4, "rtol": 1e-4, "hidden": 8})
    assert (otd.solver.mode, otd.solver.atol, otd.solver.rtol, otd.hidden) == ("otd", 1e-4, 1e-4, 8)
    assert set(build.capabilities) == {"cnf", "trainable", "exact-density", "equivariant"}


@pytest.mark.parametrize(("config", "match"), [
    ({"width": 3}, r"unknown en-flow settings: width; valid: .*hidden.*layers"),
    ({"hidden": 32.0}, r"en-flow setting hidden must be a positive integer; got 32.0"),
    ({"layers": 0}, r"en-flow setting layers must be a positive integer; got 0"),
    ({"attention": 1}, r"en-flow setting attention must be true or false; got 1"),
    ({"condition_time": "yes"}, r"en-flow setting condition_time must be true or false"),
    ({"coords_range": 0.0}, r"en-flow setting coords_range must be positive"),
    ({"train_divergence": "closed-form"}, r"train_divergence must be one of exact, brute-force, hutchinson"),
    ({"eval_divergence": "hutchinson"}, r"eval_divergence must be exact \(exact, brute-force\)"),
    ({"dtype": "float16"}, r"dtype must be one of float32, float64"),
    ({"solver": "euler"}, r"solver must be one of dto, otd"),
])
def test_bad_settings_are_one_line_config_errors(config, match):
    with pytest.raises(ConfigError, match=match) as info:
        build(eqbench.get_system("dw4"), config)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=match):  # planning's check, without building
        build.validate_config(eqbench.get_system("dw4"), config)


# ====================================================================== the velocity field
@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_mean_removal_keeps_the_centre_of_mass(name):
    """Σ_i v_i = 0, while the EGNN's raw displacement does not sum to zero (so the removal matters)."""
    flow = _flow(name)
    x = _configs(name, 4, seed=1)
    t = torch.tensor(0.3, dtype=F64)
    h = torch.full((*x.shape[:2], 1), 0.3, dtype=F64)
    raw = flow.egnn(x, h)[0][:, :, 0].detach()
    assert float(raw.sum(dim=1).abs().max()) > 1e-2
    v = flow.velocity(t, x).detach()
    assert float(v.sum(dim=1).abs().max()) < 1e-12
    assert torch.allclose(v, raw - raw.mean(dim=1, keepdim=True), atol=1e-14)
    assert float(v.abs().max()) > 0.1  # an O(1) field, not a near-identity one


def test_time_is_the_node_feature():
    flow = _flow("dw4")
    x = _configs("dw4", 3, seed=2)
    v0 = flow.velocity(torch.tensor(0.0, dtype=F64), x).detach()
    v1 = flow.velocity(torch.tensor(1.0, dtype=F64), x).detach()
    assert float((v0 - v1).abs().max()) > 1e-3
    autonomous = _flow("dw4", condition_time=False)
    assert torch.equal(autonomous.velocity(torch.tensor(0.0, dtype=F64), x),
                       autonomous.velocity(torch.tensor(1.0, dtype=F64), x))


def test_tanh_bounds_each_layer_by_coords_range():
    """With saturated heads every layer moves a particle by at most (N-1) · coords_range / L."""
    system = eqbench.get_system("lj13")
    for coords_range in (15.0, 1.5):
        flow = _flow("lj13", factor=1e7, coords_range=coords_range)
        x = _configs("lj13", 4, seed=3, scale=3.0)
        raw = flow.egnn(x, torch.ones(*x.shape[:2], 1, dtype=F64))[0][:, :, 0].detach()
        bound = (system.n_particles - 1) * coords_range
        assert float(raw.norm(dim=-1).max()) <= bound
        assert float(raw.norm(dim=-1).max()) > 0.1 * bound  # saturated: the bound is what limits it
    unbounded = _flow("lj13", factor=1e7, tanh=False)
    raw = unbounded.egnn(_configs("lj13", 4, seed=3, scale=3.0), torch.ones(4, 13, 1, dtype=F64))[0].detach()
    assert float(raw.norm(dim=-1).max()) > (13 - 1) * 15.0


@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_velocity_is_equivariant(name):
    flow = _flow(name)
    system = eqbench.get_system(name)
    b = 4
    x = _configs(name, b, seed=4)
    t = torch.tensor(0.7, dtype=F64)
    v = flow.velocity(t, x).detach()
    gen = _gen(5)
    for g in (random_rotations(b, system.n_dims, generator=gen), random_reflections(b, system.n_dims, generator=gen)):
        perm = random_permutations(b, system.n_particles, generator=gen)
        shift = torch.randn(b, 1, system.n_dims, generator=gen, dtype=F64) * 3.0
        gx = apply_permutation(x @ g.transpose(-1, -2) + shift, perm)
        expected = apply_permutation(v @ g.transpose(-1, -2), perm)
        assert float((flow.velocity(t, gx).detach() - expected).abs().max()) < 1e-10
    # the check is not vacuous: the field does change under a rotation (it is not invariant)
    rot = random_rotations(b, system.n_dims, generator=gen)
    assert float((flow.velocity(t, x @ rot.transpose(-1, -2)).detach() - v).abs().max()) > 1e-3


# ====================================================================== divergence
def _spread(x: torch.Tensor) -> torch.Tensor:
    return x * 10.0


def _near_coincident(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[:, 1] = y[:, 0] + 1e-5 * torch.tensor([1.0, -0.5, 0.3][: x.shape[-1]], dtype=x.dtype)
    return remove_com(y)


@pytest.mark.parametrize("name", ["dw4", "lj13"])
@pytest.mark.parametrize("geometry", ["typical", "spread", "near-coincident"])
def test_exact_divergence_is_the_autograd_trace_and_the_trace_on_u(name, geometry):
    flow = _flow(name)
    x = {"typical": lambda y: y, "spread": _spread, "near-coincident": _near_coincident}[geometry](
        _configs(name, 2, seed=6))
    n, d = flow.n_particles, flow.n_dims
    basis = com_free_basis(n, d)
    for t in (0.0, 0.5, 1.0):
        tt = torch.tensor(t, dtype=F64)
        divs = [flow.divergence(tt, x, method)[1].detach() for method in ("exact", "brute-force")]
        for b in range(x.shape[0]):
            jac = _flat_jacobian(lambda y: flow.velocity(tt, y), x[b:b + 1])
            trace = torch.trace(jac)
            scale = max(1.0, abs(float(trace)))
            for div in divs:
                assert abs(float(div[b]) - float(trace)) < 1e-8 * scale
            # the divergence on U (log-density rate) is the same number
            assert abs(float(torch.trace(basis.T @ jac @ basis)) - float(trace)) < 1e-10 * scale
        div = divs[0]
    # the field is not trivial here: the divergence is O(1) on typical configurations
    if geometry == "typical":
        assert float(div.abs().max()) > 0.05


def test_divergence_against_finite_differences():
    """An autograd-free check: central differences of the velocity, O(h²) accurate."""
    flow = _flow("dw4")
    x = _configs("dw4", 1, seed=7)
    t = torch.tensor(0.4, dtype=F64)
    div = flow.divergence(t, x, "exact")[1].detach()
    eps = 1e-5
    fd = 0.0
    for k in range(x.numel()):
        e = torch.zeros_like(x).reshape(-1)
        e[k] = eps
        e = e.reshape(x.shape)
        with torch.no_grad():
            fd += float((flow.velocity(t, x + e) - flow.velocity(t, x - e)).reshape(-1)[k]) / (2 * eps)
    assert abs(float(div[0]) - fd) < 1e-7 * max(1.0, abs(fd))
    assert abs(fd) > 0.05


def test_hutchinson_is_exact_on_average_over_every_rademacher_probe():
    """The mean of εᵀJε over all 2^(N·D) sign vectors is tr J exactly (off-diagonal terms cancel)."""
    flow = _flow("dw4")
    x = _configs("dw4", 1, seed=8)
    t = torch.tensor(0.6, dtype=F64)
    probes = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=8)), dtype=F64).reshape(-1, 4, 2)
    est = flow.divergence(t, x.expand(len(probes), -1, -1), "hutchinson", noise=probes)[1].detach()
    exact = flow.divergence(t, x, "exact")[1].detach()
    assert abs(float(est.mean()) - float(exact[0])) < 1e-10
    assert float(est.std()) > 1e-2  # a single probe is an estimate, not the trace


# ====================================================================== density, sampling, training
def test_contract_dw4():
    system = eqbench.get_system("dw4")
    report = check_flow(lambda: _strong(build(system, {"steps": 8, "hidden": 16, "layers": 2})), system)
    assert report.measured["divergence_vs_autograd_trace"] < 1e-8
    assert "every_parameter_gets_gradient" in report.passed


@pytest.mark.slow
def test_contract_lj13():
    """~90 s on one core: 39 backward passes per exact evaluation, Jacobians of whole solves."""
    system = eqbench.get_system("lj13")
    # 8 RK4 steps and heads at gain 0.1: the round trip is then exact to ~1e-8 (4 steps at gain 0.3: 1e-1)
    report = check_flow(lambda: _strong(build(system, {"steps": 8, "hidden": 16, "layers": 2}), 100.0), system)
    assert "rotation_equivariant" in report.passed and "every_parameter_gets_gradient" in report.passed


def test_contract_default_architecture_dw4():
    """The registry's default model (32 wide, 3 layers, no dead node MLP) passes the contract."""
    system = eqbench.get_system("dw4")
    check_flow(lambda: build(system, {"steps": 4}), system, batch=3)


def test_samples_com_free_and_log_prob_matches_sample_in_either_mode():
    flow = _flow("dw4", steps=8).eval()
    with torch.no_grad():
        x, log_q = flow.sample(6, generator=_gen(9))
        assert float(x.sum(dim=1).abs().max()) < 1e-12
        eval_lp = flow.log_prob(x)
        flow.train()
        train_lp = flow.log_prob(x)
    assert torch.allclose(eval_lp, log_q, atol=1e-7)  # 8-step RK4 round trip
    assert torch.equal(train_lp, eval_lp)
    z = flow.prior.sample(6, generator=_gen(9), dtype=F64)
    assert float((x - z).abs().max()) > 0.3  # a real transport


def test_forward_is_equivariant_lj13():
    flow = _flow("lj13", steps=2).eval()  # equivariance holds on any RK4 grid
    b = 2
    z = _configs("lj13", b, seed=10, scale=1.0)
    gen = _gen(11)
    with torch.no_grad():
        x, ld = flow.forward(z)
        for g in (random_rotations(b, 3, generator=gen), random_reflections(b, 3, generator=gen)):
            perm = random_permutations(b, 13, generator=gen)
            gx, gld = flow.forward(apply_permutation(z @ g.transpose(-1, -2), perm))
            assert float((gx - apply_permutation(x @ g.transpose(-1, -2), perm)).abs().max()) < 1e-10
            assert float((gld - ld).abs().max()) < 1e-10
    assert float(ld.abs().max()) > 0.1


def test_training_uses_hutchinson_by_default_and_scores_use_brute_force(monkeypatch):
    flow = _flow("dw4", steps=4)
    x = _configs("dw4", 4, seed=12)
    assert flow.training_estimator == {"divergence": "hutchinson"}
    with torch.no_grad():
        exact = flow.log_prob(x)
    calls = []
    real = cnf_module.brute_force_divergence

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cnf_module, "brute_force_divergence", counting)
    torch.manual_seed(0)
    estimate = flow.training_log_prob(x)
    assert not calls  # training: no brute-force trace
    assert float((estimate.detach() - exact).abs().max()) > 1e-4  # and not the exact one
    torch.manual_seed(1)
    other = flow.training_log_prob(x).detach()
    assert not torch.equal(other, estimate.detach())  # a fresh probe per solve
    with torch.no_grad():
        again = flow.log_prob(x)
    assert calls and torch.equal(again, exact)  # scores: the brute-force trace, in any mode
    exact_training = _flow("dw4", steps=4, train_divergence="exact")
    assert torch.allclose(exact_training.training_log_prob(x).detach(), exact, atol=1e-12)


def test_fit_lowers_the_nll_on_dw4():
    system = eqbench.get_system("dw4")
    data = eqbench.load_data("dw4", "train", n=128, seed=0, dtype=torch.float32)
    torch.manual_seed(0)
    flow = build(system, {"steps": 4, "hidden": 16, "layers": 2})
    with torch.no_grad():
        before = -flow.log_prob(data).mean().item()
    # measured: 19.19 -> 12.13 nats after 10 iterations (11.75 after 25)
    result = fit(flow, system, data, TrainConfig(iterations=10, batch_size=64, lr=5e-3, seed=0), progress=False)
    assert result.status == "ok", result.reason
    with torch.no_grad():
        after = -flow.log_prob(data).mean().item()
    assert after < before - 3.0, (before, after)
