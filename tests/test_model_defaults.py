"""Model defaults follow what a system is (kind, length scale, dimension), never its name.

1. The paper's settings (DW-2, DW-4, LJ-13; paper C.1-C.5) are pinned value for value against
   ``tests/data/paper_model_defaults.json``, captured from the code before the defaults moved
   from system names to kinds: kernel centres and bandwidths, RBFs, parameter counts, every
   parameter's shape, layer widths, blocks, solver settings. One deliberate change since the
   capture: ``gradient-flow`` trains with ``train_divergence = "exact"`` (its closed-form
   Laplacian, :mod:`eqbench.flows.gradient_flow`) instead of Hutchinson; parameters unchanged.
2. Every paper model builds for systems the paper does not have (``dw8``, ``lj19``, ``lj55``,
   the known-answer ``harmonic`` system, a plugin system of kind ``other`` that gives only a
   length scale) and passes :func:`eqbench.testing.check_flow_quick`.
3. Length-dependent placements scale with the length scale (doubling it doubles every kernel
   centre and bandwidth), and the width rules switch where their docstrings say.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import eqbench
from eqbench.errors import ConfigError
from eqbench.flows import defaults, gradient_flow, kernel_flow, node, real_nvp
from eqbench.systems.base import DataProtocol, ParticleSystem
from eqbench.systems.double_well import DoubleWell, make_double_well
from eqbench.systems.harmonic import Harmonic
from eqbench.systems.lennard_jones import LennardJones, make_lennard_jones
from eqbench.testing import check_flow_quick

F64 = torch.float64
PAPER = json.loads((Path(__file__).parent / "data" / "paper_model_defaults.json").read_text())
PAPER_MODELS = ["kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "gaussian"]


@dataclass(frozen=True)
class SoftSpheres(ParticleSystem):
    """A plugin system eqbench knows nothing about: kind ``other`` and a length scale, nothing more.

    ``u = Σ_(i<j) (σ/d)⁴``, a soft repulsion with no preferred distance of its own.
    """

    kind: ClassVar[str] = "other"

    sigma: float = 1.5
    data_protocol: DataProtocol = field(default=DataProtocol(step_size=0.1, burn_in=10, stride=1, n_chains=2))

    def pair_potential(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.sigma / d
        return q**4, -4.0 * q**4 / d, 20.0 * q**4 / (d * d)

    @property
    def length_scale(self) -> float:
        return self.sigma

    def describe(self) -> str:
        return f"{self.name}: soft spheres"


def soft_spheres(n_particles: int = 5, n_dims: int = 3, sigma: float = 1.5) -> SoftSpheres:
    return SoftSpheres(name=f"soft{n_particles}", n_particles=n_particles, n_dims=n_dims, sigma=sigma)


NEW_SYSTEMS = {
    "dw8": lambda: make_double_well(8),
    "lj19": lambda: make_lennard_jones(19),
    "harmonic": lambda: eqbench.get_system("harmonic"),
    "other": soft_spheres,
}


# ============================================================ 1. the paper's settings, identical
@pytest.mark.parametrize("name", ["dw2", "dw4", "lj13"])
def test_paper_kernel_and_rbf_placements_are_unchanged(name):
    system = eqbench.get_system(name)
    pinned = PAPER["systems"][name]
    # The pinned LJ time bandwidths are eqbench's former rule (now time_bandwidths = "eqbench"; the
    # default became the authors' code, test_paper_code_time_bandwidths_in_words).
    kernels = kernel_flow.default_kernels(system, time_bandwidths="eqbench")
    assert set(kernels) == set(pinned["kernel_flow_kernels"])
    for key, values in pinned["kernel_flow_kernels"].items():
        assert kernels[key].dtype == F64 and torch.equal(kernels[key], torch.tensor(values, dtype=F64)), key
    mu, gamma = gradient_flow.rbf_placement(system, F64)
    assert torch.equal(mu, torch.tensor(pinned["gradient_flow_rbf"]["mu"], dtype=F64))
    assert torch.equal(gamma, torch.tensor(pinned["gradient_flow_rbf"]["gamma"], dtype=F64))


@pytest.mark.parametrize("name", ["dw2", "dw4", "lj13"])
@pytest.mark.parametrize("model", PAPER_MODELS)
def test_paper_models_are_built_as_before(model, name):
    """Parameter counts (620, 5,377, 9,857, 4,740 / 5,256 / 21,671, 71,712 / 75,840 / 215,680, 1),
    every tensor's shape and dtype, widths, blocks and solver settings, as captured."""
    pinned = PAPER["systems"][name]["models"][model]
    # kernel-flow: the settings it had when pinned (the authors'-code defaults change only the LJ
    # time bandwidths' values and how the offsets c enter, not any shape or count).
    config = {"time_bandwidths": "eqbench", "offset": "radial"} if model == "kernel-flow" else None
    flow = eqbench.build_model(model, name, config)
    state = flow.state_dict()
    assert flow.n_parameters == pinned["n_parameters"]
    assert {k: list(v.shape) for k, v in state.items()} == pinned["shapes"]
    assert sorted({str(v.dtype) for v in state.values()}) == pinned["dtypes"]
    for key in ("train_divergence", "eval_divergence"):
        if key in pinned:
            assert getattr(flow, key) == pinned[key]
    if "solver" in pinned:
        assert repr(flow.solver) == pinned["solver"]
    if model == "node":
        assert list(flow.hidden) == pinned["hidden"]
    if model == "real-nvp":
        assert len(flow.blocks) == pinned["blocks"] and list(flow.hidden) == pinned["hidden"]
        assert [[b.n_cond, b.n_trans, b.condition_first] for b in flow.blocks] == pinned["splits"]
        assert flow.iw_draws == pinned["iw_draws"] and flow.blocks[0].log_scale_bound == pinned["log_scale_bound"]
    if model == "kernel-flow":  # the built flow holds the pinned kernels (float32) and their logs
        k = {key: torch.tensor(v, dtype=F64).float() for key, v in PAPER["systems"][name]["kernel_flow_kernels"].items()}
        assert torch.equal(state["distance_centres"], k["distance_centres"])
        assert torch.equal(state["time_centres"], k["time_centres"])
        assert torch.equal(state["log_distance_bandwidths"], k["distance_bandwidths"].log())
        assert torch.equal(state["log_time_bandwidths"], k["time_bandwidths"].log())
    if model in ("gradient-flow", "schnet-flow"):
        rbf = PAPER["systems"][name]["gradient_flow_rbf"]
        assert torch.equal(state["rbf.mu"], torch.tensor(rbf["mu"], dtype=F64).float())
        assert torch.equal(state["rbf.gamma"], torch.tensor(rbf["gamma"], dtype=F64).float())


def test_paper_placements_in_words():
    """The pinned numbers are the paper's recipes (C.1, SPEC §4), written out independently."""
    dw = kernel_flow.default_kernels(eqbench.get_system("dw4"))
    assert torch.equal(dw["distance_centres"], torch.linspace(0, 8, 50, dtype=F64))
    assert torch.all(dw["distance_bandwidths"] == 0.5) and torch.all(dw["time_bandwidths"] == 0.3)
    lj = kernel_flow.default_kernels(eqbench.get_system("lj13"))
    unit = torch.sort((torch.linspace(0, 16, 50, dtype=F64) - 1.5) ** 2 / 32).values
    assert torch.equal(lj["distance_centres"], unit)
    assert torch.equal(lj["distance_bandwidths"], 0.3 + 3 * (unit - 1.5) ** 2 / 64)
    nu = torch.linspace(0, 1, 10, dtype=F64)
    former = kernel_flow.default_kernels(eqbench.get_system("lj13"), time_bandwidths="eqbench")
    assert torch.equal(former["time_centres"], nu)
    assert torch.equal(former["time_bandwidths"], 0.15 + 0.6 * (nu - 0.5) ** 2)


def test_paper_code_time_bandwidths_in_words():
    """The default LJ time bandwidths are the authors' code, (0.3 + 0.5 (ν - 0.5)²) / √10 (SPEC §4):
    0.1344 at both ends, 0.0954 at the centres next to t = 0.5; DW keeps 0.3 under both rules."""
    nu = torch.linspace(0, 1, 10, dtype=F64)
    lj = kernel_flow.default_kernels(eqbench.get_system("lj13"))
    assert torch.equal(lj["time_centres"], nu)
    assert torch.allclose(lj["time_bandwidths"], (0.3 + 0.5 * (nu - 0.5) ** 2) / 10 ** 0.5, rtol=0, atol=1e-15)
    assert lj["time_bandwidths"][0] == pytest.approx(0.134397, abs=1e-6)
    assert lj["time_bandwidths"].min() == pytest.approx(0.095356, abs=1e-6)
    for rule in ("paper-code", "eqbench"):
        dw = kernel_flow.default_kernels(eqbench.get_system("dw4"), time_bandwidths=rule)
        assert torch.all(dw["time_bandwidths"] == 0.3)


def test_defaults_come_from_the_kind_not_the_name():
    """A double well that calls itself ``lj13`` still gets the double well's settings."""
    impostor = dataclasses.replace(eqbench.get_system("dw4"), name="lj13")
    kernels = kernel_flow.default_kernels(impostor)
    assert torch.equal(kernels["distance_centres"], torch.linspace(0, 8, 50, dtype=F64))
    assert torch.equal(gradient_flow.rbf_placement(impostor, F64)[0], torch.linspace(0, 8, 50, dtype=F64))


# ============================================================ 2. new systems get sensible defaults
@pytest.mark.parametrize("system_name", list(NEW_SYSTEMS))
@pytest.mark.parametrize("model", PAPER_MODELS)
def test_every_paper_model_builds_for_a_new_system_and_passes_the_quick_check(model, system_name):
    """One RK4 step for the gradient flows (their exact divergence costs a backward pass per
    coordinate; the checked properties belong to the field, not the step count)."""
    system = NEW_SYSTEMS[system_name]()
    config = {"steps": 1} if model in ("gradient-flow", "schnet-flow") else {}
    torch.manual_seed(0)
    flow = eqbench.build_model(model, system, config)
    report = check_flow_quick(flow, system)
    assert "sample_shapes_finite_com_free" in report.passed
    claimed = "permutation_equivariant" if flow.symmetries else "permutation_not_equivariant"
    assert claimed in report.passed


def _mlp_count(widths: list[int]) -> int:
    return sum((a + 1) * b for a, b in zip(widths, widths[1:]))


#: LJ-55 (N·D = 165): node [192, 384, 192]; real NVP 16 blocks of two [82, 128, 128, 83] nets.
LJ55_PARAMETERS = {"kernel-flow": 620, "gradient-flow": 5_377, "schnet-flow": 9_857, "gaussian": 1,
                   "node": _mlp_count([165, 192, 384, 192, 165]), "real-nvp": 32 * _mlp_count([82, 128, 128, 83])}


@pytest.mark.parametrize("model", PAPER_MODELS)
def test_every_paper_model_builds_for_lj55(model):
    """Built with its defaults; the CNFs' field (not a 165-coordinate exact solve) is checked."""
    system = make_lennard_jones(55)
    flow = eqbench.build_model(model, system, {"dtype": "float64"} if model != "gaussian" else {})
    assert flow.n_parameters == LJ55_PARAMETERS[model]
    if model in ("kernel-flow", "gradient-flow", "schnet-flow", "node"):
        x = system.initial_configurations(2, torch.Generator().manual_seed(0))
        v = flow.velocity(torch.tensor(0.5, dtype=F64), x)
        assert v.shape == x.shape and torch.isfinite(v).all() and v.sum(-2).abs().max() < 1e-10
    else:
        x, log_q = flow.sample(2)
        assert x.shape == (2, 55, 3) and torch.isfinite(log_q).all()


def test_new_double_well_and_lennard_jones_systems_share_their_kinds_placement():
    for placements in (kernel_flow.default_kernels, lambda s: dict(zip(("mu", "gamma"), gradient_flow.rbf_placement(s, F64)))):
        for paper, new in (("dw4", make_double_well(8)), ("lj13", make_lennard_jones(19)), ("lj13", make_lennard_jones(55))):
            expected, got = placements(eqbench.get_system(paper)), placements(new)
            assert all(torch.equal(expected[k], got[k]) for k in expected), (paper, new.name)


def test_harmonic_and_other_systems_spread_kernels_over_their_pair_distances():
    """Equispaced centres over [0, 2 length_scale] with γ = range / 16: harmonic in 3-D
    (length sqrt(6), the RMS pair distance) and a plugin's σ = 1.5."""
    for system, hi in ((eqbench.get_system("harmonic"), 2 * math.sqrt(6)), (soft_spheres(sigma=1.5), 3.0)):
        k = kernel_flow.default_kernels(system)
        assert torch.allclose(k["distance_centres"], torch.linspace(0, hi, 50, dtype=F64), rtol=0, atol=1e-15)
        assert torch.allclose(k["distance_bandwidths"], torch.full((50,), hi / 16, dtype=F64), rtol=0, atol=1e-15)
        assert torch.all(k["time_bandwidths"] == 0.3)


@pytest.mark.parametrize("system, hidden, blocks, nvp_hidden", [
    (make_double_well(2), (64, 64), 8, (64, 64)),  # N·D = 4
    (eqbench.get_system("harmonic"), (64, 64), 8, (64, 64)),  # 12
    (make_double_well(8), (64, 64), 8, (64, 64)),  # 16
    (make_double_well(16), (64, 64), 8, (64, 64)),  # 32: the last DW-4-sized system
    (soft_spheres(11, 3), (64, 128, 64), 16, (64, 64)),  # 33: the first LJ-13-sized one
    (make_lennard_jones(19), (64, 128, 64), 16, (64, 64)),  # 57
    (soft_spheres(32, 2), (64, 128, 64), 16, (64, 64)),  # 64: width 64 still spans the output
    (make_double_well(33), (128, 256, 128), 16, (64, 64)),  # 66: node widens; real NVP transforms 33
    (make_double_well(64), (128, 256, 128), 16, (64, 64)),  # 128: real NVP transforms 64
    (make_double_well(65), (192, 384, 192), 16, (128, 128)),  # 130: real NVP transforms 65
    (make_lennard_jones(55), (192, 384, 192), 16, (128, 128)),  # 165
])
def test_widths_and_blocks_follow_the_dimension(system, hidden, blocks, nvp_hidden):
    assert node.default_hidden(system) == hidden
    assert real_nvp.default_blocks(system) == blocks and real_nvp.default_hidden(system) == nvp_hidden
    flow = node.build(system)
    assert flow.hidden == hidden and flow.net[-1].in_features == hidden[-1] >= system.dim
    nvp = real_nvp.build(system)
    assert len(nvp.blocks) == blocks and nvp.blocks[0].scale_net[-1].in_features >= nvp.blocks[0].n_trans


# ============================================================ 3. placements scale with the length
@pytest.mark.parametrize("unit, double", [
    (DoubleWell(name="dw4", n_particles=4, n_dims=2), DoubleWell(name="dw4", n_particles=4, n_dims=2, d0=8.0)),
    (LennardJones(name="lj13", n_particles=13, n_dims=3), LennardJones(name="lj13", n_particles=13, n_dims=3, rm=2.0)),
    (Harmonic(name="h", n_particles=4, n_dims=2), Harmonic(name="h", n_particles=4, n_dims=8)),  # sqrt(2D): 2 -> 4
    (soft_spheres(sigma=1.5), soft_spheres(sigma=3.0)),
], ids=["double-well", "lennard-jones", "harmonic", "other"])
def test_doubling_the_length_scale_doubles_every_distance_kernel(unit, double):
    assert double.length_scale == pytest.approx(2 * unit.length_scale, rel=1e-15)
    assert double.pair_distance_range[1] == pytest.approx(2 * unit.pair_distance_range[1], rel=1e-15)
    a, b = kernel_flow.default_kernels(unit), kernel_flow.default_kernels(double)
    for key in ("distance_centres", "distance_bandwidths"):
        assert torch.allclose(b[key], 2 * a[key], rtol=1e-14, atol=0), key
        assert not torch.allclose(b[key], a[key])
    assert torch.equal(b["time_centres"], a["time_centres"]) and torch.equal(b["time_bandwidths"], a["time_bandwidths"])
    for x, y in zip(gradient_flow.rbf_placement(unit, F64), gradient_flow.rbf_placement(double, F64), strict=True):
        assert torch.allclose(y, 2 * x, rtol=1e-14, atol=0)
    schnet = eqbench.build_model("schnet-flow", double, {"dtype": "float64"})
    assert torch.allclose(schnet.rbf.mu, 2 * gradient_flow.rbf_placement(unit, F64)[0], rtol=1e-6, atol=0)


def test_a_system_with_bad_lengths_is_refused_in_one_line():
    for sigma in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match=r"soft5: length_scale must be a finite number > 0") as info:
            eqbench.build_model("kernel-flow", soft_spheres(sigma=sigma))
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="at least 2 distance kernels"):
        defaults.distance_kernel_placement(soft_spheres(), 1)


# ============================================================ the tasks no longer refuse them
@pytest.mark.parametrize("task", ["density-estimation", "bg-reweighting"])
def test_tasks_on_the_known_answer_system_plan_every_paper_model(task):
    """Every paper model builds for ``harmonic``, so these tasks refuse a model there only for a
    missing capability (bg-reweighting: the closed-form gaussian), never for a missing build."""
    from eqbench.runner import plan_cells

    for model in PAPER_MODELS:
        if task == "bg-reweighting" and model == "gaussian":
            with pytest.raises(ConfigError, match="closed form"):
                plan_cells(task, model, "harmonic", "smoke")
            continue
        assert plan_cells(task, model, "harmonic", "smoke"), model


def test_kernel_flow_runs_density_estimation_on_the_known_answer_system(tmp_path):
    from conftest import run_task_smoke

    _, table = run_task_smoke("density-estimation", "kernel-flow", "harmonic", tmp_path,
                              expect_metrics=("nll_train", "nll_test"))
    nll = float(table.loc[table["metric"] == "nll_test", "value"].iloc[0])
    # Near the prior's k/2 (1 + log 2π) = 12.77 (k = 9): a short run of a near-identity flow.
    assert abs(nll - 4.5 * (1 + math.log(2 * math.pi))) < 1.0
