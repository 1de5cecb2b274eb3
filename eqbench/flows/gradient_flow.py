"""Simple gradient flow: ``v = ∇Φ`` with a learned invariant pair potential (paper B.1, C.2).

The paper's first neural-network alternative to the kernel flow (B.1, "simple gradient flow"):
embed every pair distance in a fixed Gaussian RBF basis, map the embedding to a scalar with an
MLP and sum over pairs,

    Φ(x) = Σ_{i<j} softplus(MLP(RBF(d_ij))),        v(x) = +∇_x Φ(x),

which is invariant under permutations, rotations, reflections and translations, so its gradient
is equivariant (paper §4, "Equivariant Gradient Fields"). Because Φ depends on pair distances
only, ``Σ_i ∂Φ/∂x_i = 0``: the field preserves the centre of mass by construction.

Choices, all documented here because the paper leaves them open:

- **Pairs**: unordered pairs ``i < j``, each counted once. The paper writes ``Σ_ij``; counting
  ordered pairs would double Φ, a factor the output layer absorbs.
- **Sign**: ``v = +∇Φ`` as in the paper (§4). Φ is a learned potential, not an energy.
- **RBFs**: unnormalised Gaussians ``g_k(d) = exp(-(d - μ_k)² / γ_k²)`` with *fixed* centres and
  bandwidths (buffers, not parameters; paper C.2). Unnormalised, so a distance beyond the basis
  simply switches every feature off (the pair force vanishes there) and no quotient rule enters
  the second derivatives. The placement is the kernel flow's (paper C.2 "the same distance
  embedding"), chosen by the system's kind and lengths (:mod:`eqbench.flows.defaults`): double
  wells 50 centres equispaced over [0, 2 d0] = [0, 8], γ = 0.5; Lennard-Jones the placement SPEC
  §4 gives for the kernel flow, ``μ = rm · sort((linspace(0, 16, 50) - 1.5)² / 32)``,
  ``γ = rm (0.3 + 3 (μ/rm - 1.5)² / 64)`` (dense around rm = 1, widening outwards); any other
  system equispaced over its ``pair_distance_range`` with γ = (hi - lo) / 16.
- **MLP** [50, 64, 32, 1], tanh after both hidden layers: 5,377 parameters, as in C.2. Φ has
  **no time input**: the field is autonomous (the count leaves no room for one).
- **Output softplus**: with a linear output Φ would contain the output bias as an additive
  constant, which ∇Φ never sees: that parameter would receive no gradient at all. Passing the
  pair output through a softplus keeps the count at 5,377 and makes every parameter act on v;
  it also makes each pair term bounded below, which costs nothing for a potential defined up to a
  constant. The output weights start small (``init_scale``) so the flow starts near identity.

Coincident particles (``d_ij = 0``) have no defined field (the distance is not differentiable
there); no epsilon is added, as such configurations have probability zero under the prior and
the data.

There is no closed-form divergence: training uses Hutchinson's estimator, evaluation the exact
trace by brute force (one backward pass per coordinate), as in paper B.1 / §7.3. Each evaluation
of v itself needs autograd (``velocity_needs_grad``), and the divergence differentiates v once
more, so the velocity always keeps its graph (``create_graph=True``).
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from eqbench.capabilities import model_builder
from eqbench.flows.cnf import CNF, cnf_settings, parse_dtype, pop_cnf_options, reject_unknown
from eqbench.flows.settings import check_settings, dtype_setting, number
from eqbench.flows.defaults import distance_kernel_placement
from eqbench.geometry import pair_vectors
from eqbench.systems.base import SYMMETRIES, ParticleSystem

__all__ = [
    "N_RBF",
    "DistanceRBF",
    "GradientFlowBase",
    "SETTINGS",
    "SimpleGradientFlow",
    "build",
    "rbf_placement",
    "validate",
]

#: Number of distance kernels (paper C.2).
N_RBF = 50
#: Default scale of the output-layer weights at initialisation (small: start near identity).
DEFAULT_INIT_SCALE = 0.1


def rbf_placement(system: ParticleSystem, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed centres ``μ`` and bandwidths ``γ`` of the 50 distance kernels (paper C.1, C.2).

    The kernel flow's distance placement for ``system`` (:func:`eqbench.flows.defaults.distance_kernel_placement`):
    it follows the system's kind and lengths, so every system has one.
    """
    mu, gamma = distance_kernel_placement(system, N_RBF)
    dtype = dtype or torch.get_default_dtype()
    return mu.to(dtype), gamma.to(dtype)


class DistanceRBF(nn.Module):
    """Unnormalised Gaussian expansion ``g_k(d) = exp(-(d - μ_k)² / γ_k²)``; nothing trainable."""

    def __init__(self, mu: torch.Tensor, gamma: torch.Tensor):
        super().__init__()
        self.register_buffer("mu", mu.clone())
        self.register_buffer("gamma", gamma.clone())

    @property
    def n_kernels(self) -> int:
        return self.mu.shape[0]

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        """``d`` of shape ``[...]`` -> features ``[..., n_kernels]``."""
        return torch.exp(-((d.unsqueeze(-1) - self.mu) / self.gamma) ** 2)


def tanh_mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Dense layers of the given sizes, tanh between them, linear output."""
    layers: list[nn.Module] = []
    for k, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        if k > 0:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def shrink_(layer: nn.Linear, scale: float) -> None:
    """Scale a layer's initial weights (not its bias) by ``scale``: small fields at start."""
    with torch.no_grad():
        layer.weight.mul_(scale)


class GradientFlowBase(CNF):
    """A CNF whose field is the gradient ``v = +∇_x Φ(t, x)`` of an invariant scalar Φ.

    Subclasses implement :meth:`potential`. The Jacobian of v is the Hessian of Φ, symmetric;
    the divergence is the Laplacian of Φ, obtained by autograd (brute force or Hutchinson).
    """

    symmetries = SYMMETRIES
    has_closed_form_divergence = False
    velocity_needs_grad = True

    def __init__(self, system: ParticleSystem, **cnf_options: Any):
        super().__init__(system, **cnf_options)
        mu, gamma = rbf_placement(system)
        self.rbf = DistanceRBF(mu, gamma)

    @abstractmethod
    def potential(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Invariant scalar ``Φ(t, x)`` per configuration, shape ``[B]``."""

    def velocity(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """``v = +∇_x Φ(t, x)``, shape of ``x``.

        Always built with ``create_graph=True``: :meth:`CNF.divergence` differentiates v again
        (and training differentiates through both). Works for an ``x`` without
        ``requires_grad`` too; under ``torch.no_grad()`` the result is detached.
        """
        outer_grad = torch.is_grad_enabled()
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            phi = self.potential(t, xg)
            (v,) = torch.autograd.grad(phi.sum(), xg, create_graph=True)
        return v if outer_grad else v.detach()


class SimpleGradientFlow(GradientFlowBase):
    """Simple gradient flow (paper B.1): ``Φ(x) = Σ_{i<j} softplus(MLP(RBF(d_ij)))``, autonomous.

    See the module docstring for every convention. 5,377 parameters on every system.
    """

    #: Layer sizes of the pair MLP (paper C.2).
    sizes = (N_RBF, 64, 32, 1)

    def __init__(self, system: ParticleSystem, *, init_scale: float = DEFAULT_INIT_SCALE, **cnf_options: Any):
        super().__init__(system, **cnf_options)
        self.pair_net = tanh_mlp(self.sizes)
        shrink_(self.pair_net[-1], init_scale)

    def pair_potential(self, d: torch.Tensor) -> torch.Tensor:
        """The learned pair term ``softplus(MLP(RBF(d)))`` for distances ``d`` of any shape."""
        return F.softplus(self.pair_net(self.rbf(d)).squeeze(-1))

    def potential(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``Φ(x)``, shape ``[B]``; ``t`` is ignored (autonomous field)."""
        r, _, _ = pair_vectors(x)
        d = torch.linalg.vector_norm(r, dim=-1)
        return self.pair_potential(d).sum(-1)




#: The settings of the gradient flows (:mod:`eqbench.flows.settings`): the CNF ones (no closed-form
#: divergence), ``init_scale`` and ``dtype``.
SETTINGS = {**cnf_settings(closed_form=False), "init_scale": number(above=0.0), "dtype": dtype_setting()}


def validate(system: ParticleSystem, config: Mapping[str, Any], model: str = "gradient-flow") -> None:
    """Check a gradient flow's settings without building anything (planning calls this)."""
    check_settings(config, model, SETTINGS)


def build_gradient_flow(cls: type[GradientFlowBase], model: str, system: ParticleSystem,
                        config: Mapping[str, Any] | None) -> GradientFlowBase:
    """Shared builder of the gradient flows: settings ``init_scale``, ``dtype`` and the CNF ones."""
    validate(system, config or {}, model)
    config = dict(config or {})
    rbf_placement(system)  # a system with bad lengths: fail before anything else
    options = pop_cnf_options(config, train_divergence="hutchinson")
    init_scale = float(config.pop("init_scale", DEFAULT_INIT_SCALE))
    dtype = parse_dtype(config.pop("dtype", "float32"), model)
    reject_unknown(config, model, ("init_scale", "dtype"))
    return cls(system, init_scale=init_scale, **options).to(dtype)


@model_builder(capabilities=["cnf", "trainable", "equivariant", "exact-density"], validate=validate)
def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> SimpleGradientFlow:
    """Registry builder for ``gradient-flow``: any system (RBF placement from its kind and lengths).

    ``config`` keys: ``init_scale`` (factor on the initial output-layer weights, default 0.1),
    ``dtype`` (``"float32"`` default, or ``"float64"``) and the common CNF settings (``solver``,
    ``steps``, ``atol``, ``rtol``, ``train_divergence`` default ``"hutchinson"``,
    ``eval_divergence`` default ``"exact"``).
    """
    return build_gradient_flow(SimpleGradientFlow, "gradient-flow", system, config)
