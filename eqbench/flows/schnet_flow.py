"""Gradient flow with a SchNet-like potential: ``v = ∇Φ(t, x)`` (paper B.1, C.2).

The paper's second neural-network alternative to the kernel flow: Φ is a small continuous-filter
message-passing network in the style of SchNet (Schütt et al., 2017), whose gradient field is
equivariant because Φ is invariant (paper §4). The layer sizes are those of paper C.2; the
parameter count, 9,857 = 32 + 3 · 3,216 + 177, pins the architecture to:

- **Feature encoding**, dense [1, 16] with tanh, fed with the integration time t: every particle
  starts from the same 16 features ``h_i⁰ = tanh(W t + b)`` (identical particles), and this is
  what makes the field time dependent. 32 parameters.
- **3 interaction blocks**, each a continuous-filter convolution over ordered pairs
  ``h_i ← h_i + Σ_{j≠i} F(RBF(d_ij)) ⊙ h_j`` with its own filter net, dense [50, 32, 32, 16],
  tanh between layers, linear output. 3,216 parameters each. No atom-wise layers (the count
  leaves no room for them). The filter depends on the distance only, so the update is invariant.
- **Readout** dense [16, 8, 4, 1], tanh between layers, per particle, then a softplus, summed over
  particles: ``Φ = Σ_i softplus(readout(h_i))``. 177 parameters. The softplus has the same
  reason as in :mod:`eqbench.flows.gradient_flow`: with a linear output the readout bias is an
  additive constant of Φ that ∇Φ never sees (no gradient); through the softplus every parameter
  acts on v. The readout's output weights start small (``init_scale``): a near-identity flow.

The distance RBFs are those of the simple gradient flow (paper C.2: "the same distance embedding
for both"): 50 fixed unnormalised Gaussians placed by the system's kind and lengths
(:mod:`eqbench.flows.defaults`), DW: μ equispaced in [0, 2 d0] = [0, 8], γ = 0.5; LJ: dense
around rm = 1; any other system equispaced over its typical pair distances. Nothing else depends
on the system, so the flow builds for any system with 9,857 parameters. Sign ``v = +∇Φ``; training divergence Hutchinson, evaluation brute force
(paper B.1). The field preserves the centre of mass since Φ depends on pair distances only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from eqbench.capabilities import model_builder
from eqbench.flows.gradient_flow import (
    DEFAULT_INIT_SCALE,
    N_RBF,
    GradientFlowBase,
    build_gradient_flow,
    shrink_,
    tanh_mlp,
)
from eqbench.flows.gradient_flow import validate as validate_gradient_flow
from eqbench.geometry import pair_vectors
from eqbench.systems.base import ParticleSystem

__all__ = ["N_PARAMETERS", "SchNetGradientFlow", "build", "validate"]

#: Trainable scalars of the default architecture (paper C.2).
N_PARAMETERS = 9_857


class SchNetGradientFlow(GradientFlowBase):
    """Gradient flow with a SchNet-like invariant potential Φ(t, x) (paper B.1, C.2)."""

    n_features = 16
    n_interactions = 3
    filter_sizes = (N_RBF, 32, 32, 16)
    readout_sizes = (16, 8, 4, 1)

    def __init__(self, system: ParticleSystem, *, init_scale: float = DEFAULT_INIT_SCALE, **cnf_options: Any):
        super().__init__(system, **cnf_options)
        self.embedding = nn.Linear(1, self.n_features)
        self.filters = nn.ModuleList(tanh_mlp(self.filter_sizes) for _ in range(self.n_interactions))
        self.readout = tanh_mlp(self.readout_sizes)
        shrink_(self.readout[-1], init_scale)
        n = sum(p.numel() for p in self.parameters())
        assert n == N_PARAMETERS, f"SchNet gradient flow has {n} parameters, expected {N_PARAMETERS}"

    def potential(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``Φ(t, x)``, shape ``[B]``, for ``x`` of shape ``[B, N, D]`` and a scalar time ``t``."""
        batch, n_particles, _ = x.shape
        r, i, j = pair_vectors(x)
        features = self.rbf(torch.linalg.vector_norm(r, dim=-1))  # [B, P, K]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1)
        h = torch.tanh(self.embedding(t)).expand(batch, n_particles, self.n_features)
        for filter_net in self.filters:
            w = filter_net(features)  # [B, P, F], symmetric in (i, j): depends on d_ij only
            # Each unordered pair sends two messages, both weighted by w_ij: h_j to i and h_i to j.
            to_i = w * h.index_select(1, j)
            to_j = w * h.index_select(1, i)
            h = h.index_add(1, i, to_i).index_add(1, j, to_j)
        return F.softplus(self.readout(h).squeeze(-1)).sum(-1)


def validate(system: ParticleSystem, config: Mapping[str, Any]) -> None:
    """Check ``schnet-flow`` settings without building anything (planning calls this)."""
    validate_gradient_flow(system, config, "schnet-flow", closed_form=False)


@model_builder(capabilities=["cnf", "trainable", "equivariant", "exact-density"], validate=validate)
def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> SchNetGradientFlow:
    """Registry builder for ``schnet-flow``: any system (RBF placement from its kind and lengths).

    ``config`` keys: ``init_scale`` (factor on the initial readout output weights, default 0.1),
    ``dtype`` (``"float32"`` default, or ``"float64"``) and the common CNF settings (``solver``,
    ``steps``, ``atol``, ``rtol``, ``train_divergence`` default ``"hutchinson"``,
    ``eval_divergence`` default ``"exact"``).
    """
    return build_gradient_flow(SchNetGradientFlow, "schnet-flow", system, config)
