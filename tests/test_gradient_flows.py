"""Gradient flows ``v = ∇Φ`` (paper B.1, C.2): simple pair potential and SchNet-like potential.

Float64 throughout so that exact identities (gradient field, trace, symmetries) can be checked
to round-off.
"""

from __future__ import annotations

import pytest
import torch

from eqbench.api import get_system
from eqbench.errors import ConfigError
from eqbench.flows import gradient_flow, schnet_flow
from eqbench.flows.divergence import rademacher_like
from eqbench.geometry import (
    apply_permutation,
    random_permutations,
    random_reflections,
    random_rotations,
    remove_com,
)
from eqbench.systems.base import SYMMETRIES

BUILDERS = {"gradient-flow": gradient_flow.build, "schnet-flow": schnet_flow.build}
N_PARAMETERS = {"gradient-flow": 5_377, "schnet-flow": 9_857}
SYSTEMS = ("dw4", "lj13")
#: A typical spread of each system's configurations (pair distances ~ 4 for DW-4, ~ 1-2 for LJ-13).
SCALE = {"dw2": 2.0, "dw4": 2.0, "lj13": 0.8}


def make_flow(model: str, system: str, **config) -> torch.nn.Module:
    torch.manual_seed(1)
    # init_scale 1: larger fields than the near-identity default, so every check is non-trivial.
    config = {"init_scale": 1.0, "dtype": "float64", **config}
    return BUILDERS[model](get_system(system), config)


def configurations(system: str, n: int, seed: int = 0) -> torch.Tensor:
    s = get_system(system)
    g = torch.Generator().manual_seed(seed)
    x = SCALE[system] * torch.randn(n, s.n_particles, s.n_dims, generator=g, dtype=torch.float64)
    return remove_com(x)


def rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x_i -> Q x_i`` for every particle, one matrix per configuration."""
    return torch.einsum("bij,bnj->bni", q, x)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation, which on a loaded 2-core machine
    made this file ten times slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


parametrize_all = pytest.mark.parametrize(
    ("model", "system"), [(m, s) for m in BUILDERS for s in SYSTEMS]
)


# ----------------------------------------------------------------------------- construction
@parametrize_all
def test_parameter_count_matches_paper(model, system):
    flow = BUILDERS[model](get_system(system), {})
    assert flow.n_parameters == N_PARAMETERS[model]
    assert sum(p.numel() for p in flow.parameters()) == N_PARAMETERS[model]
    assert all(p.dtype == torch.float32 for p in flow.parameters())
    # RBF centres and bandwidths are fixed buffers, not parameters (paper C.2).
    assert {name for name, _ in flow.named_buffers()} == {"rbf.mu", "rbf.gamma"}


@pytest.mark.parametrize("model", BUILDERS)
def test_builder_settings_and_errors(model):
    build = BUILDERS[model]
    flow = build(get_system("dw4"), {"steps": 7, "solver": "dto", "dtype": "float64"})
    assert flow.solver.steps == 7 and flow.solver.mode == "dto"
    assert flow.train_divergence == "hutchinson" and flow.eval_divergence == "exact"
    assert flow.symmetries == SYMMETRIES
    assert flow.velocity_needs_grad and not flow.has_closed_form_divergence
    assert next(flow.parameters()).dtype == torch.float64
    with pytest.raises(ConfigError, match="init_scale"):
        build(get_system("dw4"), {"hidden": 3})
    with pytest.raises(ConfigError, match="init_scale must be positive"):
        build(get_system("dw4"), {"init_scale": 0})
    with pytest.raises(ConfigError, match="dtype"):
        build(get_system("dw4"), {"dtype": "float16"})
    with pytest.raises(ConfigError, match="closed-form"):
        flow.divergence(0.0, configurations("dw4", 2), "closed-form")


@pytest.mark.parametrize("model", BUILDERS)
def test_any_system_builds_with_the_placement_of_its_kind(model):
    """No name lookup: eight double-well particles get DW-4's RBFs and the paper's count."""
    from eqbench.systems.double_well import make_double_well

    flow = BUILDERS[model](make_double_well(8), {})
    assert flow.n_parameters == N_PARAMETERS[model]
    assert torch.equal(flow.rbf.mu, torch.linspace(0, 8, 50, dtype=torch.float64).float())
    assert torch.all(flow.rbf.gamma == 0.5)


def test_rbf_placement():
    mu, gamma = gradient_flow.rbf_placement(get_system("dw4"), torch.float64)
    assert torch.allclose(mu, torch.linspace(0, 8, 50, dtype=torch.float64)) and torch.all(gamma == 0.5)
    mu, gamma = gradient_flow.rbf_placement(get_system("lj13"), torch.float64)
    assert mu.shape == (50,) and torch.all(mu[1:] >= mu[:-1]) and 0 <= mu.min() and mu.max() < 16
    # densest spacing near rm = 1 relative to the far tail; bandwidths narrowest there
    near = mu[(mu > 0.5) & (mu < 1.5)]
    assert len(near) >= 6
    assert gamma.min() >= 0.3 and gamma[-1] > 1.0


# ----------------------------------------------------------------------------- the field
@parametrize_all
def test_velocity_is_gradient_of_potential(model, system):
    flow = make_flow(model, system)
    x = configurations(system, 3).requires_grad_(True)
    t = torch.tensor(0.37, dtype=torch.float64)
    phi = flow.potential(t, x)
    assert phi.shape == (3,)
    (grad,) = torch.autograd.grad(phi.sum(), x)
    v = flow.velocity(t, x)
    torch.testing.assert_close(v, grad, rtol=0, atol=1e-12)  # v = +∇Φ
    assert v.abs().max() > 1e-3  # non-trivial field at init_scale 1


@parametrize_all
def test_velocity_works_without_requires_grad_and_under_no_grad(model, system):
    flow = make_flow(model, system)
    x = configurations(system, 2)
    v = flow.velocity(0.5, x)
    assert not x.requires_grad and v.requires_grad  # graph to the parameters kept
    with torch.no_grad():
        v0 = flow.velocity(0.5, x)
    assert not v0.requires_grad
    torch.testing.assert_close(v.detach(), v0, rtol=0, atol=0)


@parametrize_all
def test_jacobian_is_symmetric(model, system):
    flow = make_flow(model, system)
    x = configurations(system, 1)[0]
    shape = x.shape

    def field(flat):
        return flow.velocity(0.2, flat.reshape(1, *shape)).reshape(-1)

    jac = torch.autograd.functional.jacobian(field, x.reshape(-1))
    torch.testing.assert_close(jac, jac.T, rtol=0, atol=1e-10)


@parametrize_all
def test_equivariance_and_com(model, system):
    flow = make_flow(model, system)
    s = get_system(system)
    n = 6
    g = torch.Generator().manual_seed(3)
    x = configurations(system, n, seed=1)
    t = 0.61
    v = flow.velocity(t, x).detach()
    # centre of mass: Σ_i v_i = 0
    assert v.sum(dim=1).abs().max() < 1e-12
    # proper rotations and reflections
    for q in (random_rotations(n, s.n_dims, generator=g), random_reflections(n, s.n_dims, generator=g)):
        torch.testing.assert_close(flow.velocity(t, rotate(x, q)).detach(), rotate(v, q), rtol=0, atol=1e-10)
    # permutations
    perm = random_permutations(n, s.n_particles, generator=g)
    torch.testing.assert_close(
        flow.velocity(t, apply_permutation(x, perm)).detach(), apply_permutation(v, perm), rtol=0, atol=1e-10
    )
    # translations
    shift = 5.0 * torch.randn(n, 1, s.n_dims, generator=g, dtype=torch.float64)
    torch.testing.assert_close(flow.velocity(t, x + shift).detach(), v, rtol=0, atol=1e-10)


def test_time_dependence():
    """The simple flow is autonomous; the SchNet flow sees t through its feature encoding."""
    x = configurations("dw4", 3)
    simple = make_flow("gradient-flow", "dw4")
    torch.testing.assert_close(simple.velocity(0.0, x), simple.velocity(1.0, x), rtol=0, atol=0)
    schnet = make_flow("schnet-flow", "dw4")
    assert (schnet.velocity(0.0, x) - schnet.velocity(1.0, x)).abs().max() > 1e-6


# ----------------------------------------------------------------------------- divergence
def full_jacobian(flow, t: float, x: torch.Tensor) -> torch.Tensor:
    """``∂v/∂x`` of one configuration ``x`` [N, D] as an [N·D, N·D] matrix, by autograd."""
    shape = x.shape

    def field(flat):
        return flow.velocity(t, flat.reshape(1, *shape)).reshape(-1)

    return torch.autograd.functional.jacobian(field, x.reshape(-1))


@parametrize_all
def test_exact_divergence_is_jacobian_trace(model, system):
    flow = make_flow(model, system)
    x = configurations(system, 2, seed=2)
    t = 0.45
    v, div = flow.divergence(t, x, "exact")
    torch.testing.assert_close(v, flow.velocity(t, x), rtol=0, atol=1e-12)
    for b in range(x.shape[0]):
        jac = full_jacobian(flow, t, x[b])
        assert abs(div[b].item() - torch.trace(jac).item()) < 1e-8
    # brute-force is the same thing under another name
    _, div_bf = flow.divergence(t, x, "brute-force")
    torch.testing.assert_close(div_bf, div, rtol=0, atol=1e-12)


@parametrize_all
def test_divergence_detached_without_grad_and_differentiable_with(model, system):
    flow = make_flow(model, system)
    x = configurations(system, 1)
    with torch.no_grad():
        v0, d0 = flow.divergence(0.3, x, "hutchinson", noise=rademacher_like(x))
    assert not v0.requires_grad and not d0.requires_grad
    _, d1 = flow.divergence(0.3, x, "exact")
    assert d1.requires_grad


@parametrize_all
def test_hutchinson_is_unbiased(model, system):
    """The estimate is exactly ``εᵀ J ε`` for the probe given, and averages to ``tr J``.

    The first check is deterministic and, with ``E[ε εᵀ] = I`` for Rademacher probes, already
    implies unbiasedness; the second is the statistical check (mean of 500 probes within 4
    standard errors of the exact trace).
    """
    flow = make_flow(model, system)
    t = 0.8
    x = configurations(system, 1, seed=4)
    jac = full_jacobian(flow, t, x[0])
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        eps = rademacher_like(x, generator=g)
        with torch.no_grad():
            _, est = flow.divergence(t, x, "hutchinson", noise=eps)
        quadratic_form = eps.reshape(-1) @ jac @ eps.reshape(-1)
        assert abs(est.item() - quadratic_form.item()) < 1e-10

    n_probes = 500
    xs = x.expand(n_probes, *x.shape[1:]).contiguous()
    with torch.no_grad():
        _, est = flow.divergence(t, xs, "hutchinson", noise=rademacher_like(xs, generator=g))
    stderr = est.std().item() / n_probes**0.5
    assert est.std() > 0  # a real estimator, not the exact trace
    assert abs(est.mean().item() - torch.trace(jac).item()) < 4 * stderr


# ----------------------------------------------------------------------------- integration
@pytest.mark.parametrize("model", BUILDERS)
def test_dto_round_trip(model):
    """inverse(forward(z)) with fixed-grid RK4 (DTO), 20 steps, exact divergence.

    RK4 run backwards is not the exact inverse of RK4 run forwards; the mismatch is the global
    discretisation error, O(h⁴). Measured at init_scale 1 (fields ten times the default init's):
    max |z' - z| 2e-10 (simple) / 5e-13 (SchNet), logdet mismatch 2e-9 / 1e-11; the tolerances
    leave a factor > 50. (At init_scale 3 the simple flow's mismatch grows to 5e-7, at 10 the
    20-step grid no longer resolves the field at all: stiff fields need regularisation, §4.)
    """
    flow = make_flow(model, "dw4").eval()
    z = configurations("dw4", 4, seed=6) / SCALE["dw4"]
    with torch.no_grad():
        x, logdet_f = flow.forward(z)
        z_back, logdet_i = flow.inverse(x)
    assert (x - z).abs().max() > 1e-3  # the map is not the identity
    assert (z_back - z).abs().max() < 1e-7
    assert (logdet_f + logdet_i).abs().max() < 1e-7
    assert x.sum(dim=1).abs().max() < 1e-12  # CoM-free stays CoM-free


@pytest.mark.parametrize("model", BUILDERS)
def test_log_prob_matches_sample(model):
    flow = make_flow(model, "dw4", steps=4).eval()
    with torch.no_grad():
        x, log_q = flow.sample(3, generator=torch.Generator().manual_seed(7))
        log_q_back = flow.log_prob(x)
    assert torch.isfinite(log_q).all()
    # RK4 with 4 steps: forward and backward solves agree to the discretisation error only
    # (measured 6e-6 for the simple flow, 4e-8 for SchNet, at init_scale 1).
    torch.testing.assert_close(log_q_back, log_q, rtol=0, atol=1e-4)


@pytest.mark.parametrize("model", BUILDERS)
def test_otd_adjoint_gradients_match_dto(model):
    """OTD (dopri5 + adjoint) and DTO (RK4) give the same parameter gradients of the NLL.

    The adjoint re-evaluates v and its divergence backwards in time, which for a gradient flow
    means third derivatives of Φ; exact divergence so both losses are deterministic. Measured
    agreement ~1e-9 of the largest gradient at these tolerances and 20 RK4 steps.
    """
    dto = make_flow(model, "dw4", train_divergence="exact", init_scale=0.1).train()
    otd = make_flow(model, "dw4", train_divergence="exact", init_scale=0.1, solver="otd", atol=1e-8,
                    rtol=1e-8).train()
    otd.load_state_dict(dto.state_dict())
    x = configurations("dw4", 2, seed=8)
    for flow in (dto, otd):
        (-flow.log_prob(x).mean()).backward()
    scale = max(p.grad.abs().max().item() for p in dto.parameters())
    for (name, p), q in zip(dto.named_parameters(), otd.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max().item() < 1e-6 * scale, name


@parametrize_all
def test_every_parameter_gets_a_gradient(model, system):
    """Default initialisation, training mode (Hutchinson), few steps: -log q reaches all weights."""
    torch.manual_seed(2)
    flow = BUILDERS[model](get_system(system), {"steps": 2, "dtype": "float64"}).train()
    x = configurations(system, 3)
    loss = -flow.training_log_prob(x).mean()
    loss.backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("model", BUILDERS)
def test_default_init_is_close_to_identity(model):
    torch.manual_seed(0)
    flow = BUILDERS[model](get_system("dw4"), {"dtype": "float64"}).eval()
    z = configurations("dw4", 8) / SCALE["dw4"]
    with torch.no_grad():
        x, logdet = flow.forward(z)
    assert (x - z).abs().max() < 0.1
    assert logdet.abs().max() < 0.5
