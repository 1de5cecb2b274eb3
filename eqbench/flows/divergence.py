"""Divergence of a velocity field: closed form, brute force by autograd, Hutchinson (paper §4, §7.1).

``div v = tr ∂v/∂x`` is what a CNF needs for its density (``d log q/dt = -div v``). Autograd
gets it exactly with one backward pass per coordinate (cost O(n) passes, paper §4), or as an
unbiased one-probe estimate ``εᵀ (∂v/∂x) ε`` with Rademacher ``ε`` (Hutchinson 1989; Grathwohl
et al. 2018), whose variance grows with n and breaks reweighting (paper §7.1, Fig. 3a-b). The
kernel flow has a closed form (paper eq. after (1), A.4).

All functions take ``x`` with ``requires_grad`` and the velocity ``v`` computed from it; with
``create_graph`` the result stays differentiable for training.
"""

from __future__ import annotations

import torch

__all__ = ["METHODS", "brute_force_divergence", "hutchinson_divergence", "rademacher_like"]

#: Names accepted by ``CNF.divergence(method=...)``; "exact" means closed form where the model has
#: one, brute force otherwise.
METHODS = ("exact", "closed-form", "brute-force", "hutchinson")


def brute_force_divergence(v: torch.Tensor, x: torch.Tensor, *, create_graph: bool) -> torch.Tensor:
    """Exact trace with one vector-Jacobian product per coordinate: ``Σ_k ∂v_k/∂x_k``.

    ``v`` and ``x`` are ``[B, N, D]``; returns ``[B]``.
    """
    v_flat = v.reshape(v.shape[0], -1)
    div = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    n = v_flat.shape[1]
    for k in range(n):
        (grad,) = torch.autograd.grad(v_flat[:, k].sum(), x, create_graph=create_graph, retain_graph=True)
        div = div + grad.reshape(grad.shape[0], -1)[:, k]
    return div


def rademacher_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """±1 entries with equal probability, shaped like ``x``."""
    bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device if generator is None else "cpu")
    return (2 * bits - 1).to(device=x.device, dtype=x.dtype)


def hutchinson_divergence(
    v: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, *, create_graph: bool
) -> torch.Tensor:
    """One-probe estimate ``εᵀ (∂v/∂x) ε``: unbiased, one backward pass, variance O(n)."""
    (vjp,) = torch.autograd.grad((v * noise).sum(), x, create_graph=create_graph, retain_graph=True)
    return (vjp * noise).sum(dim=tuple(range(1, x.ndim)))
