"""The non-equivariant baselines: black-box neural ODE (paper §7.3, C.3) and real NVP (B.2, C.5).

Everything in float64. The numbers in the docstrings of eqbench.flows.node / real_nvp (parameter
counts, the paper's arithmetic, the CoM constant) are recomputed here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from eqbench.api import get_system
from eqbench.errors import ConfigError
from eqbench.flows import node, real_nvp
from eqbench.flows.prior import CoMFreeNormal
from eqbench.geometry import apply_permutation, random_permutations, random_rotations, remove_com

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run thousands of tiny ops (batch <= 32, <= 39 features); with two OpenMP threads on
    a busy 2-core machine they were measured 5-20x slower (thread spin-waiting), with one not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp_count(n_in: int, hidden: list[int], n_out: int) -> int:
    widths = [n_in, *hidden, n_out]
    return sum((a + 1) * b for a, b in itertools.pairwise(widths))


def _node(name: str, **config) -> node.NeuralODE:
    torch.manual_seed(0)
    return node.build(get_system(name), config).double()


def _nvp(name: str, **config) -> real_nvp.RealNVP:
    torch.manual_seed(0)
    return real_nvp.build(get_system(name), config).double()


def _configs(name: str, n: int, seed: int) -> torch.Tensor:
    system = get_system(name)
    return remove_com(torch.randn(n, system.n_particles, system.n_dims, generator=_gen(seed), dtype=F64) * 1.5)


def _flat_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``fn`` (``[1, N, D] -> [1, N, D]``) at one configuration, as a flat ``[ND, ND]`` matrix."""
    shape = x.shape

    def flat(v):
        return fn(v.reshape(shape)).reshape(-1)

    return torch.autograd.functional.jacobian(flat, x.reshape(-1))


def _derangements(n: int, n_particles: int, seed: int) -> torch.Tensor:
    """Random permutations without a fixed point: a cyclic shift conjugated by a random relabelling σ,
    ``perm[i] = σ⁻¹[(σ[i] - 1) mod N]``."""
    sigma = random_permutations(n, n_particles, generator=_gen(seed))
    inverse = torch.argsort(sigma, dim=-1)
    return torch.gather(inverse, -1, (sigma - 1) % n_particles)


# ====================================================================== parameter counts
def test_node_parameter_counts_match_the_paper():
    assert _node("dw4").n_parameters == 5_256 == _mlp_count(8, [64, 64], 8)
    assert _node("lj13").n_parameters == 21_671 == _mlp_count(39, [64, 128, 64], 39)
    # A time input would add one column to the first layer: the paper's counts mean "no time".
    assert _mlp_count(9, [64, 64], 8) - 5_256 == 64
    assert _node("dw4", hidden=[16]).n_parameters == _mlp_count(8, [16], 8)


def test_real_nvp_parameter_counts_and_the_papers_arithmetic():
    dw4, lj13 = _nvp("dw4"), _nvp("lj13")
    # stated layout: 8 / 16 blocks, two [m, 64, 64, n-m] nets each
    assert _mlp_count(4, [64, 64], 4) == 4_740
    assert dw4.n_parameters == 75_840 == 16 * 4_740
    assert lj13.n_parameters == 215_680 == 32 * _mlp_count(19, [64, 64], 20)
    # paper C.5 says 21,576 for DW-4: not 16 identical nets; hidden 32 gives paper - 8
    assert 21_576 % 16 != 0
    assert 16 * _mlp_count(4, [32, 32], 4) == 21_568 == 21_576 - 8
    assert _nvp("dw4", hidden=[32, 32]).n_parameters == 21_568
    # LJ-13: a net [a, 64, 64, b] with a + b = 39 has 6,720 + b parameters
    assert all(_mlp_count(a, [64, 64], 39 - a) == 6_720 + 39 - a for a in (19, 20))
    # alternating which half (19 or 20) is transformed would give 215,664 instead
    assert 16 * (_mlp_count(19, [64, 64], 20) + _mlp_count(20, [64, 64], 19)) == 215_664
    # every LJ-13 block transforms 20 coordinates; the split alternates 19/20 and 20/19
    assert [(b.n_cond, b.n_trans, b.condition_first) for b in lj13.blocks[:2]] == [(19, 20, True), (19, 20, False)]
    assert len(dw4.blocks) == 8 and len(lj13.blocks) == 16


# ====================================================================== node
@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_node_velocity_is_com_free_and_exact_divergence_is_the_jacobian_trace(name):
    flow = _node(name, init_scale=5.0)
    x = _configs(name, 2, seed=1)
    t = torch.tensor(0.3, dtype=F64)
    v = flow.velocity(t, x).detach()
    assert float(v.sum(dim=1).abs().max()) < 1e-12
    _, div = flow.divergence(t, x, method="exact")
    div = div.detach()
    for b in range(x.shape[0]):
        jac = _flat_jacobian(lambda y: flow.velocity(t, y), x[b:b + 1])
        trace = torch.trace(jac)
        assert abs(float(div[b] - trace)) < 1e-8 * max(1.0, abs(float(trace)))
        # tr(A J) = tr(A J A): the full-space trace equals the trace on the CoM-free subspace
        n, d = flow.n_particles, flow.n_dims
        proj = torch.eye(n * d, dtype=F64) - torch.kron(torch.full((n, n), 1.0 / n, dtype=F64), torch.eye(d, dtype=F64))
        assert abs(float(torch.trace(proj @ jac @ proj) - trace)) < 1e-10
        # Hutchinson with a fixed probe is exactly eps^T J eps
        eps = (2 * torch.randint(0, 2, (1, n, d), generator=_gen(b)) - 1).to(F64)
        _, est = flow.divergence(t, x[b:b + 1], method="hutchinson", noise=eps)
        assert abs(float(est.detach()[0] - eps.reshape(-1) @ jac @ eps.reshape(-1))) < 1e-10


def test_node_ignores_time():
    flow = _node("dw4", init_scale=5.0)
    x = _configs("dw4", 4, seed=2)
    assert torch.equal(flow.velocity(torch.tensor(0.0, dtype=F64), x), flow.velocity(torch.tensor(1.0, dtype=F64), x))


def test_node_dto_round_trip_converges_at_rk4_order():
    """inverse(forward(z)) on the 20-step RK4 grid is exact up to discretisation error.

    Forward and backward RK4 maps are different discrete maps, so the round trip is not exact;
    its error is O(h^5) (the h^5 local terms of the two directions cancel). With a field whose
    displacements are ~2.5 (init_scale=5), measured: 1.9e-9 at 20 steps, 5.8e-11 at 40 (dw4).
    The test asserts < 1e-7 at 20 steps and a >= 16x decrease per halving of h (>= 4th order),
    so a bug (wrong sign, wrong time direction, missing stage) cannot hide below the tolerance.
    """
    flow = _node("dw4", init_scale=5.0).eval()
    z = remove_com(torch.randn(8, 4, 2, generator=_gen(3), dtype=F64))
    errors = {}
    with torch.no_grad():
        for steps in (20, 40):
            # the trajectory does not depend on how the divergence is computed: use the cheap one
            flow.with_solver(steps=steps)
            x, _ = flow.integrate(z, 0.0, 1.0, method="hutchinson")
            z_back, _ = flow.integrate(x, 1.0, 0.0, method="hutchinson")
            errors[steps] = float((z_back - z).abs().max())
        assert float((x - z).abs().max()) > 1.0  # a real transport, not a near-identity map
        assert float(x.sum(dim=1).abs().max()) < 1e-12
        flow.with_solver(steps=20)
        x, logdet_f = flow.forward(z[:2])  # eval mode: exact (brute-force) divergence
        z_back, logdet_i = flow.inverse(x)
    assert float((z_back - z[:2]).abs().max()) < 1e-7
    assert float((logdet_f + logdet_i).abs().max()) < 1e-7
    assert errors[20] < 1e-7
    assert errors[40] < errors[20] / 16


@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_node_is_not_equivariant(name):
    flow = _node(name)
    system = get_system(name)
    x = _configs(name, 4, seed=4)
    t = torch.tensor(0.5, dtype=F64)
    v = flow.velocity(t, x)
    rot = random_rotations(4, system.n_dims, generator=_gen(5))
    perm = _derangements(4, system.n_particles, seed=6)
    v_rot = flow.velocity(t, x @ rot.transpose(-1, -2))
    v_perm = flow.velocity(t, apply_permutation(x, perm))
    scale = v.norm(dim=(-2, -1))
    assert ((v_rot - v @ rot.transpose(-1, -2)).norm(dim=(-2, -1)) / scale).min() > 1e-3
    assert ((v_perm - apply_permutation(v, perm)).norm(dim=(-2, -1)) / scale).min() > 1e-3
    assert flow.symmetries == ()


def test_node_training_step_reaches_every_parameter():
    flow = _node("dw4", steps=4)
    flow.train()
    assert flow.train_divergence == "hutchinson" and flow.eval_divergence == "exact"
    assert flow.training_estimator == {"divergence": "hutchinson"}
    loss = -flow.training_log_prob(_configs("dw4", 16, seed=7)).mean()
    loss.backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_node_build_validates_its_config():
    dw4 = get_system("dw4")
    assert node.build(dw4).net[0].weight.dtype == torch.float32
    assert node.build(dw4, {"dtype": "float64", "solver": "otd"}).solver.mode == "otd"
    with pytest.raises(ConfigError, match="unknown node settings: width"):
        node.build(dw4, {"width": 3})
    with pytest.raises(ConfigError, match="hidden"):
        node.build(dw4, {"hidden": 64})
    # No name lookup: a system called dw8 with DW-4's four particles is DW-4-sized (N·D = 8).
    assert node.build(dataclasses.replace(dw4, name="dw8"), {}).hidden == (64, 64)


# ====================================================================== real NVP
@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_real_nvp_round_trip_and_logdet_vs_jacobian(name):
    flow = _nvp(name, init_scale=1.0)
    system = get_system(name)
    z = torch.randn(8, system.n_particles, system.n_dims, generator=_gen(8), dtype=F64)
    with torch.no_grad():
        x, logdet_f = flow.forward(z)
        z_back, logdet_i = flow.inverse(x)
    assert float((x - z).abs().max()) > 0.5 and float(logdet_f.abs().max()) > 0.5  # far from identity
    assert float((z_back - z).abs().max()) < 1e-10
    assert float((logdet_f + logdet_i).abs().max()) < 1e-10
    for b in range(2):
        jac = _flat_jacobian(lambda v: flow.forward(v)[0], z[b:b + 1])
        assert jac.shape == (system.dim, system.dim)
        sign, brute = torch.linalg.slogdet(jac)
        assert sign > 0 and abs(float(brute - logdet_f[b])) < 1e-8


def test_real_nvp_sample_density_matches_log_prob_augmented():
    flow = _nvp("lj13", init_scale=0.3)
    with torch.no_grad():
        x_full, log_q_full = flow.sample_augmented(32, generator=_gen(9))
        x, log_q = flow.sample(32, generator=_gen(9))
        log_p = flow.log_prob_augmented(x_full)
    assert torch.equal(x, remove_com(x_full)) and torch.equal(log_q, log_q_full)
    assert float(x.mean(dim=1).abs().max()) < 1e-12
    assert float(x_full.mean(dim=1).abs().max()) > 1e-3  # the samples had a CoM before removal
    assert float((log_p - log_q).abs().max()) < 1e-10


@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_real_nvp_identity_gives_the_com_free_normal_density(name):
    """With every net's last layer at zero the flow is the identity; then log_prob_augmented of
    x + c is exactly the CoM-free prior density of x, for every c — including its Gaussian
    constant. Subtracting log N(c; 0, I_D/N) instead would be off by (D/2) log N."""
    flow = _nvp(name)
    with torch.no_grad():
        for block in flow.blocks:
            for net in (block.scale_net, block.translation_net):
                net[-1].weight.zero_()
    system = get_system(name)
    x = _configs(name, 16, seed=10)
    c = torch.randn(16, 1, system.n_dims, generator=_gen(11), dtype=F64)
    prior = CoMFreeNormal(system.n_particles, system.n_dims).log_prob(x)
    n, d = system.n_particles, system.n_dims
    log_normal_c = -0.5 * n * c.squeeze(1).pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi / n)  # N(c; 0, I_D/N)
    with torch.no_grad():
        assert float((flow.log_prob_augmented(x + c) - prior).abs().max()) < 1e-12
        assert float((flow.log_prob(x, generator=_gen(12)) - prior).abs().max()) < 1e-12
        naive = flow.log_prob_full(x + c) - log_normal_c
    offset = 0.5 * system.n_dims * math.log(system.n_particles)
    assert float((prior - naive - offset).abs().max()) < 1e-12
    assert round(offset, 3) == {"dw4": 1.386, "lj13": 3.847}[name]


def test_real_nvp_log_prob_is_stochastic_and_reproducible():
    flow = _nvp("dw4", init_scale=1.0)
    x = _configs("dw4", 16, seed=13)
    with torch.no_grad():
        a = flow.log_prob(x, generator=_gen(14))
        b = flow.log_prob(x, generator=_gen(14))
        c = flow.log_prob(x, generator=_gen(15))
        shifted = flow.log_prob(x + 2.0, generator=_gen(14))  # the input's CoM is removed first
    assert torch.equal(a, b)
    assert float((a - shifted).abs().max()) < 1e-12
    assert float((a - c).abs().max()) > 1e-3


def test_real_nvp_is_not_permutation_equivariant():
    flow = _nvp("lj13", init_scale=0.3)
    x = torch.randn(4, 13, 3, generator=_gen(16), dtype=F64)
    perm = _derangements(4, 13, seed=17)
    with torch.no_grad():
        diff = flow.log_prob_augmented(apply_permutation(x, perm)) - flow.log_prob_augmented(x)
    assert float(diff.abs().min()) > 1e-3
    assert flow.symmetries == () and flow.com_augmented is True


def test_real_nvp_training_step_reaches_every_parameter():
    flow = _nvp("dw4")
    flow.train()
    assert flow.training_estimator == {"iw_draws": 1}
    loss = -flow.training_log_prob(_configs("dw4", 16, seed=18)).mean()
    loss.backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_real_nvp_build_validates_its_config():
    dw4 = get_system("dw4")
    flow = real_nvp.build(dw4, {"blocks": 2, "log_scale_bound": 0})
    assert len(flow.blocks) == 2 and flow.blocks[0].log_scale_bound is None
    assert flow.blocks[0].scale_net[0].weight.dtype == torch.float32
    assert real_nvp.build(dw4, {"log_scale_bound": "none"}).blocks[0].log_scale_bound is None
    with pytest.raises(ConfigError, match="unknown real-nvp settings: steps"):
        real_nvp.build(dw4, {"steps": 3})
    with pytest.raises(ConfigError, match="blocks"):
        real_nvp.build(dw4, {"blocks": 0})
    flow = real_nvp.build(dataclasses.replace(dw4, name="dw8"), {})  # sized by N·D = 8, not by name
    assert len(flow.blocks) == 8 and flow.hidden == (64, 64)
