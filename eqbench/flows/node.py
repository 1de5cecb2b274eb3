"""Black-box neural ODE: the non-equivariant CNF baseline of paper §7.3 (C.3).

The velocity is a plain fully connected network on the flattened coordinates,

    v(x) = A · MLP(flat(x)),    MLP: R^{N·D} → R^{N·D}, tanh hidden layers,

where ``A = I - (1/N) 1 1ᵀ ⊗ I_D`` is the orthogonal projector onto the CoM-free subspace U
(subtract the particle mean of the network output). With ``Σ_i v_i = 0`` every trajectory
started in U stays in U, so samples are CoM-free and the CoM-free prior of
:mod:`eqbench.flows.prior` applies unchanged. The field has no symmetry (``symmetries = ()``):
a rotation or a permutation of the input changes the output in a way unrelated to the
transformation — that is the point of the baseline (paper §7.3, §7.4).

**No time input.** The field is autonomous, ``v(t, x) = v(x)``; the argument ``t`` of
:meth:`NeuralODE.velocity` is ignored. That is what reproduces the paper's parameter counts
exactly (C.3, §7.3): hidden [64, 64] on DW-4 (8 → 64 → 64 → 8) gives
``8·64+64 + 64·64+64 + 64·8+8 = 5,256``, hidden [64, 128, 64] on LJ-13 (39 → 64 → 128 → 64 → 39)
gives ``2,560 + 8,320 + 8,256 + 2,535 = 21,671``; a time input would add one column to the
first weight matrix (64 more parameters).

**Divergence.** There is no closed form: the model trains with the Hutchinson estimator and is
scored with the exact trace (paper §7.3; SPEC §4), which the CNF base computes by brute force,
one backward pass per coordinate, over all N·D coordinates. For the projected field that
full-space trace *is* the divergence on U: with J the Jacobian of the MLP, the Jacobian of v is
``A J`` and the divergence of the flow restricted to U is ``tr(A (A J) A) = tr(A J A)``; since
A is an orthogonal projector (``A² = A``) and the trace is cyclic, ``tr(A J A) = tr(A² J) =
tr(A J)``, which is what the brute-force loop and the Hutchinson estimator (full-space
Rademacher probe, expectation ``tr(A J)``) compute. The tests check it against the trace of the
full autograd Jacobian.

**Initialisation.** Hidden layers keep PyTorch's default ``nn.Linear`` initialisation; the last
layer's weights are scaled by ``init_scale`` (default 0.1) and its bias starts at zero. The flow
therefore starts close to the identity (measured on 256 prior samples: displacements below 0.06,
|log-determinant| below 0.03 on DW-4 and LJ-13), yet the last layer is not zero, so the gradient
reaches every parameter from the first step (a zero last layer would leave every hidden layer
without gradient) and the broken symmetries are visible from the start (a rotated or permuted
input moves the output by ~3e-2, not by ~3e-3 as with 0.01).

**Default widths by dimension** (:func:`default_hidden`). The paper gives [64, 64] for DW-4
(N·D = 8) and [64, 128, 64] for LJ-13 (N·D = 39), choices about the size of the network's input
and output, not about the potential. eqbench therefore chooses by N·D: ``[w, w]`` up to
N·D = 32, ``[w, 2w, w]`` above (32 is half the paper's width: below it a 64-wide layer is at
least twice as wide as the coordinates, the DW-4 regime), with ``w`` = 64 rounded up to a
multiple of 64 not below N·D, because the velocity ``W h + b`` of a last hidden layer of width
h lies in an h-dimensional affine subspace and must reach every direction of U
(:mod:`eqbench.flows.defaults`). DW-2, DW-4, the harmonic system (N·D = 12) and ``dw8`` (16):
[64, 64]; LJ-13 and ``lj19`` (57): [64, 128, 64]; ``lj55`` (165): [192, 384, 192].

Config keys (``build``): ``hidden`` (list of widths; default :func:`default_hidden`),
``init_scale`` (default 0.1), ``dtype`` ("float32" default or "float64"), plus the common CNF
settings of :func:`eqbench.flows.cnf.pop_cnf_options` (training divergence defaults to
``hutchinson`` here, evaluation to ``exact``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from eqbench.capabilities import model_builder
from eqbench.errors import ConfigError
from eqbench.flows.cnf import CNF, SolverConfig, cnf_settings, parse_dtype, pop_cnf_options, reject_unknown
from eqbench.flows.settings import check_settings, dtype_setting, number, widths
from eqbench.flows.defaults import is_large, paper_width
from eqbench.systems.base import ParticleSystem

__all__ = ["SETTINGS", "NeuralODE", "build", "default_hidden", "parse_dtype", "parse_hidden", "validate"]


def default_hidden(system: ParticleSystem) -> tuple[int, ...]:
    """Hidden widths by dimension N·D (module docstring; paper C.3): ``[w, w]`` for N·D <= 32 (the
    DW-4 architecture), ``[w, 2w, w]`` above (LJ-13's), ``w`` the paper's 64 grown to N·D."""
    width = paper_width(system.dim)
    return (width, 2 * width, width) if is_large(system) else (width, width)


class NeuralODE(CNF):
    """Autonomous CNF with ``v(x) = A · MLP(flat x)``; see the module docstring."""

    symmetries = ()
    has_closed_form_divergence = False
    velocity_needs_grad = False

    def __init__(
        self,
        system: ParticleSystem,
        hidden: Sequence[int] = (64, 64),
        *,
        init_scale: float = 0.1,
        dtype: torch.dtype = torch.float32,
        solver: SolverConfig | None = None,
        train_divergence: str = "hutchinson",
        eval_divergence: str = "exact",
    ):
        super().__init__(system, solver=solver, train_divergence=train_divergence,
                         eval_divergence=eval_divergence)
        self.hidden = tuple(int(h) for h in hidden)
        dim = system.n_particles * system.n_dims
        widths = (dim, *self.hidden, dim)
        layers: list[nn.Module] = []
        for k, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(n_in, n_out, dtype=dtype))
            if k < len(widths) - 2:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        last = self.net[-1]
        with torch.no_grad():
            last.weight.mul_(init_scale)
            last.bias.zero_()

    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``A · MLP(flat x)`` for ``x`` of shape ``[B, N, D]``; ``t`` is ignored (autonomous field)."""
        out = self.net(x.reshape(x.shape[0], -1)).reshape(x.shape)
        return out - out.mean(dim=-2, keepdim=True)


def parse_hidden(value: Any, model: str) -> tuple[int, ...]:
    """A list of positive layer widths from a config value (list/tuple of integers; 64.0 is
    refused, never truncated)."""
    setting = widths()
    if not setting.check(value):
        raise ConfigError(f"{model} setting hidden must be {setting.valid}; got {value!r}")
    return tuple(int(h) for h in value)


#: The settings of ``node`` (:mod:`eqbench.flows.settings`): the CNF ones (no closed-form
#: divergence), ``hidden``, ``init_scale`` and ``dtype``.
SETTINGS = {**cnf_settings(closed_form=False), "hidden": widths(), "init_scale": number(above=0.0),
            "dtype": dtype_setting()}


def validate(system: ParticleSystem, config: Mapping[str, Any]) -> None:
    """Check ``node`` settings without building anything (planning calls this)."""
    check_settings(config, "node", SETTINGS)


@model_builder(capabilities=["cnf", "trainable", "exact-density"], validate=validate)
def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> NeuralODE:
    """Registry builder for ``node`` (paper C.3): any system, hidden widths by its dimension
    (:func:`default_hidden`) unless ``hidden`` is set."""
    validate(system, config or {})
    config = dict(config or {})
    options = pop_cnf_options(config, train_divergence="hutchinson")
    hidden = parse_hidden(config.pop("hidden", list(default_hidden(system))), "node")
    init_scale = float(config.pop("init_scale", 0.1))
    dtype = parse_dtype(config.pop("dtype", "float32"), "node")
    reject_unknown(config, "node", ("hidden", "init_scale", "dtype"))
    return NeuralODE(system, hidden, init_scale=init_scale, dtype=dtype, **options)
