"""The G-residual flow (``g-resflow``; Bose et al., Behrmann et al. 2019, Chen et al. 2019).

Float64 for every exact identity (log-determinant vs the autograd Jacobian, symmetries, the
fixed-point tolerance). Two ways of making the blocks do something: ``stressed`` multiplies every
raw weight by 10, so every spectral normalisation is active and each block's proven bound is the
full coefficient; ``saturating`` uses a one-unit pair MLP whose weights are aligned (LipSwish in
its steepest region), so ``ρ`` is nearly the steepest ramp the bound allows and the largest
singular value of ``∂g`` comes close to the coefficient: a bound that forgot the factor N of
the pair sum would be exceeded there. The unmarked tests take ~20-30 s single-threaded.
"""

from __future__ import annotations

import math

import pytest
import torch

import eqbench
from eqbench.errors import ConfigError
from eqbench.flows.residual_flow import (
    LOGDET_ESTIMATORS,
    FixedPointError,
    GResidualFlow,
    _lipswish,
    build,
    default_distance_scale,
    validate,
)
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


def make(system, seed: int = 0, **config) -> GResidualFlow:
    torch.manual_seed(seed)
    return build(system, {"dtype": "float64", **config})


def stressed(flow: GResidualFlow, factor: float = 10.0) -> GResidualFlow:
    with torch.no_grad():
        for block in flow.blocks:
            for layer in block.layers:
                layer.weight.mul_(factor)
    return flow


def saturating(system, coefficient: float = 0.9, blocks: int = 1) -> GResidualFlow:
    """One hidden unit per layer, weights +1 and biases at LipSwish's steepest point (a ≈ 2.4)."""
    flow = make(system, blocks=blocks, hidden=[1], lipschitz_coefficient=coefficient)
    with torch.no_grad():
        for block in flow.blocks:
            first, last = block.layers
            first.weight.fill_(1.0)
            first.bias.fill_(2.4)
            last.weight.fill_(1.0)
    return flow


def configurations(system, kind: str, n: int = 16, seed: int = 0) -> torch.Tensor:
    """Random (typical spread), clustered (all particles within ~1e-3) or spread out (x 100)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = system.pair_distance_range
    scale = {"random": hi / 3.0, "clustered": 1e-3, "spread": 100.0 * hi}[kind]
    return remove_com(scale * torch.randn(n, system.n_particles, system.n_dims, generator=g, dtype=F64))


def restricted_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """Brute-force autograd Jacobian of ``fn`` at one configuration, restricted to U."""
    n, d = x.shape[-2:]

    def flat(v: torch.Tensor) -> torch.Tensor:
        return fn(v.reshape(1, n, d)).reshape(-1)

    jac = torch.autograd.functional.jacobian(flat, x.reshape(-1))
    basis = com_free_basis(n, d)
    return basis.T @ jac @ basis


# ------------------------------------------------------------------ the contract


@pytest.mark.parametrize("config", [{}, {"train_logdet": "power-series"}])
def test_contract_dw4(dw4, config):
    report = check_flow(lambda: build(dw4, config), dw4)
    assert "permutation_equivariant" in report.passed and "logdet_vs_brute_force_jacobian" in report.passed


def test_contract_lj13(lj13):
    report = check_flow(lambda: build(lj13, {"blocks": 4}), lj13)
    assert report.measured["logdet_vs_brute_force_jacobian"] < 1e-6


@pytest.mark.slow
def test_contract_lj13_default_and_stressed(lj13):
    check_flow(lambda: build(lj13, {}), lj13)
    check_flow(lambda: stressed(build(lj13, {})), lj13)


def test_parameter_counts_are_pinned(dw4, lj13):
    # 8 blocks x (1->32: 32 + 32, 32->32: 1024 + 32, 32->1 without bias: 32)
    assert build(dw4).n_parameters == build(lj13).n_parameters == 8 * (32 + 32 + 32 * 32 + 32 + 32) == 9_216
    assert build(dw4, {"hidden": [64, 64]}).n_parameters == 8 * (64 + 64 + 64 * 64 + 64 + 64) == 34_816
    assert build(dw4, {"blocks": 2, "hidden": [16]}).n_parameters == 2 * (16 + 16 + 16)


# ------------------------------------------------------------------ Lipschitz bound


def test_lipswish_is_one_lipschitz():
    a = torch.linspace(-20, 20, 200_001, dtype=F64)
    value, slope = _lipswish(a)
    auto = torch.autograd.functional.jacobian(lambda t: _lipswish(t)[0].sum(), a)
    torch.testing.assert_close(slope, auto)
    assert float(slope.abs().max()) <= 1.0 and float(slope.max()) > 0.99  # the 1.1 is nearly tight


@pytest.mark.parametrize("name", ["dw4", "lj13"])
@pytest.mark.parametrize("kind", ["random", "clustered", "spread"])
def test_lipschitz_bound_holds_as_measured(name, kind):
    system = eqbench.get_system(name)
    x = configurations(system, kind, n=64)
    worst = 0.0
    for flow in (stressed(make(system, blocks=2)), saturating(system)):
        for block in flow.blocks:
            params = block.normalised()
            bound = float(params.bound.detach())
            assert bound <= 0.9 + 1e-12
            with torch.no_grad():
                _, jac = block.field_and_jacobian(x, params)
            top = float(torch.linalg.svdvals(jac).max())
            assert top < bound, f"{name} {kind}: largest singular value {top:.4f} above the bound {bound:.4f}"
            worst = max(worst, top)
    if kind != "spread":  # far apart, ρ(d)/d ~ 1/d: small by design
        # The bound is nearly attained: without its factor 1/N the same blocks would exceed 0.9.
        assert worst * system.n_particles > 0.9 and worst > 0.5, worst


def test_brute_force_singular_values_agree_with_the_closed_form_jacobian(dw4):
    flow = saturating(dw4)
    block = flow.blocks[0]
    params = block.normalised()
    for kind in ("random", "clustered", "spread"):
        x = configurations(dw4, kind, n=2)
        _, jac = block.field_and_jacobian(x, params)
        for b in range(2):
            brute = restricted_jacobian(lambda v: block.field(v, params), x[b:b + 1])
            torch.testing.assert_close(jac[b], brute, atol=1e-10, rtol=1e-8)
            assert float(torch.linalg.svdvals(brute).max()) < float(params.bound.detach())



@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_full_space_jacobian_is_the_autograd_jacobian(name):
    """The scattered N·D Jacobian the log-determinant uses equals autograd's in every coordinate
    (float64, 1e-10), on random, clustered and spread-out configurations; its restriction to U
    is the closed form in the Helmert basis."""
    system = eqbench.get_system(name)
    flow = saturating(system)
    block = flow.blocks[0]
    params = block.normalised()
    basis = torch.kron(com_free_basis(system.n_particles, 1), torch.eye(system.n_dims, dtype=F64))
    for kind in ("random", "clustered", "spread"):
        x = configurations(system, kind, n=2)
        _, full = block.field_and_full_jacobian(x, params)
        _, on_u = block.field_and_jacobian(x, params)
        for b in range(2):
            brute = torch.autograd.functional.jacobian(lambda v: block.field(v.view(1, *system.event_shape), params)
                                                       .reshape(-1), x[b].reshape(-1))
            torch.testing.assert_close(full[b], brute, atol=1e-10, rtol=1e-8)
            torch.testing.assert_close(basis.T @ full[b] @ basis, on_u[b], atol=1e-10, rtol=1e-8)


# ------------------------------------------------------------------ log-determinants


@pytest.mark.parametrize("name, kind", [
    ("dw4", "random"), ("dw4", "clustered"), ("dw4", "spread"), ("lj13", "random"), ("lj13", "spread"),
    # the brute-force Jacobian of the fixed-point direction differentiates 39 adjoint solves
    # of ~200 iterations each where the blocks contract at their slowest (~50 s)
    pytest.param("lj13", "clustered", marks=pytest.mark.slow),
])
def test_exact_logdet_matches_brute_force_jacobian_on_U(name, kind):
    """Both directions, to 1e-8 (float64); |logdet| is large enough that a factor 2 or a sign
    error in it would fail (|error| = |logdet| > 0.05)."""
    system = eqbench.get_system(name)
    flow = saturating(system, blocks=3) if kind != "spread" else stressed(make(system, blocks=3))
    n = 2 if name == "dw4" else 1
    x = configurations(system, kind, n=n)
    with torch.no_grad():
        z, logdet_inverse = flow.inverse(x)
        x_back, logdet_forward = flow.forward(z)
    for b in range(n):
        sign, brute = torch.linalg.slogdet(restricted_jacobian(lambda v: flow.inverse(v)[0], x[b:b + 1]))
        assert sign > 0 and abs(float(brute - logdet_inverse[b])) < 1e-8, (float(brute), float(logdet_inverse[b]))
        assert abs(float(brute)) > 0.05
        sign, brute_f = torch.linalg.slogdet(restricted_jacobian(lambda v: flow.forward(v)[0], z[b:b + 1]))
        assert sign > 0 and abs(float(brute_f - logdet_forward[b])) < 1e-8
        assert abs(float(brute_f + brute)) < 1e-8  # the two directions are inverse maps
    assert float((x_back - x).abs().max()) < 1e-8


def test_log_prob_is_the_density_sample_returns(dw4):
    flow = stressed(make(dw4, blocks=4))
    x, log_q = flow.sample(32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), log_q, atol=1e-9, rtol=0)
    # and the density is a density: the prior's log-density plus the log-Jacobian, not its negative
    z, logdet = flow.inverse(x)
    torch.testing.assert_close(log_q, flow.prior.log_prob(z) + logdet, atol=1e-9, rtol=0)


def test_log_prob_does_not_depend_on_mode_and_training_names_its_estimator(dw4):
    flow = stressed(make(dw4, blocks=2, train_logdet="power-series"))
    x = configurations(dw4, "random", n=8)
    with torch.no_grad():
        flow.eval()
        evaluation = flow.log_prob(x)
        flow.train()
        training = flow.log_prob(x)
        estimated = flow.training_log_prob(x)
    assert torch.equal(evaluation, training)
    assert not torch.allclose(estimated, evaluation)  # the stochastic estimator, by name only
    assert flow.training_estimator == {"logdet": "power-series"}
    assert make(dw4).training_estimator == {}
    assert flow.density_estimate is None


# ------------------------------------------------------------------ power series


def _power_series_draws(flow, x, calls: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.stack([flow.inverse(x, logdet="power-series", generator=gen)[1] for _ in range(calls)])


def test_power_series_estimator_is_unbiased(dw4):
    """Mean over many Russian-roulette draws = exact log-det within 4 standard errors, and the
    draws are numerous enough that dropping any of the first four terms, flipping its sign, or
    reweighting the random terms by one factor (1-p) too many would be > 4 standard errors off.
    λ_max <= 0.6 keeps the roulette's variance finite (λ² < 1 - p)."""
    flow = saturating(dw4, coefficient=0.6)
    block = flow.blocks[0]
    x = configurations(dw4, "random", n=1, seed=4).expand(256, -1, -1).contiguous()
    draws = _power_series_draws(flow, x, calls=120, seed=0)  # [calls, 256]: N shared within a call
    per_call = draws.mean(dim=1)
    mean, se = float(per_call.mean()), float(per_call.std() / math.sqrt(len(per_call)))
    with torch.no_grad():
        _, jac = block.field_and_jacobian(x[:1], block.normalised())
        exact = float(flow.inverse(x[:1])[1])
    eigs = torch.linalg.eigvalsh(jac[0])
    assert abs(exact - float(torch.log1p(eigs).sum())) < 1e-10
    assert float(eigs.abs().max()) > 0.3  # the higher terms matter
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    terms = [float((-1) ** (k + 1) * (eigs ** k).sum() / k) for k in range(1, 40)]
    assert abs(sum(terms) - exact) < 1e-6
    wrong = {f"drop term {k}": exact - terms[k - 1] for k in range(1, 5)}
    wrong |= {f"sign of term {k}": exact - 2 * terms[k - 1] for k in range(1, 5)}
    wrong["roulette weight off by (1-p)"] = exact - 0.5 * sum(terms[2:])
    for what, expectation in wrong.items():
        assert abs(mean - expectation) > 4 * se, f"the test could not detect: {what}"


def test_power_series_estimate_of_a_deep_flow_centres_on_the_exact_density(dw4):
    flow = saturating(dw4, coefficient=0.6, blocks=3)
    x = configurations(dw4, "random", n=1, seed=5).expand(128, -1, -1).contiguous()
    per_call = _power_series_draws(flow, x, calls=40, seed=1).mean(dim=1)
    with torch.no_grad():
        exact = float(flow.inverse(x[:1])[1])
    se = float(per_call.std() / math.sqrt(len(per_call)))
    assert abs(float(per_call.mean()) - exact) < 4 * se + 1e-3, (float(per_call.mean()), exact, se)


def test_power_series_training_step_reaches_every_parameter(dw4):
    flow = stressed(make(dw4, blocks=2, train_logdet="power-series"), 2.0)
    flow.train()
    loss = -flow.training_log_prob(configurations(dw4, "random", n=16)).mean()
    loss.backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0, name


# ------------------------------------------------------------------ fixed-point inverse


def test_fixed_point_inverse_meets_its_stated_tolerance(dw4, lj13):
    for system in (dw4, lj13):
        flow = stressed(make(system, blocks=3))
        z = configurations(system, "random", n=8)
        for tol in (1e-4, 1e-7, 1e-10):
            for block in flow.blocks:
                params = block.normalised()
                with torch.no_grad():
                    x, n_iter = block.invert(z, params, tol=tol, max_iterations=1000)
                    reference, _ = block.invert(z, params, tol=1e-14, max_iterations=5000)
                err = float(torch.linalg.vector_norm((x - reference).flatten(1), dim=1).max())
                assert err <= tol + 1e-13, (tol, err)
                lip = float(params.bound.detach())
                assert n_iter <= math.ceil(math.log(tol * (1 - lip) / (lip * 2 * float(z.norm(dim=(1, 2)).max())))
                                           / math.log(lip)) + 1
        with torch.no_grad():
            x, _ = flow.forward(z)
            z_back, _ = flow.inverse(x)
        assert float((z_back - z).abs().max()) < 1e-9
        assert len(flow.fixed_point_iterations) == 3 and max(flow.fixed_point_iterations) < 1000


def test_fixed_point_inverse_raises_when_it_does_not_converge(dw4):
    flow = stressed(make(dw4, blocks=1, max_iterations=2))
    with pytest.raises(FixedPointError, match="did not reach 1e-10 in 2 iterations"):
        flow.forward(configurations(dw4, "random", n=2))


def test_float32_defaults_converge(dw4):
    flow = stressed(build(dw4, {}))
    with torch.no_grad():
        x, log_q = flow.sample(16, generator=torch.Generator().manual_seed(0))
        assert x.dtype == torch.float32 and torch.isfinite(log_q).all()
        assert float((flow.log_prob(x) - log_q).abs().max()) < 1e-3
    assert flow.tolerance(torch.float32) == 1e-4 and flow.tolerance(F64) == 1e-10


def test_gradients_through_the_fixed_point_are_exact(dw4):
    """Implicit differentiation of sample(): the gradient of a loss of x = F⁻¹(z) with respect
    to a weight matches central finite differences (float64)."""
    flow = saturating(dw4, coefficient=0.8, blocks=2)
    z = configurations(dw4, "random", n=4, seed=2)
    target = flow.blocks[0].layers[0].bias

    def loss() -> torch.Tensor:
        x, logdet = flow.forward(z)
        return (x[..., 0] * torch.arange(1.0, 5.0, dtype=F64).unsqueeze(0)).sum() + logdet.sum()

    flow.zero_grad()
    loss().backward()
    analytic = float(target.grad[0])
    eps = 1e-6
    with torch.no_grad():
        target[0] += eps
        up = float(loss())
        target[0] -= 2 * eps
        down = float(loss())
        target[0] += eps
    numeric = (up - down) / (2 * eps)
    assert abs(analytic) > 1e-3 and abs(analytic - numeric) < 1e-6 * (1 + abs(numeric)), (analytic, numeric)


# ------------------------------------------------------------------ symmetries


@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_equivariance_under_rotations_reflections_permutations_translations(name):
    system = eqbench.get_system(name)
    flow = stressed(make(system, blocks=3))
    g = torch.Generator().manual_seed(7)
    x = configurations(system, "random", n=6, seed=3)
    n, d = system.n_particles, system.n_dims
    rot, ref = random_rotations(6, d, generator=g), random_reflections(6, d, generator=g)
    perm = random_permutations(6, n, generator=g)
    ops = {"rotation": lambda v: v @ rot.transpose(-1, -2), "reflection": lambda v: v @ ref.transpose(-1, -2),
           "permutation": lambda v: apply_permutation(v, perm)}
    with torch.no_grad():
        z, ld = flow.inverse(x)
        xf, ldf = flow.forward(x)
        for what, op in ops.items():
            gz, gld = flow.inverse(op(x))
            assert float((gz - op(z)).abs().max()) < 1e-12 and float((gld - ld).abs().max()) < 1e-10, what
            gx, gldf = flow.forward(op(x))
            assert float((gx - op(xf)).abs().max()) < 1e-8 and float((gldf - ldf).abs().max()) < 1e-8, what
        shifted = x + 5.0 * torch.randn(6, 1, d, generator=g, dtype=F64)
        torch.testing.assert_close(flow.log_prob(shifted), flow.log_prob(x), atol=1e-10, rtol=0)
        assert float(flow.inverse(shifted)[0].mean(dim=1).abs().max()) < 1e-12  # CoM-free output


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("config, words", [
    ({"train_logdet": "hutchinson"}, "train_logdet must be one of exact, power-series; got 'hutchinson'"),
    ({"lipschitz_coefficient": 1.0}, "lipschitz_coefficient must be a number in the open interval (0, 1)"),
    ({"lipschitz_coefficient": 0}, "lipschitz_coefficient must be a number in the open interval (0, 1)"),
    ({"power_series_p": 1.5}, "power_series_p must be a number in the open interval (0, 1)"),
    ({"blocks": 2.5}, "blocks must be a positive integer; got 2.5"),
    ({"hidden": []}, "hidden must be a non-empty list"),
    ({"inverse_tol": -1e-3}, "inverse_tol must be positive"),
    ({"dtype": "float16"}, "dtype must be one of float32, float64"),
    ({"steps": 4}, "unknown g-resflow settings: steps; valid: blocks, distance_scale, dtype, hidden"),
])
def test_settings_errors_are_one_line_and_name_what_is_valid(dw4, config, words):
    for check in (lambda: validate(dw4, config), lambda: build(dw4, config)):
        with pytest.raises(ConfigError) as caught:
            check()
        message = str(caught.value)
        assert words in message and "\n" not in message, message
    with pytest.raises(ConfigError, match="logdet must be one of exact, power-series"):
        build(dw4).log_prob(configurations(dw4, "random", n=1).float(), logdet="brute")


def test_builder_declares_capabilities_and_system_scaled_defaults(dw4, lj13):
    assert build.capabilities == frozenset({"trainable", "exact-density", "equivariant"})
    assert LOGDET_ESTIMATORS == ("exact", "power-series")
    assert default_distance_scale(dw4) == pytest.approx(1.0)
    assert default_distance_scale(lj13) == pytest.approx((2.599021730834192 - 0.8908987181403393) / 8)
    flow = build(lj13, {"distance_scale": 0.5, "lipschitz_coefficient": 0.97, "blocks": 2})
    assert flow.blocks[0].distance_scale == 0.5 and max(flow.lipschitz_bounds()) <= 0.97
    assert flow.blocks[0].scale == pytest.approx(0.97 * 0.5 / 13)  # s = c ℓ / N


# ------------------------------------------------------------------ training


def test_training_reduces_the_nll_on_dw4_data(dw4):
    data = eqbench.load_data("dw4", split="train", n=200, seed=0, dtype=torch.float32)
    torch.manual_seed(0)
    flow = build(dw4, {"blocks": 4})
    with torch.no_grad():
        before = -float(flow.log_prob(data).mean())
    result = fit(flow, dw4, data, TrainConfig(iterations=25, batch_size=64, seed=0), progress=False)
    with torch.no_grad():
        after = -float(flow.log_prob(data).mean())
    assert result.status == "ok", result.reason
    assert after < before - 1.0, (before, after)
    assert max(flow.lipschitz_bounds()) <= 0.9


def test_reverse_kl_training_runs_through_the_fixed_point(dw4):
    torch.manual_seed(0)
    flow = build(dw4, {"blocks": 2})
    result = fit(flow, dw4, None, TrainConfig(iterations=3, lambda_start=1.0, lambda_end=1.0, kl_batch_size=16),
                 progress=False)
    assert result.status == "ok", result.reason
    assert all(math.isfinite(h["kl"]) for h in result.history)
