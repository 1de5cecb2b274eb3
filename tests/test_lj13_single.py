"""``lj13-single``: LJ-13 in the single-count convention of bgflow and Midgley et al. 2023.

bgflow's ``LennardJonesPotential`` (``bgflow/distribution/energy/lennard_jones.py``) sums
``ε [(rm/d)^12 - 2 (rm/d)^6]`` over all ordered pairs and divides by 2, and adds
``½ oscillator_scale Σ_i |x_i - x̄|²`` (scale 1); the SE(3) augmented coupling flow's
``eacf/targets/target_energy/leonard_jones.py`` writes the same as ``ε/(2τ) Σ_(i≠j) + ½ Σ |x_i - x̄|²``.
Expected numbers here are written out by hand from that formula or come from autograd and
scipy, never from :mod:`eqbench.systems`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import centred_icosahedron

from eqbench.api import get_system
from eqbench.cli import main
from eqbench.minima import minimize
from eqbench.registry import SYSTEMS, TASKS

F64 = torch.float64


def _pair(d: float) -> float:
    """One unordered pair, ε = rm = 1: d^-12 - 2 d^-6 (= 4[(σ/d)^12 - (σ/d)^6] with σ = 2^(-1/6))."""
    return d ** -12 - 2.0 * d ** -6


_icosahedron = centred_icosahedron


def test_three_particles_by_hand_in_both_conventions() -> None:
    """(0,0,0), (1,0,0), (0,2,0): distances 1, 2, √5; CoM (1/3, 2/3, 0), Σ|x_i - x̄|² = 5/9 + 8/9 + 17/9."""
    single = get_system("lj13-single").with_particles(3)
    double = get_system("lj13").with_particles(3)
    assert single.name == "lj3-single" and double.name == "lj3"
    x = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]], dtype=F64)
    pair = _pair(1.0) + _pair(2.0) + _pair(math.sqrt(5.0))
    assert pair == pytest.approx(-1.0 + (1 / 4096 - 1 / 32) + (1 / 15625 - 2 / 125), abs=1e-15)
    oscillator = 0.5 * (5 / 9 + 8 / 9 + 17 / 9)
    assert single.energy(x).item() == pytest.approx(pair + oscillator, abs=1e-12)
    assert double.energy(x).item() == pytest.approx(2.0 * pair + oscillator, abs=1e-12)
    # Shifting the cluster changes nothing (the oscillator acts on x - x̄).
    assert single.energy(x + 3.0).item() == pytest.approx(pair + oscillator, abs=1e-12)


def test_pair_part_is_half_of_lj13_and_the_oscillator_identical() -> None:
    single, double = get_system("lj13-single"), get_system("lj13")
    x = double.initial_configurations(16, torch.Generator().manual_seed(3))
    osc = 0.5 * (x - x.mean(dim=-2, keepdim=True)).pow(2).sum(dim=(-2, -1))
    pair_single = single.energy(x) - osc
    pair_double = double.energy(x) - osc
    torch.testing.assert_close(pair_single, 0.5 * pair_double, rtol=1e-13, atol=1e-12)
    assert bool((pair_single < -1.0).all())  # bound pairs: not a trivial zero
    # The same density as lj13 with τ = 2 in the pair part and the oscillator at τ = 1.
    hot_pairs = dataclasses.replace(double, tau=2.0)
    torch.testing.assert_close(single.energy(x), hot_pairs.energy(x), rtol=1e-13, atol=1e-12)
    # ... and not lj13 at temperature 2 (that halves the oscillator too).
    assert not torch.allclose(single.energy(x), 0.5 * double.energy(x))


def test_matches_bgflow_formula_written_out() -> None:
    """bgflow: Σ over ordered pairs of ε[(rm/d)^12 - 2(rm/d)^6], halved, + ½ Σ|x_i - x̄|², for random clusters."""
    system = get_system("lj13-single")
    x = system.initial_configurations(4, torch.Generator().manual_seed(5)).numpy()
    for k in range(len(x)):
        ordered = sum(_pair(float(np.linalg.norm(x[k, i] - x[k, j])))
                      for i in range(13) for j in range(13) if i != j)
        expected = ordered / 2 + 0.5 * float(((x[k] - x[k].mean(axis=0)) ** 2).sum())
        assert system.energy(torch.from_numpy(x[k:k + 1])).item() == pytest.approx(expected, rel=1e-12)


def test_forces_are_minus_the_autograd_gradient_and_laplacian_matches() -> None:
    system = get_system("lj13-single")
    x = system.initial_configurations(3, torch.Generator().manual_seed(7)).requires_grad_(True)
    grad, = torch.autograd.grad(system.energy(x).sum(), x, create_graph=True)
    torch.testing.assert_close(system.force(x.detach()), -grad.detach(), rtol=1e-10, atol=1e-10)
    flat = grad.reshape(3, -1)
    lap = sum(torch.autograd.grad(flat[:, k].sum(), x, retain_graph=True)[0].reshape(3, -1)[:, k]
              for k in range(flat.shape[1]))
    torch.testing.assert_close(system.laplacian(x.detach()), lap.detach(), rtol=1e-9, atol=1e-8)


def test_global_minima_in_both_conventions() -> None:
    """From the centred icosahedron: lj13 -83.0896 (SPEC §2), lj13-single -38.7722; without the
    oscillator the single-count pair energy is the textbook LJ13 value -44.326801 ε (Wales & Doye
    1997, u = 4ε[(σ/r)^12 - (σ/r)^6]; the same ε in eqbench's rm form, rm = 2^(1/6) σ), and lj13's
    pair energy twice that."""
    single, double = get_system("lj13-single"), get_system("lj13")
    expected = {
        (single, 1.0): -38.7722, (double, 1.0): -83.0896,
        (single, 0.0): -44.326801, (double, 0.0): -88.653603,
    }
    for (system, scale), value in expected.items():
        target = dataclasses.replace(system, oscillator_scale=scale)
        res = minimize(target, _icosahedron(0.96), gtol=1e-9)
        assert bool(res.converged[0]), (system.name, scale)
        assert res.energy.item() == pytest.approx(value, abs=1e-4), (system.name, scale)
    # Independent cross-check with scipy's L-BFGS on lj13-single.
    from scipy.optimize import minimize as scipy_minimize

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        x = torch.from_numpy(flat.reshape(1, 13, 3))
        return float(single.energy(x)), single.gradient(x).numpy().ravel()

    out = scipy_minimize(fun, _icosahedron(1.0).numpy().ravel(), jac=True, method="L-BFGS-B",
                         options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 5000})
    assert out.fun == pytest.approx(-38.7722, abs=1e-4)
    assert "-38.7722" in single.describe() and "-44.3268" in single.describe()


def test_describe_states_the_convention_and_who_uses_which(capsys) -> None:
    text = get_system("lj13-single").describe()
    assert "UNORDERED" in text and "counted once" in text
    assert "bgflow" in text and "Midgley" in text
    assert "τ = 2 in the pair part" in text and "oscillator" in text
    assert "Σ_(i<j)" in text
    lj13 = get_system("lj13").describe()
    assert "Köhler" in lj13 and "E-NF / EFM / DEM" in lj13 and "lj13-single" in lj13
    assert "ORDERED pairs" in lj13 and "Σ_(i≠j)" in lj13
    assert main(["describe", "lj13-single"]) == 0
    out = capsys.readouterr().out
    assert "counted once" in out and "bgflow" in out
    assert main(["list", "systems"]) == 0
    out = capsys.readouterr().out
    assert "lj13-single" in out and "counted once" in out


def test_protocol_is_its_own() -> None:
    single, double = get_system("lj13-single"), get_system("lj13")
    assert "lj13-single" in SYSTEMS.names()
    assert single.data_protocol != double.data_protocol
    # The protocol rule (paper C.4): the step maximises acceptance x step (measured: 0.04); burn-in
    # at least 20 and stride at least 1.25 of the slowest autocorrelation time measured there
    # (mean pair distance, 2,123 steps; LJ_SINGLE_PROTOCOL's comment).
    protocol = single.data_protocol
    assert protocol.step_size == 0.04
    assert protocol.burn_in >= 20 * 2_123 and protocol.stride >= 1.25 * 2_123
    assert single.kind == double.kind and single.length_scale == double.length_scale


def test_energy_training_accepts_lj13_single() -> None:
    from eqbench.runner import plan_cells

    task = TASKS.get("energy-training")
    assert "lj13-single" in task.systems
    task.check_supported("lj13-single", "kernel-flow")
    assert plan_cells("energy-training", "kernel-flow", "lj13-single", "smoke")


def test_data_without_arguments_leaves_lj13_single_to_be_named(tmp_path, monkeypatch, capsys) -> None:
    """``make data`` (``eqbench data`` without SYSTEM) covers what the tests need, not lj13-single;
    the output and ``--help`` say how to make it. ``--verify`` on an empty cache generates nothing."""
    from eqbench import catalog, components  # noqa: F401  (catalog registers the built-ins)

    monkeypatch.setenv("EQBENCH_CACHE", str(tmp_path))
    assert components.DATA_ON_REQUEST == ("lj13-single", "lj55")
    defaults = components.default_data_systems()
    assert "lj13-single" not in defaults and {"dw2", "dw4", "lj13", "harmonic"} <= set(defaults)
    assert main(["data", "--verify"]) == 2  # everything missing in an empty cache
    out = capsys.readouterr().out
    assert "lj13 train: missing" in out and "dw4 test: missing" in out
    assert "lj13-single train" not in out
    assert "`python -m eqbench data lj13-single`" in out
    assert main(["data", "lj13-single", "--verify"]) == 2  # named: covered
    assert "lj13-single train: missing" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.npy"))
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    assert "eqbench data lj13-single" in " ".join(capsys.readouterr().out.split())


def test_sweeps_run_lj13_single_where_named_or_where_the_task_lists_it(tmp_path) -> None:
    """A task for any system (test-nll) sweeps every registered system except lj13-single unless
    it is named; energy-training lists it, so its default sweep includes it."""
    from eqbench.sweep import plan_sweep

    default = {c.system for c in plan_sweep("test-nll", ["gaussian"], None, "smoke", results_dir=tmp_path).todo}
    assert "lj13" in default and "lj13-single" not in default
    named = plan_sweep("test-nll", ["gaussian"], ["lj13-single"], "smoke", results_dir=tmp_path).todo
    assert named and {c.system for c in named} == {"lj13-single"}
    energy = plan_sweep("energy-training", ["kernel-flow"], None, "smoke", results_dir=tmp_path).todo
    assert "lj13-single" in {c.system for c in energy}
