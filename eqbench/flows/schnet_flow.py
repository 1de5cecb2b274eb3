"""Gradient flow with a SchNet-like potential: ``v = ±∇Φ(x)`` (paper B.1, C.2).

The paper's second neural-network alternative to the kernel flow: Φ is a small continuous-filter
message-passing network in the style of SchNet (Schütt et al., 2017), whose gradient field is
equivariant because Φ is invariant (paper §4). The layer sizes are those of paper C.2; the
parameter count, 9,857 = 32 + 3 · 3,216 + 177, pins the architecture to:

- **Feature encoding**, dense [1, 16]: every particle starts from the same 16 features
  ``h_i⁰ = W c + b`` or ``tanh(W c + b)`` (setting ``encoding_activation``; identical
  particles), c a constant 1 or the integration time t (setting ``encoding_input``). 32
  parameters in every case.
- **3 interaction blocks**, each a continuous-filter convolution over ordered pairs with its own
  filter net F, dense [50, 32, 32, 16], tanh between layers, linear output, 3,216 parameters
  each: ``h_i ← h_i + Σ_{j≠i} F(RBF(d_ij)) ⊙ h_i`` (setting ``messages = "receiver"``: the filter
  sum scales the particle's own features) or ``h_i ← h_i + Σ_{j≠i} F(RBF(d_ij)) ⊙ h_j``
  (``"sender"``, SchNet's message). No atom-wise layers (the count leaves no room for them). The
  filter depends on the distance only, so the update is invariant either way.
- **Readout** dense [16, 8, 4, 1], tanh between layers, per particle, then a softplus, summed over
  particles: ``Φ = Σ_i softplus(readout(h_i))``. 177 parameters. The softplus has the same
  reason as in :mod:`eqbench.flows.gradient_flow`: with a linear output the readout bias is an
  additive constant of Φ that ∇Φ never sees (no gradient); through the softplus every parameter
  acts on v. The readout's output weights start small (``init_scale``): a near-identity flow.

**Text, code and defaults** (paper §4, B.1, C.2; the authors' code is en_flows
``deprecated/eqnode/dynamics.py`` ``SchNet``, built for DW-4 in ``deprecated/main_new.py`` with
``RbfEncoder`` of ``deprecated/eqnode/kernels.py`` and ``DenseNet`` of ``deprecated/eqnode/densenet.py``). Every
difference is a setting (``model_config`` key); the default follows the paper's text where it is
explicit and the authors' code where the text is silent; ``preset = "paper-code"`` takes the
code's choice of every setting (settings given explicitly override the preset). 9,857
parameters in every combination.

- ``rbf``: ``"normalised"`` (default; code) or ``"unnormalised"`` (eqbench's former choice),
  shared with the simple gradient flow; the text is silent (:mod:`eqbench.flows.gradient_flow`).
- ``encoding_input``: ``"constant"`` (default; code: the encoding is fed ones, so the field is
  autonomous) or ``"time"`` (eqbench's former choice: ``h⁰ = tanh(W t + b)``, a time-dependent
  field). C.2 gives the [1, 16] encoding but not what is fed in.
- ``messages``: ``"receiver"`` (default; code: ``features.unsqueeze(2) * W`` multiplies each
  filter by the receiving particle's features) or ``"sender"`` (eqbench's former choice, SchNet's
  message). The text is silent. With identical initial features the first block is the same under
  both; the later ones differ. Under ``"receiver"`` ``h_i³ = h⁰ ⊙ Π_l (1 + Σ_j F_l(d_ij))``.
- ``encoding_activation``: ``"linear"`` (default; code: its ``DenseNet([1, 16], Tanh)`` puts
  activations between layers only, so a single layer has none) or ``"tanh"`` (eqbench's former
  choice). C.2 names tanh for the filter networks and the simple flow's MLP but none for the
  [1, 16] encoding.
- ``sign``: ``"+"`` (default; text §4, v = ∇_x Φ) or ``"-"`` (code: ``-1 · grad``).
- Not settings: the code has a linear readout output where eqbench has the softplus above, and
  subtracts the velocity's mean (∇Φ already has zero mean). It builds this flow for DW-4 only,
  RBFs ``linspace(0, 8, 50)``, γ = 0.5 (fixed); eqbench places them by the system's kind.

The distance RBFs are those of the simple gradient flow (paper C.2: "the same distance embedding
for both"): 50 fixed Gaussians placed by the system's kind and lengths
(:mod:`eqbench.flows.defaults`), DW: μ equispaced in [0, 2 d0] = [0, 8], γ = 0.5; LJ: the
authors' LJ-13 placement; any other system equispaced over its typical pair distances. Nothing
else depends on the system, so the flow builds for any system with 9,857 parameters. Training
divergence Hutchinson, evaluation brute force (paper B.1). The field preserves the centre of
mass since Φ depends on pair distances only. The resolved settings are in the built flow's
``choices``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from eqbench.capabilities import model_builder
from eqbench.errors import ConfigError
from eqbench.flows.gradient_flow import (
    DEFAULT_INIT_SCALE,
    N_RBF,
    RBF_CHOICES,
    SIGN_CHOICES,
    GradientFlowBase,
    build_gradient_flow,
    gradient_flow_settings,
    shrink_,
    tanh_mlp,
)
from eqbench.flows.gradient_flow import validate as validate_gradient_flow
from eqbench.geometry import pair_vectors
from eqbench.systems.base import ParticleSystem

__all__ = ["ENCODING_ACTIVATIONS", "ENCODING_INPUTS", "MESSAGES", "N_PARAMETERS", "SCHNET_PRESETS", "SETTINGS", "SchNetGradientFlow", "build",
           "validate"]

#: Trainable scalars of the default architecture (paper C.2).
N_PARAMETERS = 9_857

#: Values of ``encoding_input``: what the [1, 16] feature encoding is fed (module docstring).
ENCODING_INPUTS = ("constant", "time")
#: Values of ``encoding_activation``: after the [1, 16] feature encoding (module docstring).
ENCODING_ACTIVATIONS = ("linear", "tanh")
#: Values of ``messages``: whose features a continuous filter multiplies (module docstring).
MESSAGES = ("receiver", "sender")
#: Every text-vs-code setting of the SchNet flow under each preset.
SCHNET_PRESETS: dict[str, dict[str, str]] = {
    "default": {"rbf": "normalised", "sign": "+", "encoding_input": "constant", "encoding_activation": "linear",
                "messages": "receiver"},
    "paper-code": {"rbf": "normalised", "sign": "-", "encoding_input": "constant", "encoding_activation": "linear",
                   "messages": "receiver"},
}
#: The settings of ``schnet-flow`` (no closed-form divergence).
SETTINGS = gradient_flow_settings(closed_form=False, presets=SCHNET_PRESETS, choices={
    "rbf": RBF_CHOICES, "sign": SIGN_CHOICES, "encoding_input": ENCODING_INPUTS,
    "encoding_activation": ENCODING_ACTIVATIONS, "messages": MESSAGES})


class SchNetGradientFlow(GradientFlowBase):
    """Gradient flow with a SchNet-like invariant potential Φ(x) or Φ(t, x) (paper B.1, C.2)."""

    presets = SCHNET_PRESETS

    n_features = 16
    n_interactions = 3
    filter_sizes = (N_RBF, 32, 32, 16)
    readout_sizes = (16, 8, 4, 1)

    def __init__(self, system: ParticleSystem, *, init_scale: float = DEFAULT_INIT_SCALE,
                 encoding_input: str = "constant", encoding_activation: str = "linear", messages: str = "receiver",
                 **options: Any):
        if encoding_input not in ENCODING_INPUTS:
            raise ConfigError(f"encoding_input must be one of {', '.join(ENCODING_INPUTS)}; got {encoding_input!r}")
        if encoding_activation not in ENCODING_ACTIVATIONS:
            raise ConfigError(f"encoding_activation must be one of {', '.join(ENCODING_ACTIVATIONS)}; "
                              f"got {encoding_activation!r}")
        if messages not in MESSAGES:
            raise ConfigError(f"messages must be one of {', '.join(MESSAGES)}; got {messages!r}")
        super().__init__(system, **options)
        self.encoding_input = encoding_input
        self.encoding_activation = encoding_activation
        self.messages = messages
        self.choices.update(encoding_input=encoding_input, encoding_activation=encoding_activation, messages=messages)
        self.embedding = nn.Linear(1, self.n_features)
        self.filters = nn.ModuleList(tanh_mlp(self.filter_sizes) for _ in range(self.n_interactions))
        self.readout = tanh_mlp(self.readout_sizes)
        shrink_(self.readout[-1], init_scale)
        n = sum(p.numel() for p in self.parameters())
        assert n == N_PARAMETERS, f"SchNet gradient flow has {n} parameters, expected {N_PARAMETERS}"

    def potential(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``Φ(t, x)``, shape ``[B]``, for ``x`` of shape ``[B, N, D]`` and a scalar time ``t``
        (ignored under ``encoding_input = "constant"``)."""
        batch, n_particles, _ = x.shape
        r, i, j = pair_vectors(x)
        features = self.rbf(torch.linalg.vector_norm(r, dim=-1))  # [B, P, K]
        if self.encoding_input == "time":
            c = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1)
        else:
            c = torch.ones(1, dtype=x.dtype, device=x.device)
        h = self.embedding(c)
        if self.encoding_activation == "tanh":
            h = torch.tanh(h)
        h = h.expand(batch, n_particles, self.n_features)
        sender = self.messages == "sender"
        for filter_net in self.filters:
            w = filter_net(features)  # [B, P, F], symmetric in (i, j): depends on d_ij only
            h_i, h_j = h.index_select(1, i), h.index_select(1, j)
            # Each unordered pair updates both particles, weighted by w_ij: sender messages bring
            # h_j to i and h_i to j; receiver messages scale each particle's own features.
            to_i, to_j = (w * h_j, w * h_i) if sender else (w * h_i, w * h_j)
            h = h.index_add(1, i, to_i).index_add(1, j, to_j)
        return F.softplus(self.readout(h).squeeze(-1)).sum(-1)


def validate(system: ParticleSystem, config: Mapping[str, Any]) -> None:
    """Check ``schnet-flow`` settings without building anything (planning calls this)."""
    validate_gradient_flow(system, config, "schnet-flow", closed_form=False, schema=SETTINGS)


@model_builder(capabilities=["cnf", "trainable", "equivariant", "exact-density"], validate=validate)
def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> SchNetGradientFlow:
    """Registry builder for ``schnet-flow``: any system (RBF placement from its kind and lengths).

    ``config`` keys: ``rbf`` (``"normalised"`` default, code; or ``"unnormalised"``),
    ``encoding_input`` (``"constant"`` default, code; or ``"time"``), ``encoding_activation``
    (``"linear"`` default, code; or ``"tanh"``), ``messages`` (``"receiver"``
    default, code; or ``"sender"``), ``sign`` (``"+"`` default, text; or ``"-"``, code),
    ``preset`` (``"default"`` or ``"paper-code"``; explicit settings override it; module docstring),
    ``init_scale`` (factor on the initial readout output weights, default 0.1),
    ``dtype`` (``"float32"`` default, or ``"float64"``) and the common CNF settings (``solver``,
    ``steps``, ``atol``, ``rtol``, ``train_divergence`` default ``"hutchinson"``,
    ``eval_divergence`` default ``"exact"``).
    """
    return build_gradient_flow(SchNetGradientFlow, "schnet-flow", system, config, schema=SETTINGS)
