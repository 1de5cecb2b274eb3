"""``lj55``: 55 Lennard-Jones particles in lj13's convention; the Mackay icosahedron; the step-size
rule of the reference data; blocked energy evaluation."""

from __future__ import annotations

import pytest
import torch

from eqbench.components import DATA_ON_REQUEST, get_system
from eqbench.data.step_size import StepSizeProbe, best_step_size, scan_step_sizes
from eqbench.minima import is_minimum, minimize
from eqbench.systems.base import PAIR_BLOCK
from eqbench.systems.lennard_jones import LennardJones, mackay_icosahedron


@pytest.mark.parametrize(("shells", "n"), [(1, 13), (2, 55), (3, 147)])
def test_mackay_icosahedron_has_the_shell_counts(shells: int, n: int) -> None:
    x = mackay_icosahedron(shells)
    assert x.shape == (1, n, 3)
    # No two points coincide and the vertices of the outer shell sit at radius `shells`.
    d = torch.cdist(x[0], x[0]) + torch.eye(n, dtype=x.dtype) * 10
    assert float(d.min()) > 0.8
    assert float(x[0].norm(dim=-1).max()) == pytest.approx(float(shells))


@pytest.mark.parametrize(("shells", "reference"), [(1, -44.326801), (2, -279.248470)])
def test_relaxed_mackay_icosahedron_is_the_known_global_minimum(shells: int, reference: float) -> None:
    """Cambridge Cluster Database values (ε, pair energy over unordered pairs, no oscillator)."""
    x = mackay_icosahedron(shells)
    pair_only = LennardJones(name="pair", n_particles=x.shape[1], n_dims=3, oscillator_scale=0.0,
                             pair_multiplicity=1.0)
    result = minimize(pair_only, x)
    assert bool(result.converged.all())
    assert float(result.energy) == pytest.approx(reference, abs=2e-6)


def test_lj55_minimum_in_its_own_convention() -> None:
    """lj55 counts ordered pairs (twice lj13-single's pair part) and adds the CoM oscillator: its
    minimum from the Mackay icosahedron is -491.6413, a true minimum (projected Hessian positive),
    and its energy there is twice the pair part plus ½ Σ |x_i - x̄|²."""
    system = get_system("lj55")
    assert (system.n_particles, system.n_dims, system.pair_multiplicity) == (55, 3, 2.0)
    result = minimize(system, mackay_icosahedron(2))
    assert bool(result.converged.all())
    assert float(result.energy) == pytest.approx(-491.6413, abs=1e-4)
    assert bool(is_minimum(system, result.x))
    pair_only = LennardJones(name="pair", n_particles=55, n_dims=3, oscillator_scale=0.0, pair_multiplicity=1.0)
    x = result.x
    oscillator = 0.5 * (x - x.mean(dim=-2, keepdim=True)).pow(2).sum()
    assert float(system.energy(x)) == pytest.approx(2 * float(pair_only.energy(x)) + float(oscillator), abs=1e-9)


def test_lj55_is_registered_and_made_on_request() -> None:
    assert "lj55" in DATA_ON_REQUEST
    text = get_system("lj55").describe()
    assert "ORDERED" in text and "Mackay" in text and "-491.6413" in text


def test_blocked_energy_equals_the_unblocked_one() -> None:
    """A batch larger than one block gives every row the energy it has alone (a wrong reshape
    would permute or mix rows)."""
    system = get_system("lj55")
    rows = PAIR_BLOCK // (55 * 54 // 2)
    generator = torch.Generator().manual_seed(0)
    x = system.initial_configurations(2 * rows + 3, generator).reshape(1, 2 * rows + 3, 55, 3)
    blocked = system.energy(x)
    assert blocked.shape == (1, 2 * rows + 3)
    alone = torch.stack([system._energy(x[0, k]) for k in range(x.shape[1])])
    torch.testing.assert_close(blocked[0], alone, rtol=0, atol=1e-9)
    grad = system.gradient(x)
    assert grad.shape == x.shape
    grad_alone = torch.stack([system._gradient(x[0, k]) for k in range(x.shape[1])])
    torch.testing.assert_close(grad[0], grad_alone, rtol=0, atol=1e-9)
    # pair_energy is pair_potential's f
    d = torch.linspace(0.8, 3.0, 50, dtype=torch.float64)
    torch.testing.assert_close(system.pair_energy(d), system.pair_potential(d)[0], rtol=0, atol=0)


def test_step_size_scan_picks_the_largest_acceptance_times_step() -> None:
    """On DW-2 acceptance falls as the step grows; the rule picks the maximum of α·s, which is
    neither end of a wide scan."""
    probes, _, _ = scan_step_sizes(get_system("dw2"), [0.05, 0.5, 1.0, 2.0, 8.0, 30.0], n_chains=64,
                                   equilibration_steps=200, n_steps=200, seed=1)
    alphas = [p.acceptance for p in probes]
    assert alphas == sorted(alphas, reverse=True)
    best = best_step_size(probes)
    assert best.efficiency == max(p.efficiency for p in probes)
    assert best.step_size not in (0.05, 30.0)
    assert best_step_size([StepSizeProbe(1.0, 0.1, 0.1, 1, 1), StepSizeProbe(0.5, 0.5, 0.25, 1, 1)]).step_size == 0.5
    with pytest.raises(ValueError):
        scan_step_sizes(get_system("dw2"), [])
    # From given states: their batch is the number of chains, and nothing is equilibrated.
    _, states, _ = scan_step_sizes(get_system("dw2"), [0.5], n_chains=8, equilibration_steps=0, n_steps=5, seed=2)
    probes, again, _ = scan_step_sizes(get_system("dw2"), [0.5], equilibration_steps=0, n_steps=5, start=states)
    assert probes[0].n_chains == 8 and torch.equal(again, states)
