"""The shared EGNN (eqbench.flows.egnn): symmetries, smoothness, parameter count, the authors' layer."""

from __future__ import annotations

import pytest
import torch

from eqbench.flows.egnn import EGNN
from eqbench.geometry import apply_permutation, random_permutations, random_reflections, random_rotations


def _net(**kw) -> EGNN:
    torch.manual_seed(0)
    net = EGNN(n_features_in=2, hidden=16, layers=3, n_vectors=3, n_scalars=4, dtype=torch.float64, **kw)
    # Larger coordinate heads than the near-identity start, so a broken symmetry shows clearly.
    with torch.no_grad():
        for layer in net.layers:
            layer.coord_mlp[-1].weight.mul_(300.0)
    return net


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("attention", [True, False])
def test_vectors_equivariant_scalars_invariant(dims: int, attention: bool) -> None:
    net = _net(attention=attention)
    gen = torch.Generator().manual_seed(1)
    b, n = 5, 6
    x = torch.randn(b, n, dims, generator=gen, dtype=torch.float64) * 1.5
    h = torch.randn(b, n, 2, generator=gen, dtype=torch.float64)
    vec, sca = net(x, h)
    assert float(vec.detach().abs().max()) > 1e-2  # not trivially zero
    for g in (random_rotations(b, dims, generator=gen), random_reflections(b, dims, generator=gen)):
        shift = torch.randn(b, 1, dims, generator=gen, dtype=torch.float64) * 3
        perm = random_permutations(b, n, generator=gen)
        xg = apply_permutation(x @ g.transpose(-1, -2) + shift, perm)
        vg, sg = net(xg, apply_permutation(h, perm))
        expected = apply_permutation(vec.reshape(b, n, -1), perm).reshape(b, n, 3, dims) @ g.transpose(-1, -2).unsqueeze(1)
        assert torch.allclose(vg, expected, atol=1e-10)
        assert torch.allclose(sg, apply_permutation(sca, perm), atol=1e-10)


def test_a_non_equivariant_input_breaks_the_check() -> None:
    """The check above can fail: feeding absolute coordinates as features breaks rotation equivariance."""
    net = _net()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 2, generator=gen, dtype=torch.float64)
    rot = random_rotations(3, 2, generator=gen)
    vec, _ = net(x, x)
    vg, _ = net(x @ rot.transpose(-1, -2), x @ rot.transpose(-1, -2))
    assert not torch.allclose(vg, vec @ rot.transpose(-1, -2).unsqueeze(1), atol=1e-6)


def test_first_vector_is_the_position_displacement_of_the_stack() -> None:
    """One head: the vector is x_L - x_0 of the authors' EGNN (the E-NF velocity before mean removal)."""
    torch.manual_seed(0)
    net = EGNN(1, hidden=8, layers=2, n_vectors=1, dtype=torch.float64)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    h = torch.ones(2, 4, 1, dtype=torch.float64)
    not_self = (1.0 - torch.eye(4, dtype=torch.float64)).unsqueeze(-1)
    edge_attr = (x.unsqueeze(2) - x.unsqueeze(1)).pow(2).sum(-1, keepdim=True)
    hh, pos = net.embedding(h), x
    for layer in net.layers:
        upd, hh = layer(pos, hh, edge_attr, not_self)
        pos = pos + upd[:, :, 0]
    vec, scalars = net(x, h)
    assert scalars is None
    assert torch.allclose(vec[:, :, 0], pos - x, atol=1e-14)


def test_smooth_at_coincident_particles() -> None:
    net = _net()
    x = torch.zeros(1, 4, 3, dtype=torch.float64)
    x[0, 1] = x[0, 0]  # two coincident particles
    x[0, 2, 0], x[0, 3, 1] = 1.0, -0.5
    x.requires_grad_(True)
    vec, sca = net(x, torch.ones(1, 4, 2, dtype=torch.float64))
    (grad,) = torch.autograd.grad(vec.sum() + sca.sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), x)
    assert torch.isfinite(grad).all() and torch.isfinite(second).all()


def test_parameter_count_of_the_authors_configuration() -> None:
    """hidden 32, 3 layers, one input feature (time), one vector, attention: counted by hand."""
    h = 32
    edge = (2 * h + 2) * h + h + h * h + h
    node = 2 * h * h + h + h * h + h
    coord = h * h + h + h           # last layer: no bias, one head
    att = h + 1
    expected = (1 * h + h) + 3 * (edge + node + coord + att)
    # no scalar read-out: the last layer's feature update is not built (nothing reads it)
    net = EGNN(1, hidden=h, layers=3, n_vectors=1)
    assert sum(p.numel() for p in net.parameters()) == expected - node
    with_scalars = EGNN(1, hidden=h, layers=3, n_vectors=1, n_scalars=2)
    assert sum(p.numel() for p in with_scalars.parameters()) == expected + (h + 1) * 2


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    for n_scalars in (0, 3):
        net = EGNN(1, hidden=8, layers=3, n_vectors=2, n_scalars=n_scalars, dtype=torch.float64)
        x = torch.randn(2, 5, 3, dtype=torch.float64)
        vec, sca = net(x, torch.ones(2, 5, 1, dtype=torch.float64))
        loss = vec.pow(2).sum() + (sca.pow(2).sum() if sca is not None else 0)
        loss.backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
        assert not missing, missing


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        EGNN(1, layers=0)
