"""se3-acf, the SE(3) equivariant augmented coupling flow (Midgley et al. NeurIPS 2023), and the
augmented-flow contract: exact joint density, spline coupling log-determinants, equivariant
frames, the importance-weighted marginal estimate, settings, and a short training run."""

from __future__ import annotations

import math
import types

import pytest
import torch

import eqbench
from eqbench.components import capabilities_of
from eqbench.errors import ConfigError
from eqbench.flows.augmented import AugmentedFlow, GaussianAuxiliary
from eqbench.flows.augmented_coupling import AugmentedCouplingFlow, FrameCoupling, build
from eqbench.flows.frames import gram_schmidt_frame, right_handed_frame
from eqbench.geometry import com_free_basis, random_reflections, random_rotations, remove_com
from eqbench.tasks.base import CellContext
from eqbench.tasks.common import training_loss_records
from eqbench.testing import check_flow, check_flow_quick
from eqbench.train import TrainConfig, fit

SMALL = {"blocks": 2, "hidden": 16, "head_hidden": [16, 16]}
F64 = torch.float64


def _small(system, **extra) -> AugmentedCouplingFlow:
    torch.manual_seed(0)
    return build(system, {**SMALL, **extra})


# ------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("extra", [{}, {"frame": "gram-schmidt", "transform": "affine", "init_scale": 1.0}])
def test_check_flow_passes_on_dw4(dw4, extra):
    report = check_flow(lambda: _small(dw4, **extra), dw4)
    for check in ("sample_joint_log_prob_joint_agree", "sample_is_joint_minus_aux", "logdet_vs_brute_force_jacobian",
                  "rotation_equivariant", "permutation_equivariant", "translation_invariant",
                  "every_parameter_gets_gradient", "state_dict_round_trip", "iw_estimate_converges_with_k",
                  "log_prob_independent_of_mode"):
        assert check in report.passed
    assert ("reflection_equivariant" in report.passed) == (extra.get("frame") == "gram-schmidt")


def test_check_flow_passes_on_lj13_small(lj13):
    report = check_flow(lambda: _small(lj13, init_scale=1.0), lj13, batch=4)
    assert "logdet_vs_brute_force_jacobian" in report.passed and "rotation_equivariant" in report.passed


def test_check_flow_quick_on_augmented_flow(dw4):
    report = check_flow_quick(_small(dw4), dw4)
    assert report.passed[:3] == ["sample_shapes_finite_com_free", "sample_joint_log_prob_joint_agree",
                                 "sample_is_joint_minus_aux"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_check_flow_passes_with_default_settings(name):
    system = eqbench.get_system(name)
    report = check_flow(lambda: build(system), system, batch=4)
    assert "every_parameter_gets_gradient" in report.passed


@pytest.mark.parametrize("factor", [2.0, -1.0])
def test_contract_catches_a_wrong_log_determinant(dw4, monkeypatch, factor):
    transform = FrameCoupling._transform

    def wrong(self, y, c, inverse):
        out, ladj = transform(self, y, c, inverse)
        return out, factor * ladj

    monkeypatch.setattr(FrameCoupling, "_transform", wrong)
    with pytest.raises(AssertionError, match="brute-force Jacobian|log-determinant|log_prob_joint"):
        check_flow(lambda: _small(dw4, init_scale=1.0), dw4)


def test_contract_catches_a_wrong_sample_density(dw4, monkeypatch):
    """A plugin whose ``sample`` returned the joint density itself (forgetting ``- log π``)."""
    monkeypatch.setattr(AugmentedFlow, "sample",
                        lambda self, n, *, generator=None: self.sample_joint(n, generator=generator)[::2])
    with pytest.raises(AssertionError, match="log π"):
        check_flow_quick(_small(dw4), dw4)


# ------------------------------------------------------------------------------------- coupling
@pytest.mark.parametrize("transform", ["spline", "affine"])
@pytest.mark.parametrize("n_dims", [2, 3])
def test_coupling_round_trip_and_logdet_vs_brute_force(transform, n_dims):
    torch.manual_seed(1)
    coupling = FrameCoupling(n_dims, hidden=16, head_hidden=(16,), transform=transform, init_scale=3.0, dtype=F64)
    y = 2.0 * torch.randn(3, 5, n_dims, dtype=F64)
    c = torch.randn(3, 5, n_dims, dtype=F64)
    out, ld = coupling(y, c)
    back, ld_inv = coupling.inverse(out, c)
    assert float((back - y).detach().abs().max()) < 1e-10 and float((ld + ld_inv).detach().abs().max()) < 1e-10
    assert float(ld.detach().abs().min()) > 0.01  # a transform away from the identity: the check below means something
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: coupling(v.reshape(1, 5, n_dims), c[b:b + 1])[0].reshape(-1),
                                                 y[b].reshape(-1))
        sign, brute = torch.linalg.slogdet(jac)
        assert sign > 0 and abs(float(brute - ld[b].detach())) < 1e-8


def test_joint_logdet_vs_brute_force_and_recentring(dw4):
    """The x|a coupling re-centres x; the log-determinant on U x R^{N·D} is the spline's (docstring)."""
    flow = _small(dw4, init_scale=3.0).double()
    n, d = 4, 2
    z = torch.cat((remove_com(torch.randn(1, n, d, dtype=F64)), torch.randn(1, n, d, dtype=F64)), dim=1)
    h, ld = flow(z)
    assert float(h.detach()[:, :n].mean(dim=1).abs().max()) < 1e-12
    basis = torch.block_diag(com_free_basis(n, d), torch.eye(n * d, dtype=F64))
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.reshape(1, 2 * n, d))[0].reshape(-1), z.reshape(-1))
    sign, brute = torch.linalg.slogdet(basis.T @ jac @ basis)
    assert sign > 0 and abs(float(brute - ld[0].detach())) < 1e-8 and abs(float(ld[0].detach())) > 0.5


# ------------------------------------------------------------------------------------- frames
@pytest.mark.parametrize("n_dims", [2, 3])
def test_frames_are_orthonormal_and_equivariant(n_dims):
    gen = torch.Generator().manual_seed(0)
    eye = torch.eye(n_dims, dtype=F64)
    rot = random_rotations(6, n_dims, generator=gen)
    mirror = random_reflections(6, n_dims, generator=gen)
    for frame, n_vec in ((right_handed_frame, n_dims - 1), (gram_schmidt_frame, n_dims)):
        v = torch.randn(6, n_vec, n_dims, generator=gen, dtype=F64)
        f = frame(v)
        assert torch.allclose(f.transpose(-1, -2) @ f, eye.expand(6, -1, -1), atol=1e-12)
        assert torch.allclose(frame(v @ rot.transpose(-1, -2)), rot @ f, atol=1e-12)
        reflected = frame(v @ mirror.transpose(-1, -2))
        if frame is gram_schmidt_frame:
            assert torch.allclose(reflected, mirror @ f, atol=1e-12)
        else:  # handedness is fixed: the last axis does not follow a mirror
            assert torch.allclose(torch.linalg.det(f), torch.ones(6, dtype=F64))
            assert torch.allclose(reflected[..., :-1], (mirror @ f)[..., :-1], atol=1e-12)
            assert torch.allclose(reflected[..., -1], -(mirror @ f)[..., -1], atol=1e-12)


def test_right_handed_flow_is_not_reflection_equivariant(dw4):
    flow = _small(dw4, init_scale=1.0).double()
    z = torch.cat((remove_com(torch.randn(3, 4, 2, dtype=F64)), torch.randn(3, 4, 2, dtype=F64)), dim=1)
    mirror = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    with torch.no_grad():
        assert float((flow(z @ mirror)[0] - flow(z)[0] @ mirror).abs().max()) > 1e-3
    assert "reflection" not in flow.symmetries


def test_joint_map_equivariance_under_rotation_and_permutation_together(lj13):
    flow = _small(lj13, init_scale=1.0).double()
    n = 13
    z = torch.cat((remove_com(torch.randn(2, n, 3, dtype=F64)), torch.randn(2, n, 3, dtype=F64)), dim=1)
    rot = random_rotations(1, 3, generator=torch.Generator().manual_seed(3))[0]
    perm = torch.randperm(n)
    joint = torch.cat((perm, perm + n))
    with torch.no_grad():
        h, ld = flow(z)
        gh, gld = flow((z @ rot.T)[:, joint])
    assert torch.allclose(gh, (h @ rot.T)[:, joint], atol=1e-9) and torch.allclose(gld, ld, atol=1e-9)


# ------------------------------------------------------------------------------------- densities
def test_importance_weighted_estimate_converges_with_k(dw4):
    """Mean over repeats rises with K towards a limit and the spread shrinks (Burda et al. 2016).
    A base conditional of scale 0.12 against π's 0.1 makes the weights vary (measured: means
    -8.61, -8.40, -8.37, -8.36 and spreads 0.53, 0.30, 0.16, 0.05 for K = 1, 8, 64, 512)."""
    flow = _small(dw4, base_aux_scale=0.12).double()
    x, _ = flow.sample(3, generator=torch.Generator().manual_seed(0))
    means, spreads = [], []
    with torch.no_grad():
        for k in (1, 8, 64, 512):
            est = torch.stack([flow.log_prob(x, iw_draws=k, generator=torch.Generator().manual_seed(10 + r))
                               for r in range(8)])
            means.append(float(est.mean()))
            spreads.append(float(est.std(dim=0).mean()))
    assert means[0] < means[1] < means[2] < means[3] + 0.01
    assert means[3] - means[0] > 0.1                          # a visible Jensen gap at K = 1
    assert means[3] - means[2] < means[1] - means[0]          # increments shrink
    assert spreads[3] < 0.3 * spreads[0] and spreads[2] < spreads[0]


def test_importance_weighted_estimate_does_not_depend_on_the_pass_size(dw4, monkeypatch):
    """The K·B rows are evaluated in passes of ``_ROWS_PER_PASS``: passes that split the draws of
    one configuration, that do not divide K·B, or one pass for all give the same estimate."""
    from eqbench.flows import augmented
    flow = _small(dw4, base_aux_scale=0.12).double()
    x, _ = flow.sample(7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one_pass = flow.log_prob(x, iw_draws=20, generator=torch.Generator().manual_seed(3))
        for rows in (1, 13, 64):
            monkeypatch.setattr(augmented, "_ROWS_PER_PASS", rows)
            torch.testing.assert_close(flow.log_prob(x, iw_draws=20, generator=torch.Generator().manual_seed(3)),
                                       one_pass, rtol=0, atol=1e-12)


def test_estimate_matches_the_exact_marginal_of_an_identity_flow(dw4):
    """With every spline at the identity, q(x, a) = N_U(x) N(a; x, σ_b² I): the marginal is the
    CoM-free normal, known exactly; the estimate must approach it (normalising constants right).
    σ_b = 0.11 against π's 0.1 keeps the weights' variance small (≈ 0.2), so K = 4,000 is enough."""
    flow = _small(dw4, init_scale=1e-30, base_aux_scale=0.11).double()
    x = remove_com(torch.randn(4, 4, 2, dtype=F64, generator=torch.Generator().manual_seed(5)))
    exact = flow.prior.log_prob(x)
    with torch.no_grad():
        k1 = flow.log_prob(x.repeat(256, 1, 1), iw_draws=1, generator=torch.Generator().manual_seed(1))
        big = flow.log_prob(x, iw_draws=4000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(big, exact, atol=0.03)
    assert float(k1.mean()) < float(exact.mean()) - 0.04      # Jensen: K = 1 is biased low (gap ≈ 0.1)


def test_density_estimate_and_training_estimator(dw4):
    flow = _small(dw4)
    assert flow.density_estimate == "IW estimate K=20" and flow.training_estimator == {"iw_draws": 1}
    assert build(dw4, {**SMALL, "iw_draws": 5}).density_estimate == "IW estimate K=5"
    x, _ = flow.sample(6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    trained = flow.training_log_prob(x)
    torch.manual_seed(7)
    assert torch.equal(trained, flow.log_prob(x, iw_draws=1))
    a = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(flow.log_prob(x, iw_draws=1, generator=torch.Generator().manual_seed(7)),
                          flow.log_prob_joint(x, a) - flow.aux_log_prob(a, x), atol=1e-4)


def test_sample_returns_joint_density_minus_aux(dw4):
    flow = _small(dw4, init_scale=1.0).double()
    x, a, log_q = flow.sample_joint(5, generator=torch.Generator().manual_seed(2))
    xs, log_s = flow.sample(5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x, xs)
    assert torch.allclose(log_s, flow.log_prob_joint(x, a) - flow.aux_log_prob(a, x), atol=1e-10)
    assert torch.allclose(log_q, flow.log_prob_joint(x, a), atol=1e-10)
    # π(a | x) = N(x, 0.1² I) on all N·D coordinates, normalised over R^{N·D}
    expected = -0.5 * ((a - x) ** 2).sum(dim=(1, 2)) / 0.01 - 8 * (torch.log(torch.tensor(0.1, dtype=F64))
                                                                     + 0.5 * torch.log(torch.tensor(2 * torch.pi)))
    assert torch.allclose(flow.aux_log_prob(a, x), expected.to(F64), atol=1e-10)


# ------------------------------------------------------------------------------------- settings
def test_parameter_counts_are_pinned(dw4, lj13):
    """Per coupling: EGNN 3 x (7H² + 8H + 1) + 64 (2 + V) + embedding 2H + readout H² + H, head
    8,320 + 65 P, with H = 64, V = D vectors, P = 23 D; 24 couplings (module docstring)."""
    for system, expected in ((dw4, 2_481_816), (lj13, 2_519_232)):
        d = system.n_dims
        h = 64
        per = 3 * (7 * h * h + 8 * h + 1) + 64 * (2 + d) + 2 * h + h * h + h + 8_320 + 65 * 23 * d
        assert 24 * per == expected
        assert build(system).n_parameters == expected


@pytest.mark.parametrize("config, words", [
    ({"transform": "flows"}, "spline, affine"),
    ({"projection": "spherical"}, "cartesian"),
    ({"frame": "left"}, "right-handed, gram-schmidt"),
    ({"bins": 2.5}, "bins must be an integer >= 2"),
    ({"aux_scale": 0}, "positive"),
    ({"blocks": 0}, "positive integer"),
    ({"widht": 3}, "valid: aux_scale"),
])
def test_settings_errors_are_one_line(dw4, config, words):
    with pytest.raises(ConfigError) as info:
        build(dw4, config)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_builder_declares_capabilities_and_refuses_other_dimensions():
    assert build.capabilities == {"trainable", "equivariant", "augmented"}
    assert capabilities_of(_small(eqbench.get_system("dw4"))) == build.capabilities
    with pytest.raises(ConfigError, match="valid: 2, 3"):
        build.validate_config(types.SimpleNamespace(name="flat", n_dims=4), {})


# ------------------------------------------------------------------------------------- training
def test_short_training_run_lowers_the_joint_nll(dw4):
    data = eqbench.load_data("dw4", "train", n=256, seed=0, dtype=torch.float32)
    flow = _small(dw4)

    def nll() -> float:
        with torch.no_grad():
            return -float(flow.log_prob(data, iw_draws=1, generator=torch.Generator().manual_seed(0)).mean())

    before = nll()
    result = fit(flow, dw4, data, TrainConfig(iterations=40, batch_size=64, lr=1e-3, seed=0, log_every=1000))
    after = nll()
    assert result.status == "ok", result.reason
    assert after < before - 1.0, (before, after)


def test_preflight_accepts_the_default_model(dw4):
    """The runner's pre-flight (declared capabilities == built ones, check_flow_quick) on defaults."""
    from eqbench.runner import flow_facts

    facts = flow_facts(build(dw4), dw4, "se3-acf", build.capabilities)
    assert facts["density"] == "IW estimate K=20" and facts["n_parameters"] == 2_481_816
    assert "sample_is_joint_minus_aux" in facts["contract"]


def test_reverse_kl_training_runs_on_the_joint(dw4):
    """training_sample is sample(): log q(x, a) - log π(a | x), so reverse KL is the joint KL."""
    flow = _small(dw4)
    result = fit(flow, dw4, None, TrainConfig(iterations=20, lambda_start=1.0, lambda_end=1.0, kl_batch_size=64,
                                                lr=1e-3, log_every=1000))
    assert result.status == "ok" and result.history[-1]["kl"] < result.history[0]["kl"]


# ------------------------------------------------------------------------------------- plugins
class ScaledAugmented(AugmentedFlow):
    """A plugin-style augmented flow with a known answer: ``x = e^{s} z_x``, ``a = x + e^{t} (z_a - z_x)``
    with base ``z_a ~ N(z_x, I)`` and π(a | x) = N(x, 0.5² I). The joint log-determinant on
    U x R^{N·D} is ``(N - 1) D s + N D t``; the marginal of x is ``N_U(0, e^{2s} I)``."""

    symmetries = ("rotation", "reflection", "permutation", "translation")

    def __init__(self, system, *, forget_a_block: bool = False):
        super().__init__(system)
        self.s = torch.nn.Parameter(torch.tensor(0.3))
        self.t = torch.nn.Parameter(torch.tensor(-0.4))
        self.forget_a_block = forget_a_block
        self.iw_draws = 20
        self.aux = GaussianAuxiliary(0.5)
        self.base_aux = GaussianAuxiliary(1.0)

    def _logdet(self, batch: int, ref: torch.Tensor) -> torch.Tensor:
        n, d = self.n_particles, self.n_dims
        ld = (n - 1) * d * self.s + (0.0 if self.forget_a_block else n * d * self.t)
        return ld * ref.new_ones(batch)

    def forward(self, z):
        n = self.n_particles
        zx, za = z[:, :n], z[:, n:]
        x = torch.exp(self.s) * remove_com(zx)
        return torch.cat((x, x + torch.exp(self.t) * (za - zx)), dim=1), self._logdet(z.shape[0], z)

    def inverse(self, h):
        n = self.n_particles
        x, a = h[:, :n], h[:, n:]
        com = x.mean(dim=1, keepdim=True)
        x, a = x - com, a - com
        zx = torch.exp(-self.s) * x
        return torch.cat((zx, zx + torch.exp(-self.t) * (a - x)), dim=1), -self._logdet(h.shape[0], h)

    def log_prob_joint(self, x, a):
        z, ld = self.inverse(torch.cat((x, a), dim=1))
        zx, za = z[:, :self.n_particles], z[:, self.n_particles:]
        return self.prior.log_prob(zx) + self.base_aux.log_prob(za, zx) + ld

    def sample_joint(self, n, *, generator=None):
        zx = self.prior.sample(n, generator=generator, dtype=self.s.dtype)
        za = self.base_aux.sample(zx, 1, generator=generator)[0]
        z = torch.cat((zx, za), dim=1)
        h, ld = self.forward(z)
        return h[:, :self.n_particles], h[:, self.n_particles:], self.log_prob_joint(h[:, :self.n_particles],
                                                                                      h[:, self.n_particles:])

    def aux_log_prob(self, a, x):
        return self.aux.log_prob(a, x)

    def sample_aux(self, x, k, *, generator=None):
        return self.aux.sample(x, k, generator=generator)


def test_a_plugin_augmented_flow_is_checked_the_same_way(dw4):
    report = check_flow(lambda: ScaledAugmented(dw4), dw4)
    assert {"reflection_equivariant", "logdet_vs_brute_force_jacobian", "iw_estimate_converges_with_k"} <= set(
        report.passed)
    flow = ScaledAugmented(dw4).double()
    x = remove_com(torch.randn(3, 4, 2, dtype=F64))
    exact = -0.5 * (x ** 2).sum(dim=(1, 2)) * torch.exp(-2 * flow.s) - 6 * flow.s - 3 * torch.log(
        torch.tensor(2 * torch.pi, dtype=F64))
    with torch.no_grad():
        est = flow.log_prob(x, iw_draws=20000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(est, exact.detach(), atol=0.03)
    with pytest.raises(AssertionError, match="brute-force Jacobian"):
        check_flow(lambda: ScaledAugmented(dw4, forget_a_block=True), dw4)


# ------------------------------------------------------------------------------------- frame penalty
def test_frame_barrier_by_hand_and_its_invariances():
    """-log(1 - |cos θ|): 0 at 90°, -log(1 - 1/√2) at 45° (either sign of the second vector),
    switched off (0) within 1e-4 of parallel; the same after a rotation, a reflection and a
    rescaling of either vector."""
    from eqbench.flows.frames import frame_barrier

    v = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
                      [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]],
                      [[1.0, 0.0, 0.0], [-3.0, 3.0, 0.0]],
                      [[1.0, 0.0, 0.0], [1.0, 1e-3, 0.0]],   # 1 - cos ≈ 5e-7: off
                      [[1.0, 0.0, 0.0], [1.0, 0.1, 0.0]]], dtype=F64)  # 1 - cos ≈ 4.97e-3: on
    expected = torch.tensor([0.0, -math.log(1 - 1 / math.sqrt(2)), -math.log(1 - 1 / math.sqrt(2)), 0.0,
                             -math.log(1 - 1 / math.sqrt(1.01))], dtype=F64)
    torch.testing.assert_close(frame_barrier(v), expected, atol=1e-12, rtol=1e-10)
    q = random_rotations(1, 3, torch.Generator().manual_seed(1))[0] @ random_reflections(1, 3, torch.Generator()
                                                                                         .manual_seed(2))[0]
    torch.testing.assert_close(frame_barrier(v @ q.T * torch.tensor([[2.0], [0.5]], dtype=F64)), expected,
                               atol=1e-12, rtol=1e-10)


def test_frame_penalty_enters_the_training_loss_only(lj13):
    """frame_penalty = w adds w x the mean barrier of the last training pass to fit's loss (and its
    history), reaches the EGNN parameters, and leaves every density unchanged; 0 (the default)
    adds nothing."""
    x = eqbench.load_data("lj13", "train", n=8, seed=0, dtype=torch.float32)
    plain, penalised = _small(lj13), _small(lj13, frame_penalty=10.0)
    assert plain.training_penalty() is None
    penalised.train()
    torch.manual_seed(5)  # the auxiliary draw a ~ π(· | x) of the training estimate
    log_q = penalised.training_log_prob(x)
    barriers = [c.last_barrier for c in penalised._couplings()]
    assert all(b is not None and float(b.detach()) > 0 for b in barriers)
    penalty = penalised.training_penalty()
    torch.testing.assert_close(penalty, 10.0 * torch.stack(barriers).mean())
    assert penalised.training_penalty() is None  # consumed
    penalised.train()
    penalised.training_log_prob(x)
    penalised.training_penalty().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in penalised.blocks[0][0].egnn.parameters())
    plain.train()
    torch.manual_seed(5)
    torch.testing.assert_close(plain.training_log_prob(x), log_q)  # same weights (same seed): same density
    penalised.eval()
    with torch.no_grad():
        penalised.log_prob(x[:2], generator=torch.Generator().manual_seed(0))
    assert penalised.training_penalty() is None  # scoring never records a barrier
    result = fit(_small(lj13, frame_penalty=10.0), lj13, x,
                 TrainConfig(iterations=2, batch_size=4, lr=1e-4, seed=0, log_every=1))
    assert result.status == "ok" and all(entry["penalty"] > 0 for entry in result.history)
    assert all(entry["loss"] > entry["nll"] for entry in result.history)
    # The task records say the loss holds the penalty, and give the penalty's share step by step.
    ctx = CellContext(task="density-estimation", model="se3-acf", system=lj13, params={"n_train": 8}, seed=0)
    records = {(r.metric, r.step): r for r in training_loss_records(ctx, result)}
    for entry in result.history:
        loss, share = records[("train_loss", entry["iteration"])], records[("train_penalty", entry["iteration"])]
        assert loss.value == entry["loss"] and share.value == entry["penalty"]
        assert "training penalty" in loss.unit
        assert loss.value - share.value == pytest.approx(entry["nll"], rel=1e-5)
    assert records[("final_train_penalty", None)].value == result.history[-1]["penalty"]
    plain_result = fit(_small(lj13), lj13, x, TrainConfig(iterations=2, batch_size=4, lr=1e-4, seed=0, log_every=1))
    plain_records = training_loss_records(ctx, plain_result)
    assert {r.metric for r in plain_records} == {"final_train_loss", "train_loss"}
    assert all(r.unit == "nats, training estimator" for r in plain_records)
    with pytest.raises(ConfigError, match="frame_penalty"):
        build(lj13, {"frame_penalty": -1.0})
