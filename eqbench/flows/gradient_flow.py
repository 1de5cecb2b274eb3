"""Simple gradient flow: ``v = ±∇Φ`` with a learned invariant pair potential (paper B.1, C.2).

The paper's first neural-network alternative to the kernel flow (B.1, "simple gradient flow"):
embed every pair distance in a fixed Gaussian RBF basis, map the embedding to a scalar with an
MLP and sum over pairs,

    Φ(x) = Σ_{i<j} softplus(MLP(RBF(d_ij))),        v(x) = +∇_x Φ(x)  (setting ``sign``),

which is invariant under permutations, rotations, reflections and translations, so its gradient
is equivariant (paper §4, "Equivariant Gradient Fields"). Because Φ depends on pair distances
only, ``Σ_i ∂Φ/∂x_i = 0``: the field preserves the centre of mass by construction.

**Text, code and defaults** (paper §4, B.1, C.2; the authors' code is en_flows
``deprecated/eqnode/dynamics.py`` ``SimpleEqDynamics`` with the RBF encoder of
``deprecated/eqnode/kernels.py``, built for DW-4 in ``deprecated/main_new.py``). Every
difference is a setting (``model_config`` key); the default follows the paper's text where it is
explicit and the authors' code where the text is silent; ``preset = "paper-code"`` takes the
code's choice of every setting (settings given explicitly override the preset):

- ``rbf``: ``"normalised"`` (default; code) ``K_k = g_k / Σ_m g_m``, ``g_k = exp(-(d - μ_k)²/γ_k²)``,
  as the kernel flow does, or ``"unnormalised"`` (eqbench's former choice) ``g_k`` itself. The
  text (C.2) gives the kernels but is silent on normalisation, so the code decides. The code adds
  1e-6 to every g_k before normalising (far beyond the basis its K becomes uniform, 1/50, where
  eqbench's exact softmax keeps the nearest kernel); eqbench leaves that epsilon out, as in the
  kernel flow. Far beyond the basis both give a constant pair term: no force.
- ``sign``: ``"+"`` (default; text) ``v = +∇Φ`` as §4 writes it, or ``"-"`` (code)
  ``v = -∇Φ`` (``SimpleEqDynamics`` returns ``-1 · grad``). Φ is learned, so the two are the
  same model family with Φ ↦ -Φ, except that the output softplus bounds Φ below (see below).
- Not settings: the code sums the pair term over ordered pairs (Φ doubled, a factor the output
  layer absorbs; eqbench: unordered pairs ``i < j``) and projects the velocity onto zero mean
  (∇Φ already has zero mean), neither of which changes the model; and it has a linear output
  where eqbench puts a softplus (reason below; 5,377 parameters either way). The code builds these flows for DW-4 only, with
  ``linspace(0, 8, 50)``, γ = 0.5 (fixed); eqbench places the kernels by the system's kind
  (:mod:`eqbench.flows.defaults`), which is that placement for the double wells.

Other choices, documented here because the paper leaves them open:

- **Pairs**: unordered pairs ``i < j``, each counted once. The paper writes ``Σ_ij``.
- **RBF placement**: *fixed* centres and bandwidths (buffers, not parameters; paper C.2), the
  kernel flow's (paper C.2 "the same distance embedding"), chosen by the system's kind and
  lengths (:mod:`eqbench.flows.defaults`): double wells 50 centres equispaced over
  [0, 2 d0] = [0, 8], γ = 0.5; Lennard-Jones the placement SPEC §4 gives for the kernel flow,
  ``μ = rm · sort((linspace(0, 16, 50) - 1.5)² / 32)``, ``γ = rm (0.3 + 3 (μ/rm - 1.5)² / 64)``
  (densest near 0, 17 of 50 centres below 0.5 rm and 4 in [0.8, 1.3] rm; widening outwards);
  any other system equispaced over its ``pair_distance_range`` with γ = (hi - lo) / 16.
  Normalised kernels are computed as a softmax over k of the logits ``-(d - μ_k)²/γ_k²``
  (shifted by their maximum, entries below exp(-60) of the largest raised to it, gradient
  through that floor the identity, as in the kernel flow): finite and exact far beyond the
  basis, where every g_k underflows and g/Σg would be 0/0.
- **MLP** [50, 64, 32, 1], tanh after both hidden layers: 5,377 parameters, as in C.2. Φ has
  **no time input**: the field is autonomous (the count leaves no room for one, and the code has none).
- **Output softplus**: with a linear output Φ would contain the output bias as an additive
  constant, which ∇Φ never sees: that parameter would receive no gradient at all. Passing the
  pair output through a softplus keeps the count at 5,377 and makes every parameter act on v;
  it also makes each pair term bounded below, which costs nothing for a potential defined up to a
  constant. The output weights start small (``init_scale``) so the flow starts near identity.

Coincident particles (``d_ij = 0``) have no defined field (the distance is not differentiable
there); no epsilon is added, as such configurations have probability zero under the prior and
the data.

**Closed-form divergence.** Φ is a sum of radial pair terms ``f(d) = softplus(MLP(RBF(d)))``,
so with ``r_ij = x_i - x_j`` the field is ``v_i = Σ_{j≠i} f'(d_ij) r_ij / d_ij`` and the
Laplacian of one pair term with respect to one of its particles is the radial Laplacian in D
dimensions, ``f''(d) + (D - 1) f'(d) / d``. Both particles of a pair get it, so

    div v = Σ_i Δ_i Φ = Σ_{i≠j} [f''(d_ij) + (D - 1) f'(d_ij) / d_ij]
          = 2 Σ_{i<j} [f''(d_ij) + (D - 1) f'(d_ij) / d_ij],

exact, at O(N²) pair evaluations instead of the N·D backward passes of brute force (paper §4,
B.1: the paper itself brute-forces ΔΦ for this flow; the pair structure makes that unnecessary).
There is no time dependence (Φ is autonomous). ``f'`` and ``f''`` are propagated through the MLP as second-order jets
(:meth:`SimpleGradientFlow.radial_jets`): value, first and second derivative in d of every
layer, three stacked rows per GEMM and the chain rule of tanh and softplus written out. These are
ordinary differentiable tensor operations, so training differentiates the divergence with
respect to the parameters (and OTD's adjoint with respect to x) by plain first-order autograd.
The jet starts from the RBFs' own derivatives. Unnormalised: ``g' = a g``, ``g'' = (a² + b) g``
with ``a_k = -2 (d - μ_k)/γ_k²``, ``b_k = -2/γ_k²``. Normalised (a softmax over the logits, whose
d-derivatives are a and b): ``K' = K (a - ā)``, ``K'' = K [(a - ā)² + (b - b̄) - Σ_m K_m (a_m - ā)²]``,
``ā = Σ K a``, ``b̄ = Σ K b``; a is taken relative to the dominant kernel's (a shift that changes
neither K' nor K''), so nothing cancels catastrophically far beyond the basis. Far beyond the
RBF range the unnormalised kernels underflow to 0 and so do ``f'``, ``f''``; the normalised ones
tend to the nearest kernel alone, whose weight no longer changes (``f' → 0``). The divergence
stays exact there (no quotient of underflowed numbers, no 0/0). Both signs: ``v`` and ``div v``
flip together.

``gradient-flow`` therefore trains and scores with this closed form (``train_divergence`` and
``eval_divergence`` ``"exact"``); ``brute-force`` and ``hutchinson`` remain available by name
(they differentiate the autograd velocity ∇Φ, an independent check of the closed form, and are
the paper's estimators for timing comparisons). The SchNet flow's Φ is not a pair sum and keeps
Hutchinson for training and brute force for evaluation, as in paper B.1 / §7.3.

:meth:`GradientFlowBase.velocity` builds v by autograd (``velocity_needs_grad``) and always keeps
its graph (``create_graph=True``), since the autograd divergences differentiate v once more.
A coincident pair (``d_ij = 0``) contributes nothing to the closed-form v and div v, the value
autograd's norm gives the autograd velocity there.

Each setting's value is recorded in the run's ``model_config`` as given and, resolved (preset
and defaults applied), in the built flow's :attr:`GradientFlowBase.choices`.
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
from eqbench.errors import ConfigError
from eqbench.flows.cnf import CNF, cnf_settings, parse_dtype, pop_cnf_options, reject_unknown
from eqbench.flows.settings import Setting, check_settings, choice, dtype_setting, number
from eqbench.flows.defaults import distance_kernel_placement
from eqbench.geometry import pair_vectors
from eqbench.systems.base import SYMMETRIES, ParticleSystem

__all__ = [
    "N_RBF",
    "PRESETS",
    "RBF_CHOICES",
    "SIGN_CHOICES",
    "DistanceRBF",
    "GradientFlowBase",
    "SETTINGS",
    "SimpleGradientFlow",
    "build",
    "gradient_flow_settings",
    "rbf_placement",
    "resolve_choices",
    "validate",
]

#: Number of distance kernels (paper C.2).
N_RBF = 50
#: Default scale of the output-layer weights at initialisation (small: start near identity).
DEFAULT_INIT_SCALE = 0.1
#: Cap on ``((d - μ)/γ)²`` in :meth:`SimpleGradientFlow.radial_jets`: exp(-1e4) is 0 in float64.
_U2_MAX = 1.0e4
#: Normalised RBFs: softmax entries are floored at exp(-_LOG_FLOOR) times the largest (as in the
#: kernel flow: changes K by < 1e-24 relative, avoids the CPU's slow exp path on underflow).
_LOG_FLOOR = 60.0

#: Values of the ``rbf`` setting: normalised (the authors' code, default) or not (eqbench's former).
RBF_CHOICES = ("normalised", "unnormalised")
#: Values of the ``sign`` setting: ``v = +∇Φ`` (paper §4, default) or ``v = -∇Φ`` (authors' code).
SIGN_CHOICES = ("+", "-")
#: Values of the ``preset`` setting: this module's defaults, or every setting as the authors coded it.
PRESETS = ("default", "paper-code")
#: ``rbf`` and ``sign`` under each preset (the simple gradient flow; the SchNet flow adds its own).
SIMPLE_PRESETS: dict[str, dict[str, str]] = {
    "default": {"rbf": "normalised", "sign": "+"},
    "paper-code": {"rbf": "normalised", "sign": "-"},
}


def rbf_placement(system: ParticleSystem, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed centres ``μ`` and bandwidths ``γ`` of the 50 distance kernels (paper C.1, C.2).

    The kernel flow's distance placement for ``system`` (:func:`eqbench.flows.defaults.distance_kernel_placement`):
    it follows the system's kind and lengths, so every system has one.
    """
    mu, gamma = distance_kernel_placement(system, N_RBF)
    dtype = dtype or torch.get_default_dtype()
    return mu.to(dtype), gamma.to(dtype)


def _floored_shift(s: torch.Tensor) -> torch.Tensor:
    """Logits minus their maximum over the last axis, floored at ``-_LOG_FLOOR``; the floor passes
    gradients through unchanged (identity) and the shift is a constant (the softmax ignores it),
    so any order of autograd derivative is that of the exact softmax, evaluated at floored K."""
    z = s - s.detach().amax(dim=-1, keepdim=True)
    return z + (z.clamp(min=-_LOG_FLOOR) - z).detach()


class DistanceRBF(nn.Module):
    """Gaussian expansion of a distance, ``g_k(d) = exp(-(d - μ_k)² / γ_k²)``, normalised over the
    kernels (``K_k = g_k / Σ_m g_m``, a softmax of the logits) or not; nothing trainable."""

    def __init__(self, mu: torch.Tensor, gamma: torch.Tensor, normalised: bool = True):
        super().__init__()
        self.register_buffer("mu", mu.clone())
        self.register_buffer("gamma", gamma.clone())
        self.normalised = bool(normalised)

    @property
    def n_kernels(self) -> int:
        return self.mu.shape[0]

    def extra_repr(self) -> str:
        return f"n_kernels={self.n_kernels}, normalised={self.normalised}"

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        """``d`` of shape ``[...]`` -> features ``[..., n_kernels]``."""
        logits = -((d.unsqueeze(-1) - self.mu) / self.gamma) ** 2
        if not self.normalised:
            return torch.exp(logits)
        return torch.softmax(_floored_shift(logits), dim=-1)


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
    """A CNF whose field is the gradient ``v = ±∇_x Φ(t, x)`` of an invariant scalar Φ.

    Subclasses implement :meth:`potential`. The Jacobian of v is (±) the Hessian of Φ, symmetric;
    the divergence is (±) the Laplacian of Φ, obtained by autograd (brute force or Hutchinson)
    unless a subclass has a closed form (:class:`SimpleGradientFlow`).

    ``rbf`` (:data:`RBF_CHOICES`) and ``sign`` (:data:`SIGN_CHOICES`) are the settings every
    gradient flow shares; :attr:`choices` records the resolved value of each of a flow's settings.
    """

    symmetries = SYMMETRIES
    has_closed_form_divergence = False
    velocity_needs_grad = True
    #: The model's settings with their choices under each preset (subclasses extend it).
    presets: dict[str, dict[str, str]] = SIMPLE_PRESETS

    def __init__(self, system: ParticleSystem, *, rbf: str = "normalised", sign: str = "+", **cnf_options: Any):
        if rbf not in RBF_CHOICES:
            raise ConfigError(f"rbf must be one of {', '.join(RBF_CHOICES)}; got {rbf!r}")
        if sign not in SIGN_CHOICES:
            raise ConfigError(f"sign must be one of {', '.join(SIGN_CHOICES)}; got {sign!r}")
        super().__init__(system, **cnf_options)
        mu, gamma = rbf_placement(system)
        self.rbf = DistanceRBF(mu, gamma, normalised=rbf == "normalised")
        self.sign = sign
        self.sign_factor = 1.0 if sign == "+" else -1.0
        self.choices: dict[str, str] = {"rbf": rbf, "sign": sign}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.choices.items())

    @abstractmethod
    def potential(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Invariant scalar ``Φ(t, x)`` per configuration, shape ``[B]``."""

    def velocity(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """``v = ±∇_x Φ(t, x)`` (setting ``sign``), shape of ``x``.

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
            if self.sign_factor != 1.0:
                v = self.sign_factor * v
        return v if outer_grad else v.detach()


class SimpleGradientFlow(GradientFlowBase):
    """Simple gradient flow (paper B.1): ``Φ(x) = Σ_{i<j} softplus(MLP(RBF(d_ij)))``, autonomous.

    See the module docstring for every convention. 5,377 parameters on every system. Its
    divergence has a closed form (a pair sum of radial Laplacians), the default for training
    and evaluation.
    """

    has_closed_form_divergence = True

    #: Layer sizes of the pair MLP (paper C.2).
    sizes = (N_RBF, 64, 32, 1)

    def __init__(self, system: ParticleSystem, *, init_scale: float = DEFAULT_INIT_SCALE, **options: Any):
        super().__init__(system, **options)
        self.pair_net = tanh_mlp(self.sizes)
        shrink_(self.pair_net[-1], init_scale)

    def pair_potential(self, d: torch.Tensor) -> torch.Tensor:
        """The learned pair term ``softplus(MLP(RBF(d)))`` for distances ``d`` of any shape."""
        return F.softplus(self.pair_net(self.rbf(d)).squeeze(-1))

    def _rbf_jet(self, d: torch.Tensor) -> torch.Tensor:
        """Rows ``[K; K'; K'']`` (``[3M, K]``) of the RBF features and their first two d-derivatives
        for distances ``d`` of shape ``[M, 1]``.

        With ``a_k = -2 (d - μ_k)/γ_k²`` and ``b_k = -2/γ_k²`` (first and second d-derivative of
        the logit ``-(d - μ_k)²/γ_k²``): unnormalised ``g' = a g``, ``g'' = (a² + b) g``, with the
        logit capped at -1e4 (g is 0 there in float64 already: ``0 · finite``, never ``0 · inf``);
        normalised (softmax) ``K' = K (a - ā)``, ``K'' = K [(a - ā)² + (b - b̄) - Σ K (a - ā)²]``,
        with a measured from the dominant kernel's a (exact differences of constants times d, so
        nothing cancels far beyond the basis) and the same floored softmax as :class:`DistanceRBF`.
        """
        mu, gamma = self.rbf.mu, self.rbf.gamma
        b = -2.0 / (gamma * gamma)  # a_k = b_k (d - μ_k)
        if not self.rbf.normalised:
            u = (d - mu) / gamma  # [M, K]
            u2 = (u * u).clamp(max=_U2_MAX)
            g = torch.exp(-u2)
            inv_gamma = 1.0 / gamma  # a = -2u/γ, a² + b = (4u² - 2)/γ² (capped u²: no 0 · inf)
            return torch.cat((g, (-2.0 * inv_gamma) * u * g, (inv_gamma * inv_gamma) * (4.0 * u2 - 2.0) * g))
        inv_gamma = 1.0 / gamma
        u = (d - mu) * inv_gamma
        logits = -(u * u)
        top, k = logits.max(dim=-1, keepdim=True)  # the dominant kernel per distance
        e = (logits - top).clamp_(min=-_LOG_FLOOR).exp_()
        kern = e / e.sum(-1, keepdim=True)
        a = u * (-2.0 * inv_gamma)
        a_rel = a - a.gather(-1, k)  # a_k - a_dominant: exactly 0 for the dominant kernel
        c = a_rel - (kern * a_rel).sum(-1, keepdim=True)  # a - ā
        kc = kern * c
        var = (kc * c).sum(-1, keepdim=True)
        b_c = b - ((kern @ b).unsqueeze(-1) + var)  # b - b̄ - Σ K (a - ā)²
        return torch.cat((kern, kc, torch.addcmul(kern * b_c, kc, c)))

    def radial_jets(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f'(d), f''(d))`` of the pair term ``f = softplus(MLP(RBF(d)))``, shapes of ``d``.

        Why not autograd: the closed-form divergence needs both radial derivatives of every
        pair; forward-mode propagation of the jet ``(h, h', h'')`` through the three layers costs
        three stacked rows per GEMM, while autograd would need a double backward. The chain
        rules used: the RBF rows come from :meth:`_rbf_jet` (module docstring); a linear layer maps the three rows alike (bias on the value
        only); ``y = tanh(a)``: ``y' = s a'``, ``y'' = s a'' - 2 y s a'²`` with ``s = 1 - y²``;
        ``f = softplus(a)``: ``f' = σ a'``, ``f'' = σ a'' + σ (1 - σ) a'²``.
        Differentiable (first order) in d and the parameters.
        """
        jet = self._rbf_jet(d.reshape(-1, 1))
        n = d.numel()
        for layer in self.pair_net:
            if isinstance(layer, nn.Linear):
                jet = F.linear(jet, layer.weight)
                jet = torch.cat((jet[:n] + layer.bias, jet[n:]))
            elif isinstance(layer, nn.Tanh):
                a0, a1, a2 = jet[:n], jet[n:2 * n], jet[2 * n:]
                y = torch.tanh(a0)
                slope = 1.0 - y * y
                jet = torch.cat((y, slope * a1, slope * (a2 - 2.0 * y * a1 * a1)))
            else:  # pragma: no cover - the architecture is fixed by tanh_mlp
                raise TypeError(f"radial_jets cannot differentiate a {type(layer).__name__} layer")
        a0, a1, a2 = jet[:n, 0], jet[n:2 * n, 0], jet[2 * n:, 0]
        sig = torch.sigmoid(a0)
        f1 = sig * a1
        f2 = sig * (a2 + (1.0 - sig) * a1 * a1)
        return f1.reshape(d.shape), f2.reshape(d.shape)

    def velocity_and_divergence(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v, div v)`` in closed form (module docstring): ``v_i = ±Σ_{j≠i} f'(d_ij) r_ij/d_ij``,
        ``div v = ±2 Σ_{i<j} [f''(d_ij) + (D - 1) f'(d_ij)/d_ij]`` (``sign``); ``t`` is ignored.

        No autograd in the forward pass; differentiable whenever gradients are enabled.
        A coincident pair (``d = 0``) contributes 0 to both, as autograd's norm does for v.
        """
        n_dims = x.shape[-1]
        r, i, j = pair_vectors(x)  # [B, P, D]
        d = torch.linalg.vector_norm(r, dim=-1)  # [B, P]
        f1, f2 = self.radial_jets(d)
        apart = d > 0
        inv_d = torch.where(apart, 1.0 / torch.where(apart, d, torch.ones_like(d)), torch.zeros_like(d))
        radial = f1 * inv_d  # f'(d)/d
        force = radial.unsqueeze(-1) * r  # ∂f(d_ij)/∂x_i; the opposite for x_j
        sign = self.sign_factor
        v = torch.zeros_like(x).index_add(-2, i, force, alpha=sign).index_add(-2, j, force, alpha=-sign)
        div = (2.0 * sign) * (torch.where(apart, f2, torch.zeros_like(f2)) + (n_dims - 1) * radial).sum(-1)
        return v, div

    def potential(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``Φ(x)``, shape ``[B]``; ``t`` is ignored (autonomous field)."""
        r, _, _ = pair_vectors(x)
        d = torch.linalg.vector_norm(r, dim=-1)
        return self.pair_potential(d).sum(-1)




def choice_settings(presets: Mapping[str, Mapping[str, str]], choices: Mapping[str, tuple[str, ...]]
                    ) -> dict[str, Setting]:
    """Schema entries of the text-vs-code choices: ``preset`` and one :func:`choice` per setting."""
    entries = {"preset": choice(*presets, valid=f"one of {', '.join(presets)} (paper-code: every setting "
                                "as the authors coded it; settings given explicitly override it)")}
    for key, values in choices.items():
        paper_code = presets["paper-code"][key]
        entries[key] = choice(*values, valid=f"one of {', '.join(values)} (default {presets['default'][key]}, "
                              f"paper-code {paper_code})")
    return entries


#: The text-vs-code settings of the simple gradient flow and their values.
SIMPLE_CHOICES = {"rbf": RBF_CHOICES, "sign": SIGN_CHOICES}


def gradient_flow_settings(*, closed_form: bool, presets: Mapping[str, Mapping[str, str]] = SIMPLE_PRESETS,
                           choices: Mapping[str, tuple[str, ...]] = SIMPLE_CHOICES) -> dict[str, Setting]:
    """The settings of a gradient flow (:mod:`eqbench.flows.settings`): the CNF ones (with or
    without ``closed-form`` among the divergence methods), ``init_scale``, ``dtype``, ``preset``
    and the text-vs-code ``choices`` (module docstring)."""
    return {**cnf_settings(closed_form=closed_form), "init_scale": number(above=0.0), "dtype": dtype_setting(),
            **choice_settings(presets, choices)}


#: The settings of ``gradient-flow`` (closed-form divergence available).
SETTINGS = gradient_flow_settings(closed_form=True)


def resolve_choices(config: Mapping[str, Any], presets: Mapping[str, Mapping[str, str]] = SIMPLE_PRESETS
                    ) -> dict[str, str]:
    """The value of every text-vs-code setting: the ``preset``'s (default ``"default"``), each
    overridden by the setting where ``config`` names it. ``config`` was validated already."""
    preset = presets[config.get("preset", "default")]
    return {key: config.get(key, value) for key, value in preset.items()}


def validate(system: ParticleSystem, config: Mapping[str, Any], model: str = "gradient-flow", *,
             closed_form: bool = True, schema: Mapping[str, Setting] | None = None) -> None:
    """Check a gradient flow's settings without building anything (planning calls this);
    ``closed_form`` says whether the model has a closed-form divergence (``schnet-flow`` has not),
    ``schema`` replaces the simple gradient flow's settings (the SchNet flow has more)."""
    if schema is None:
        schema = SETTINGS if closed_form else gradient_flow_settings(closed_form=False)
    check_settings(config, model, schema)


def build_gradient_flow(cls: type[GradientFlowBase], model: str, system: ParticleSystem,
                        config: Mapping[str, Any] | None, schema: Mapping[str, Setting] | None = None
                        ) -> GradientFlowBase:
    """Shared builder of the gradient flows: settings ``init_scale``, ``dtype``, ``preset``, the
    class's text-vs-code choices (``cls.presets``) and the CNF ones.

    Training defaults to the exact divergence where ``cls`` has a closed form, else to
    Hutchinson (paper §7.3: the exact autograd trace is too slow to train with).
    """
    closed_form = cls.has_closed_form_divergence
    validate(system, config or {}, model, closed_form=closed_form, schema=schema)
    config = dict(config or {})
    rbf_placement(system)  # a system with bad lengths: fail before anything else
    choices = resolve_choices(config, cls.presets)
    for key in ("preset", *choices):
        config.pop(key, None)
    options = pop_cnf_options(config, train_divergence="exact" if closed_form else "hutchinson")
    init_scale = float(config.pop("init_scale", DEFAULT_INIT_SCALE))
    dtype = parse_dtype(config.pop("dtype", "float32"), model)
    reject_unknown(config, model, ("init_scale", "dtype", "preset", *choices))
    return cls(system, init_scale=init_scale, **choices, **options).to(dtype)


@model_builder(capabilities=["cnf", "trainable", "equivariant", "exact-density"], validate=validate)
def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> SimpleGradientFlow:
    """Registry builder for ``gradient-flow``: any system (RBF placement from its kind and lengths).

    ``config`` keys: ``rbf`` (``"normalised"`` default, the authors' code; or ``"unnormalised"``),
    ``sign`` (``"+"`` default, v = +∇Φ as the paper's §4 writes; or ``"-"``, the authors' code),
    ``preset`` (``"default"``, or ``"paper-code"``: every such setting as the authors coded it,
    explicit settings override it), ``init_scale`` (factor on the initial output-layer weights,
    default 0.1), ``dtype`` (``"float32"`` default, or ``"float64"``) and the common CNF settings
    (``solver``, ``steps``, ``atol``, ``rtol``, ``train_divergence`` default ``"exact"`` = the
    closed form, or ``"closed-form"``, ``"brute-force"``, ``"hutchinson"``; ``eval_divergence``
    default ``"exact"``, or ``"closed-form"``, ``"brute-force"``).
    """
    return build_gradient_flow(SimpleGradientFlow, "gradient-flow", system, config)
