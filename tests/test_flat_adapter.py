"""The flat-coordinate adapter (eqbench.flows.flat) and its zuko example (examples/zuko_spline).

A flow on the (N-1)·D CoM-free coordinates must become an eqbench Flow whose numbers mean what
every other model's mean (SPEC §1): log-determinants on the CoM-free subspace U, the CoM-free
prior with its (N-1)·D/2·log 2π constant, CoM-free samples. The known answers: an identity flat
flow is the ``gaussian`` baseline at scale 1, a flat scaling by σ is the baseline at scale σ.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import eqbench
from eqbench.components import build_model, capabilities_of
from eqbench.errors import ConfigError
from eqbench.flows.flat import FlatFlow, ZukoBijection, as_flat_bijection, flat_flow_builder
from eqbench.geometry import com_free_basis, remove_com
from eqbench.testing import check_flow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "zuko_spline"
SYSTEMS = ("dw4", "lj13")


class Identity:
    """The identity on flat vectors, not an nn.Module: a bijection with nothing to train."""

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y, torch.zeros(y.shape[0], dtype=y.dtype)

    def inverse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return u, torch.zeros(u.shape[0], dtype=u.dtype)


class Scale(nn.Module):
    """u = y / σ: the flat twin of the gaussian baseline at scale σ."""

    def __init__(self, n_features: int, sigma: float) -> None:
        super().__init__()
        self.n_features = n_features
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma), dtype=torch.float64))

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y * (-self.log_sigma).exp(), (-self.n_features * self.log_sigma).expand(y.shape[0])

    def inverse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return u * self.log_sigma.exp(), (self.n_features * self.log_sigma).expand(u.shape[0])


class AsinhLinear(nn.Module):
    """u = asinh(W y + c) with a dense invertible W: nonlinear, couples every coordinate, and has
    a closed-form inverse, so the adapter's log-determinant can be held to the brute-force one."""

    def __init__(self, n_features: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n_features, n_features, generator=gen, dtype=torch.float64))
        q[:, 0] *= torch.linalg.det(q).sign()  # orientation preserving, as check_flow expects of a flow
        scales = 0.5 + torch.rand(n_features, generator=gen, dtype=torch.float64)
        self.weight = nn.Parameter(q * scales)  # singular values in [0.5, 1.5]
        self.bias = nn.Parameter(0.3 * torch.randn(n_features, generator=gen, dtype=torch.float64))

    def _logdet(self, v: torch.Tensor) -> torch.Tensor:
        return torch.linalg.slogdet(self.weight)[1] - 0.5 * torch.log1p(v * v).sum(dim=-1)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = y @ self.weight.T + self.bias
        return torch.asinh(v), self._logdet(v)

    def inverse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.sinh(u)
        y = torch.linalg.solve(self.weight, (v - self.bias).T).T
        return y, -self._logdet(v)


def zuko_nsf(n_features: int) -> nn.Module:
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    return zuko.flows.NSF(n_features, transforms=2, hidden_features=[32, 32], passes=2)


BIJECTIONS = {
    "asinh-linear": lambda k: AsinhLinear(k),
    "zuko-nsf": zuko_nsf,
}


def flat_flow(kind: str, system_name: str) -> FlatFlow:
    system = eqbench.get_system(system_name)
    return FlatFlow(system, BIJECTIONS[kind](system.n_dof)).double()


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch):
    """The example plugin's module, imported from examples/ without installing it."""
    pytest.importorskip("zuko")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import eqbench_zuko_example

    return eqbench_zuko_example


def _flat_jacobian(fn, z: torch.Tensor) -> torch.Tensor:
    shape = z.shape
    return torch.autograd.functional.jacobian(lambda v: fn(v.reshape(1, *shape[1:])).reshape(-1), z.reshape(-1))


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("n, d", [(2, 1), (4, 2), (13, 3)])
def test_com_free_basis_is_an_orthonormal_basis_of_the_com_free_subspace(n, d):
    basis = com_free_basis(n, d)
    assert basis.shape == (n * d, (n - 1) * d) and basis.dtype == torch.float64
    torch.testing.assert_close(basis.T @ basis, torch.eye((n - 1) * d, dtype=torch.float64), atol=1e-14, rtol=0)
    assert float(basis.reshape(n, d, -1).sum(dim=0).abs().max()) < 1e-14  # every column has zero CoM
    x = remove_com(torch.randn(5, n, d, dtype=torch.float64))
    torch.testing.assert_close(((x.reshape(5, -1) @ basis) @ basis.T).reshape(5, n, d), x)  # spans U
    import eqbench.testing

    assert eqbench.testing.com_free_basis is com_free_basis  # the old import keeps working


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("system_name", SYSTEMS)
@pytest.mark.parametrize("kind", list(BIJECTIONS))
def test_logdet_matches_brute_force_jacobian_on_the_com_free_subspace(kind, system_name):
    flow = flat_flow(kind, system_name)
    n, d = flow.n_particles, flow.n_dims
    basis = com_free_basis(n, d)
    gen = torch.Generator().manual_seed(1)
    z = remove_com(torch.randn(3, n, d, generator=gen, dtype=torch.float64))
    with torch.no_grad():
        x, logdet_forward = flow.forward(z)
        _, logdet_inverse = flow.inverse(x)
    for i in range(z.shape[0]):
        jac = basis.T @ _flat_jacobian(lambda v: flow.forward(v)[0], z[i:i + 1]) @ basis
        sign, brute = torch.linalg.slogdet(jac)
        assert sign > 0
        assert abs(float(brute - logdet_forward[i])) < 1e-8, (float(brute), float(logdet_forward[i]))
        jac_inv = basis.T @ _flat_jacobian(lambda v: flow.inverse(v)[0], x[i:i + 1]) @ basis
        assert abs(float(torch.linalg.slogdet(jac_inv)[1] - logdet_inverse[i])) < 1e-8


@pytest.mark.parametrize("kind", list(BIJECTIONS))
def test_samples_com_free_log_prob_agrees_and_round_trip(kind):
    flow = flat_flow(kind, "lj13")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        x, log_q = flow.sample(16, generator=gen)
        assert x.shape == (16, 13, 3) and log_q.shape == (16,)
        assert float(x.mean(dim=1).abs().max()) < 1e-12  # CoM-free
        torch.testing.assert_close(flow.log_prob(x), log_q, atol=1e-10, rtol=0)
        z, _ = flow.inverse(x)
        assert float(z.mean(dim=1).abs().max()) < 1e-12  # latents CoM-free too
        x_back, _ = flow.forward(z)
    assert float((x_back - x).abs().max()) < 1e-10
    # log_prob ignores a CoM shift (the adapter's flat coordinates drop it)
    torch.testing.assert_close(flow.log_prob(x + torch.tensor([1.0, -2.0, 0.5], dtype=x.dtype)), log_q,
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("system_name", SYSTEMS)
def test_identity_flat_flow_is_the_gaussian_baseline(system_name):
    """Same prior, same constant: a factor 2, a constant over N·D instead of (N-1)·D, or a sign
    error in the log-determinant would each move the NLL by nats, far beyond the tolerance."""
    system = eqbench.get_system(system_name)
    x = eqbench.load_data(system_name, split="test", n=500)
    identity = FlatFlow(system, Identity())
    gaussian = build_model("gaussian", system)  # scale 1
    with torch.no_grad():
        nll_flat, nll_gaussian = -identity.log_prob(x).mean(), -gaussian.log_prob(x).mean()
    assert abs(float(nll_flat - nll_gaussian)) < 1e-10, (float(nll_flat), float(nll_gaussian))
    hand = 0.5 * x.pow(2).sum(dim=(1, 2)).mean() + 0.5 * system.n_dof * math.log(2 * math.pi)
    assert abs(float(nll_flat - hand)) < 1e-10  # the NLL convention written out (SPEC §1)

    sigma = 1.7  # a flat scaling is the baseline at that scale: the log-determinant's sign and size
    scaled = FlatFlow(system, Scale(system.n_dof, sigma))
    gaussian_sigma = build_model("gaussian", system, {"scale": sigma})
    with torch.no_grad():
        torch.testing.assert_close(scaled.log_prob(x), gaussian_sigma.log_prob(x), atol=1e-10, rtol=0)
        xs, log_q = scaled.sample(50, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(log_q, gaussian_sigma.log_prob(xs), atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- the zuko example


@pytest.mark.parametrize("system_name", SYSTEMS)
def test_check_flow_passes_for_the_zuko_example(example, system_name):
    system = eqbench.get_system(system_name)
    report = check_flow(lambda: example.build(system, {"transforms": 2, "hidden": [32, 32]}), system)
    assert {"logdet_vs_brute_force_jacobian", "sample_log_prob_agree", "rotation_not_equivariant",
            "permutation_not_equivariant", "translation_invariant", "state_dict_round_trip"} <= set(report.passed)
    assert report.measured["logdet_vs_brute_force_jacobian"] < 1e-8


def test_zuko_example_runs_density_estimation_by_module_path(example, tmp_path):
    cells = eqbench.run("density-estimation", "eqbench_zuko_example:build", "dw4", "smoke",
                        results_dir=tmp_path, progress=False)
    assert cells and all(cell.status == "ok" for cell in cells), [cell.reason for cell in cells]
    info = cells[0].model_info
    assert info["capabilities"] == ["exact-density", "trainable"] and info["density"] == "exact"
    nll = [r for cell in cells for r in cell.records if r.metric == "nll_test" and r.step is None]
    assert nll and all(math.isfinite(r.value) and r.unit == "nats, exact" for r in nll)
    assert {cell.records[0].variant for cell in cells} >= {"aug"}  # not equivariant: augmented variant runs


def test_example_declares_what_it_builds_and_validates_settings(example):
    build = example.build
    assert build.capabilities == frozenset({"trainable", "exact-density"})
    assert "zuko" in build.description and "spline" in build.description
    flow = build(eqbench.get_system("dw4"), {})
    assert capabilities_of(flow) == build.capabilities and flow.symmetries == ("translation",)
    with pytest.raises(ConfigError, match=r"unknown zuko-nsf settings: layers; valid: bins, checkpoint, dtype, "
                                          r"hidden, passes, transforms"):
        build(eqbench.get_system("dw4"), {"layers": 3})
    with pytest.raises(ConfigError, match="passes must be 2"):
        build(eqbench.get_system("dw4"), {"passes": 3})
    with pytest.raises(ConfigError, match="dtype must be one of"):
        build(eqbench.get_system("dw4"), {"dtype": "float16"})
    assert build(eqbench.get_system("dw4"), {"dtype": "float64"}).bijection.flow.base.loc.dtype == torch.float64


def test_checkpoint_loads_pretrained_weights(example, tmp_path):
    system = eqbench.get_system("dw4")
    trained = example.build(system, {"transforms": 2})
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))  # weights no fresh build has
    x = eqbench.load_data("dw4", split="test", n=64, dtype=torch.float32)
    with torch.no_grad():
        expected = trained.log_prob(x)
    # the eqbench flow's state_dict, the zuko flow's own, and a file with metadata around one
    torch.save(trained.state_dict(), tmp_path / "flow.pt")
    torch.save(trained.bijection.flow.state_dict(), tmp_path / "zuko.pt")
    torch.save({"format": 1, "model": "zuko-nsf", "state_dict": trained.state_dict()}, tmp_path / "model.pt")
    for name in ("flow.pt", "zuko.pt", "model.pt"):
        loaded = example.build(system, {"transforms": 2, "checkpoint": str(tmp_path / name)})
        with torch.no_grad():
            torch.testing.assert_close(loaded.log_prob(x), expected, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="is not a file") as missing:
        example.build(system, {"checkpoint": str(tmp_path / "nope.pt")})
    assert "\n" not in str(missing.value)
    with pytest.raises(ConfigError, match="does not fit FlatFlow: missing keys"):
        example.build(system, {"transforms": 3, "checkpoint": str(tmp_path / "flow.pt")})
    with pytest.raises(ConfigError, match="does not fit FlatFlow: RuntimeError: .*size mismatch") as shapes:
        example.build(system, {"transforms": 2, "hidden": [32, 32], "checkpoint": str(tmp_path / "flow.pt")})
    assert "\n" not in str(shapes.value)
    # through the registry path a run uses: a bad checkpoint is a one-line error naming the model
    with pytest.raises(ConfigError, match=r"model 'eqbench_zuko_example:build' on dw4: checkpoint"):
        build_model("eqbench_zuko_example:build", "dw4", {"checkpoint": str(tmp_path / "nope.pt")})


# ----------------------------------------------------------------------------- the adapter's edges


def test_builder_capabilities_follow_the_claims():
    def make(k, cfg):
        return AsinhLinear(k)

    plain = flat_flow_builder(make, name="asinh", description="asinh test flow")
    assert plain.capabilities == frozenset({"trainable", "exact-density"})
    assert plain.__module__ == __name__  # cells are keyed by the factory's code, not eqbench's
    claimed = flat_flow_builder(make, name="asinh", description="d", symmetries=["rotation", "permutation"])
    assert "equivariant" in claimed.capabilities
    fixed = flat_flow_builder(lambda k, cfg: Identity(), name="id", description="d", trainable=False)
    assert fixed.capabilities == frozenset({"exact-density"})
    assert capabilities_of(fixed(eqbench.get_system("dw4"), {})) == fixed.capabilities
    with pytest.raises(ConfigError, match="unknown symmetries spin; valid: permutation, rotation"):
        FlatFlow(eqbench.get_system("dw4"), Identity(), symmetries=["spin"])


def test_unusable_flat_flows_are_refused_in_one_line():
    system = eqbench.get_system("dw4")
    with pytest.raises(ConfigError, match="valid: a zuko.flows.Flow, or an object with forward"):
        as_flat_bijection(nn.Linear(6, 6))  # has forward but no inverse
    with pytest.raises(ConfigError, match=r"has 4 features; dw4 needs \(N-1\)·D = 6"):
        FlatFlow(system, Scale(4, 1.0))
    zuko = pytest.importorskip("zuko")
    with pytest.raises(ConfigError, match="base has trainable parameters"):
        ZukoBijection(zuko.flows.Flow(zuko.flows.MAF(6).transform,
                                      zuko.lazy.UnconditionalDistribution(
                                          zuko.distributions.DiagNormal, torch.zeros(6), torch.ones(6))))
    with pytest.raises(ConfigError, match="must be a standard normal"):
        ZukoBijection(zuko.flows.Flow(zuko.flows.MAF(6).transform,
                                      zuko.lazy.UnconditionalDistribution(
                                          zuko.distributions.DiagNormal, torch.zeros(6), 2 * torch.ones(6),
                                          buffer=True)))


def test_a_flat_flow_of_the_wrong_width_fails_with_the_shapes():
    class Truncating(Identity):
        def forward(self, y):
            return y[:, :5], torch.zeros(y.shape[0])

    with pytest.raises(ValueError, match=r"forward returned shape \(2, 5\), expected \(2, 6\)"):
        FlatFlow(eqbench.get_system("dw4"), Truncating()).log_prob(torch.zeros(2, 4, 2))
