"""The equivariant kernel flow (paper §5 eq. (1), A.4, C.1; SPEC §4 "Kernel flow details").

Float64 throughout, so that the exact identities (closed-form divergence = autograd trace,
symmetries, gradient field) hold to round-off. Flows are built with ``init_scale`` 0.1 (0.3 for
the solver checks), 100-300x the near-identity default, so that every check sees a field that
moves points by O(1). The whole file runs in ~5-10 s single-threaded.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from eqbench.errors import ConfigError
from eqbench.flows.divergence import brute_force_divergence, rademacher_like
from eqbench.flows.kernel_flow import KernelFlow, _PairField, build, default_kernels
from eqbench.geometry import apply_permutation, random_orthogonal, random_permutations, remove_com
from eqbench.systems.base import SYMMETRIES
from eqbench.systems.double_well import make_dw2, make_dw4
from eqbench.systems.lennard_jones import make_lj13

SYSTEMS = {"dw2": make_dw2, "dw4": make_dw4, "lj13": make_lj13}
#: Typical spread of configurations: pair distances ~ 4 (DW), ~ 1-2 (LJ-13).
SCALE = {"dw2": 2.0, "dw4": 2.0, "lj13": 0.8}
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are small: one thread is faster, and immune to stalls of the OpenMP pool
    on a loaded machine (a parallel region can wait a whole scheduler slice for its 2nd thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_flow(system: str, **config) -> KernelFlow:
    torch.manual_seed(1)
    return build(SYSTEMS[system](), {"init_scale": 0.1, "dtype": "float64", **config})


def configurations(n: int, n_particles: int, n_dims: int, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return remove_com(scale * torch.randn(n, n_particles, n_dims, generator=g, dtype=F64))


def reference_velocity(flow: KernelFlow, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An independent implementation: all ordered pairs, ``φ`` from the textbook formula."""
    r = x.unsqueeze(2) - x.unsqueeze(1)  # r_ij = x_i - x_j, [B, N, N, D]
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    d = torch.sqrt(r.square().sum(-1) + eye)  # the diagonal (r = 0) gets d = 1: no sqrt(0)
    g = torch.exp(-2 * flow.log_distance_bandwidths)
    kd = torch.softmax(-(d.unsqueeze(-1) - flow.distance_centres).square() * g, dim=-1)
    b2 = torch.exp(-2 * flow.log_time_bandwidths)
    rt = torch.softmax(-(t - flow.time_centres).square() * b2, dim=-1)
    c = flow.distance_bias
    if flow.offset == "radial":
        # φ(d, t) = Σ_l R_l(t) [Σ_k W_lk K_k(d) + b_l] + Σ_k c_k K_k(d), literally
        phi = torch.einsum("l,lk,bijk->bij", rt, flow.weight, kd) + rt @ flow.time_bias + kd @ c
    else:
        # the authors' code: φ(d, t) = Σ_l R_l(t) [Σ_k (K_k(d) + c_k²) W_lk + b_l], literally
        phi = torch.einsum("l,lk,bijk->bij", rt, flow.weight, kd + c.square()) + rt @ flow.time_bias
    return (phi.unsqueeze(-1) * r).sum(2)


def brute_divergence(flow: KernelFlow, t: torch.Tensor, x: torch.Tensor, velocity=None) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        v = (velocity or flow.velocity)(t, x)
        return brute_force_divergence(v, x, create_graph=False)


def rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bij,bnj->bni", q, x)


# ----------------------------------------------------------------------------- construction
@pytest.mark.parametrize("system", ["dw2", "dw4", "lj13"])
def test_parameter_count_is_620_and_kernels_are_buffers(system):
    flow = build(SYSTEMS[system](), {})
    assert flow.n_parameters == 620
    assert sum(p.numel() for p in flow.parameters()) == 620
    shapes = {name: tuple(p.shape) for name, p in flow.named_parameters()}
    assert shapes == {
        "weight": (10, 50),
        "time_bias": (10,),
        "distance_bias": (50,),
        "log_distance_bandwidths": (50,),
        "log_time_bandwidths": (10,),
    }
    assert {name for name, _ in flow.named_buffers()} == {"distance_centres", "time_centres"}
    assert all(p.dtype == torch.float32 for p in flow.parameters())
    assert flow.has_closed_form_divergence and flow.symmetries == SYMMETRIES
    assert flow.train_divergence == "exact" and flow.solver.mode == "dto" and flow.solver.steps == 20


def test_default_kernel_placement():
    dw = default_kernels(make_dw4())
    assert torch.allclose(dw["distance_centres"], torch.linspace(0, 8, 50, dtype=F64))
    assert torch.all(dw["distance_bandwidths"] == 0.5) and torch.all(dw["time_bandwidths"] == 0.3)
    lj = default_kernels(make_lj13())
    mu, gamma, beta = lj["distance_centres"], lj["distance_bandwidths"], lj["time_bandwidths"]
    expected = torch.sort((torch.linspace(0, 16, 50, dtype=F64) - 1.5) ** 2 / 32).values
    assert torch.equal(mu, expected) and abs(float(mu.max()) - 14.5**2 / 32) < 1e-12
    assert torch.allclose(gamma, 0.3 + 3 * (mu - 1.5) ** 2 / 64)
    # bandwidths narrowest near r_m (paper C.1), widening towards the interval bounds
    assert 1.0 < float(mu[torch.argmin(gamma)]) < 2.0 and float(gamma[-1]) > 4 * float(gamma.min())
    # time bandwidths narrowest at t = 0.5, widest at the ends: the authors' code by default
    # ((0.3 + 0.5 (ν - 0.5)²) / √10), eqbench's former rule on request (0.15 + 0.6 (ν - 0.5)²)
    assert float(beta.min()) < float(beta[0]) and torch.allclose(beta, beta.flip(0))
    assert abs(float(beta[0]) - 0.425 / math.sqrt(10)) < 1e-12
    former = default_kernels(make_lj13(), time_bandwidths="eqbench")["time_bandwidths"]
    assert abs(float(former[0]) - 0.3) < 1e-12 and float(former.min()) < float(former[0])


def test_build_options_and_errors():
    dw4 = make_dw4()
    flow = build(dw4, {"n_distance_kernels": 20, "n_time_kernels": 4, "steps": 7, "dtype": "float64"})
    assert flow.n_parameters == 4 * 20 + 20 + 4 + 20 + 4 and flow.solver.steps == 7
    assert all(p.dtype == F64 for p in flow.parameters())
    with pytest.raises(ConfigError, match="unknown kernel-flow settings: hidden.*valid:.*n_distance_kernels"):
        build(dw4, {"hidden": 3})
    with pytest.raises(ConfigError, match="dtype"):
        build(dw4, {"dtype": "float16"})
    with pytest.raises(ConfigError, match="init_scale"):
        build(dw4, {"init_scale": -1})
    with pytest.raises(ConfigError, match="at least 2 distance and 2 time kernels"):
        build(dw4, {"n_distance_kernels": 1})
    # A system the paper does not have gets the placement of its kind (no name lookup): DW-4's.
    dw8 = build(make_dw4().__class__(name="dw8", n_particles=8, n_dims=2), {})
    assert dw8.n_parameters == 620
    assert torch.equal(dw8.distance_centres, torch.linspace(0, 8, 50, dtype=F64).float())


def test_text_and_code_options():
    """bandwidths / time_bandwidths / offset (module docstring "Text, code and defaults")."""
    lj = make_lj13()
    default = build(lj, {})
    assert (default.bandwidths, default.offset) == ("trainable", "paper-code")
    expected = (0.3 + 0.5 * (torch.linspace(0, 1, 10, dtype=F64) - 0.5) ** 2) / math.sqrt(10)
    assert torch.allclose(default.log_time_bandwidths.detach().double().exp(), expected, rtol=1e-6, atol=0)
    # fixed bandwidths: buffers under the same state_dict names, 560 trainable scalars
    fixed = build(lj, {"bandwidths": "fixed"})
    assert fixed.n_parameters == 560 and sum(p.numel() for p in fixed.parameters()) == 560
    assert {"log_distance_bandwidths", "log_time_bandwidths"} <= {n for n, _ in fixed.named_buffers()}
    assert set(fixed.state_dict()) == set(default.state_dict())
    with pytest.raises(ConfigError, match="bandwidths must be one of trainable, fixed"):
        build(lj, {"bandwidths": "frozen"})
    with pytest.raises(ConfigError, match="time_bandwidths must be one of paper-code, eqbench"):
        build(lj, {"time_bandwidths": "paper"})
    with pytest.raises(ConfigError, match="offset must be one of paper-code, radial"):
        build(lj, {"offset": "none"})


def test_fixed_bandwidths_stay_fixed_in_training():
    """An optimiser step moves W, b, c but not the bandwidths of a fixed-bandwidth flow."""
    s = make_dw4()
    torch.manual_seed(0)
    flow = build(s, {"bandwidths": "fixed", "dtype": "float64", "init_scale": 0.1, "steps": 4})
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-2)
    loss = -flow.log_prob(configurations(8, 4, 2, 2.0)).mean()
    loss.backward()
    opt.step()
    after = flow.state_dict()
    for name in ("log_distance_bandwidths", "log_time_bandwidths"):
        assert torch.equal(after[name], before[name]), name
    for name in ("weight", "time_bias", "distance_bias"):
        assert not torch.equal(after[name], before[name]), name


def test_paper_code_offset_is_constant_in_distance():
    """The authors' (K + c²) W: c shifts φ(·, t) by a constant in d; the radial offset does not."""
    d = torch.linspace(0.3, 7.0, 9, dtype=F64)
    tt = torch.tensor(0.4, dtype=F64)
    for offset, constant in (("paper-code", True), ("radial", False)):
        flow = make_flow("dw4", offset=offset)
        base = flow.coupling(d, tt)
        with torch.no_grad():
            flow.distance_bias.add_(torch.linspace(0.5, 1.5, 50, dtype=F64))
        shift = flow.coupling(d, tt) - base
        spread = float((shift.max() - shift.min()).detach())
        assert (spread < 1e-12) == constant, (offset, spread)
        assert float(shift.detach().abs().max()) > 1e-3


# ----------------------------------------------------------------------------- the field
@pytest.mark.parametrize("offset", ["paper-code", "radial"])
@pytest.mark.parametrize("system", ["dw4", "lj13"])
def test_velocity_matches_independent_reference(system, offset):
    flow = make_flow(system, offset=offset)
    s = SYSTEMS[system]()
    x = configurations(5, s.n_particles, s.n_dims, SCALE[system])
    for t in (0.0, 0.3, 1.0):
        tt = torch.tensor(t, dtype=F64)
        ref = reference_velocity(flow, tt, x)
        with torch.no_grad():
            v_fast = flow.velocity(tt, x)
            v_div, _ = flow.velocity_and_divergence(tt, x)
        v_grad = flow.velocity(tt, x.clone().requires_grad_(True))
        for v in (v_fast, v_div, v_grad):
            assert torch.allclose(v, ref, rtol=1e-12, atol=1e-12)
    # φ through the public helper agrees with the kernel weights: φ = K(d) · w(t)
    d = torch.linspace(0.0, 20.0, 7, dtype=F64)
    tt = torch.tensor(0.6, dtype=F64)
    assert torch.allclose(flow.coupling(d, tt), flow.distance_kernels(d) @ flow.kernel_weights(tt))


@pytest.mark.parametrize(
    ("system", "n_particles", "scale"),
    [("dw4", None, None), ("lj13", None, None), ("dw4", 32, 15.0), ("lj13", 32, 10.0), ("dw4", 64, 20.0),
     ("lj13", 64, 20.0)],
)
@pytest.mark.parametrize("offset", ["paper-code", "radial"])
def test_closed_form_divergence_equals_autograd_trace(system, n_particles, scale, offset):
    """Typical configurations, and spread-out ones where most distances lie far beyond the kernels.

    A published implementation gets the quotient rule of the normalisation wrong there (off by
    ~5 at 32 particles, ~40 at 64; SPEC §4); here the closed form must match to round-off.
    """
    flow = make_flow(system, offset=offset)
    s = SYSTEMS[system]()
    n = n_particles or s.n_particles
    x = configurations(3 if scale is None else 1, n, s.n_dims, scale or SCALE[system], seed=n)
    if scale:  # most pair distances beyond the last kernel centre (8 for DW, 6.6 for LJ-13)
        d = torch.cdist(x, x)
        assert float((d > float(flow.distance_centres.max()) + 3).float().mean()) > 0.5
    for t in (0.0, 0.5, 1.0):
        tt = torch.tensor(t, dtype=F64)
        with torch.no_grad():
            _, div = flow.velocity_and_divergence(tt, x)
        _, div_graph = flow.velocity_and_divergence(tt, x.clone().requires_grad_(True))
        brute = brute_divergence(flow, tt, x)
        scale_ = brute.abs().max()
        assert float((div - brute).abs().max() / scale_) < 1e-8
        assert torch.allclose(div_graph, div, rtol=1e-13, atol=0)
        # the CNF entry point picks the closed form
        _, div_cnf = flow.divergence(t, x, "exact")
        assert torch.allclose(div_cnf, div, rtol=1e-13, atol=0)
        if t == 0.5:  # and an implementation sharing no code with the model agrees
            reference = brute_divergence(flow, tt, x, velocity=lambda t_, x_: reference_velocity(flow, t_, x_))
            assert float((div - reference).abs().max() / scale_) < 1e-8


def test_normalisation_derivative_matters_far_out():
    """Dropping the derivative of Σ g (the quotient-rule bug) visibly changes the divergence."""
    flow = make_flow("dw4")
    x = configurations(2, 32, 2, 15.0, seed=3)
    tt = torch.tensor(0.5, dtype=F64)
    with torch.no_grad():
        _, div = flow.velocity_and_divergence(tt, x)
        r = x.unsqueeze(2) - x.unsqueeze(1)
        iu = torch.triu_indices(32, 32, 1)
        d = r.square().sum(-1).sqrt()[:, iu[0], iu[1]]
        g = torch.exp(-2 * flow.log_distance_bandwidths)
        k = flow.distance_kernels(d)
        a = -2 * (d.unsqueeze(-1) - flow.distance_centres) * g
        w = flow.kernel_weights(tt)
        phi = k @ w
        naive_dphi = (k * a) @ w  # K_k' = K_k a_k: misses -K_k Σ_m K_m a_m
        naive = 2 * (naive_dphi * d + 2 * phi).sum(-1)
    assert float((naive - div).abs().max()) > 1.0


def test_equivariance_translation_invariance_and_com():
    for system in ("dw4", "lj13"):
        flow = make_flow(system)
        s = SYSTEMS[system]()
        g = torch.Generator().manual_seed(5)
        x = configurations(6, s.n_particles, s.n_dims, SCALE[system])
        q = random_orthogonal(6, s.n_dims, generator=g)
        assert (torch.linalg.det(q) < 0).any() and (torch.linalg.det(q) > 0).any()  # rotations and reflections
        perm = random_permutations(6, s.n_particles, generator=g)
        shift = 3.0 * torch.randn(6, 1, s.n_dims, generator=g, dtype=F64)
        tt = torch.tensor(0.4, dtype=F64)
        with torch.no_grad():
            v, div = flow.velocity_and_divergence(tt, x)
            for gx, gv in (
                (rotate(x, q), rotate(v, q)),
                (apply_permutation(x, perm), apply_permutation(v, perm)),
                (x + shift, v),
            ):
                v2, div2 = flow.velocity_and_divergence(tt, gx)
                assert torch.allclose(v2, gv, rtol=0, atol=1e-12)
                assert torch.allclose(div2, div, rtol=1e-12, atol=1e-12)
        assert float(v.sum(1).abs().max()) < 1e-12  # Σ_i v_i = 0: the CoM is preserved


def test_velocity_is_a_gradient_field():
    """v = ∇Φ (paper A.4), so its Jacobian is symmetric."""
    flow = make_flow("lj13")
    x = configurations(1, 13, 3, 0.8)[0]
    tt = torch.tensor(0.7, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda y: flow.velocity(tt, y.view(1, 13, 3)).reshape(-1), x.reshape(-1))
    assert float((jac - jac.T).abs().max()) < 1e-12 * float(jac.abs().max()) + 1e-14
    assert float(jac.abs().max()) > 1e-2


def test_fused_backward_matches_autograd():
    """The hand-written backward of velocity + divergence against plain autograd.

    The reference builds div by brute force with ``create_graph`` on the twice-differentiable
    ``velocity``; gradients of a loss mixing v and div must agree for x and every parameter.
    """
    flow = make_flow("lj13")
    x0 = configurations(3, 13, 3, 0.8)
    g = torch.Generator().manual_seed(2)
    weight_v = torch.randn(x0.shape, generator=g, dtype=F64)
    weight_d = torch.randn(3, generator=g, dtype=F64)
    tt = torch.tensor(0.35, dtype=F64)
    grads = []
    for fused in (True, False):
        flow.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        if fused:
            v, div = flow.velocity_and_divergence(tt, x)
        else:
            v = flow.velocity(tt, x)
            div = brute_force_divergence(v, x, create_graph=True)
        loss = (weight_v * v).sum() + (weight_d * div).sum() + (v.square().sum(-1) * div.unsqueeze(-1)).sum()
        loss.backward()
        grads.append([x.grad] + [p.grad for p in flow.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    # and the node itself, numerically (few kernels keep gradcheck cheap)
    flow = make_flow("lj13", n_distance_kernels=6, n_time_kernels=3)
    coef, packed = (a.detach() for a in flow._field_inputs(tt))
    inputs = tuple(a.clone().requires_grad_(True) for a in (x0[:2, :5], coef, packed))
    assert torch.autograd.gradcheck(_PairField.apply, inputs)


def test_hutchinson_and_brute_force_train_through_velocity():
    """velocity() is twice differentiable, so estimator-based training works too."""
    flow = make_flow("dw4", train_divergence="hutchinson")
    x = configurations(4, 4, 2, 2.0)
    noise = rademacher_like(x)
    _, est = flow.divergence(0.3, x, "hutchinson", noise=noise)
    est.sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in flow.parameters())
    _, exact = flow.divergence(0.3, x, "brute-force")
    assert torch.allclose(exact, flow.divergence(0.3, x, "closed-form")[1], rtol=1e-10)


def test_any_number_of_particles_and_non_scalar_time():
    flow = make_flow("lj13")
    for n in (2, 7, 40):
        x = configurations(2, n, 3, 1.0)
        with torch.no_grad():
            v, div = flow.velocity_and_divergence(torch.tensor(0.2, dtype=F64), x)
        assert v.shape == x.shape and div.shape == (2,) and torch.isfinite(div).all()
    with pytest.raises(ValueError, match="one time"):
        flow.velocity(torch.zeros(3, dtype=F64), configurations(3, 13, 3, 1.0))


# ----------------------------------------------------------------------------- the flow
def test_round_trip_with_dto_solver():
    """inverse(forward(z)) with fixed-grid RK4: the error is the discretisation's, O(h^4).

    Measured with init_scale 0.3 on DW-4 (points move by ~0.6, |log det| up to ~7): 3.0e-5 at 20
    steps, 9.4e-7 at 40, 2.9e-8 at 80 (factor ~32 per halving); log-det mismatch 2.2e-4 / 6.9e-6 /
    2.1e-7. Tolerances are ~3-5x the measured errors.
    """
    flow = make_flow("dw4", init_scale=0.3, offset="radial").eval()  # the measured numbers above
    z = flow.prior.sample(8, generator=torch.Generator().manual_seed(0), dtype=F64)
    errors = {}
    for steps, tol_z, tol_ld in ((20, 1e-4, 1e-3), (40, 4e-6, 3e-5)):
        flow.with_solver(steps=steps)
        with torch.no_grad():
            x, ld = flow.forward(z)
            z_back, ld_back = flow.inverse(x)
        errors[steps] = float((z_back - z).abs().max())
        assert float((x - z).abs().max()) > 0.5  # a non-trivial map
        assert errors[steps] < tol_z
        assert float((ld + ld_back).abs().max()) < tol_ld
        assert float(x.mean(1).abs().max()) < 1e-12  # stays CoM-free
    assert errors[40] < errors[20] / 16  # fourth order


def test_forward_logdet_equals_brute_force_jacobian():
    """log|det ∂x/∂z| on U from the integrated divergence vs slogdet of the map's Jacobian.

    The integrated divergence and the exact Jacobian of the RK4-discretised map differ by the
    discretisation error: measured 1.7e-6 at 20 steps, 1.2e-7 at 40, 8e-9 at 80 (init_scale 0.3,
    DW-4, log det ~ -1.2).
    """
    flow = make_flow("dw4", init_scale=0.3, offset="radial").eval()  # the measured numbers above
    z = flow.prior.sample(1, generator=torch.Generator().manual_seed(1), dtype=F64)
    n, dims = 4, 2
    p = torch.eye(n, dtype=F64) - 1.0 / n
    evals, evecs = torch.linalg.eigh(p)
    basis = torch.kron(evecs[:, evals > 0.5], torch.eye(dims, dtype=F64))  # [N·D, (N-1)·D], orthonormal
    for steps, tol in ((20, 1e-5), (40, 1e-6)):
        flow.with_solver(steps=steps)
        jac = torch.autograd.functional.jacobian(lambda v: flow.forward(v.view(1, n, dims))[0].reshape(-1), z.reshape(-1))
        sign, brute = torch.linalg.slogdet(basis.T @ jac @ basis)
        with torch.no_grad():
            _, logdet = flow.forward(z)
        assert float(sign) > 0 and abs(float(logdet[0])) > 1.0
        assert abs(float(brute - logdet[0])) < tol


@pytest.mark.parametrize("system", ["dw4", "lj13"])
def test_every_parameter_gets_a_gradient(system):
    """From -log q(x) through the DTO solve, at the near-identity default init and a larger one."""
    s = SYSTEMS[system]()
    for config in ({"dtype": "float64"}, {"dtype": "float64", "init_scale": 0.1, "steps": 5}):
        torch.manual_seed(0)
        flow = build(s, config).train()
        x = configurations(4, s.n_particles, s.n_dims, SCALE[system])
        loss = -flow.log_prob(x).mean()
        loss.backward()
        assert math.isfinite(float(loss.detach()))
        for name, p in flow.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().max()) > 0, name


def test_float32_agrees_with_float64():
    """The default float32 model computes the same loss and gradients as its float64 twin."""
    torch.manual_seed(0)
    flow64 = build(make_lj13(), {"dtype": "float64", "init_scale": 0.05, "steps": 10}).train()
    flow32 = copy.deepcopy(flow64).float()
    x = configurations(8, 13, 3, 0.8)
    grads = []
    losses = []
    for flow, xx in ((flow32, x.float()), (flow64, x)):
        loss = -flow.log_prob(xx).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.reshape(-1).double() for p in flow.parameters()]))
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[1])
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-4


def test_otd_adjoint_agrees_with_fine_dto():
    """The per-solve constant cache is safe with the adjoint (its backward solve recomputes them)."""
    x = configurations(2, 4, 2, 2.0)
    results = []
    for config in ({"steps": 80}, {"solver": "otd"}):
        flow = make_flow("dw4", init_scale=0.3, **config).train()
        log_q = flow.log_prob(x)
        (-log_q.mean()).backward()
        results.append((log_q.detach(), torch.cat([p.grad.reshape(-1) for p in flow.parameters()])))
        assert flow._solve_constants is None
    (lq_dto, g_dto), (lq_otd, g_otd) = results
    assert float((lq_otd - lq_dto).abs().max()) < 2e-3  # dopri5 at rtol 1e-5 vs RK4 with 80 steps
    assert float((g_otd - g_dto).norm() / g_dto.norm()) < 1e-3
