"""E(n)-equivariant normalizing flow (E-NF; Satorras, Hoogeboom, Fuchs, Posner & Welling, NeurIPS 2021).

A continuous normalizing flow whose velocity is an EGNN (:mod:`eqbench.flows.egnn`, the E-NF
paper §2-3, the authors' ``egnn/models.py`` ``EGNN_dynamics``): the EGNN moves the particles
through L layers, the velocity is the total displacement, and its particle mean is removed,

    u(t, x) = x^L(t, x) - x,     h⁰_i = t (time as the only node feature),
    v_i(t, x) = u_i - (1/N) Σ_j u_j,

so ``Σ_i v_i = 0`` and every trajectory started CoM-free stays CoM-free (the authors' linear
subspace, E-NF §3; ``remove_mean`` in ``EGNN_dynamics.forward``). The edge attribute of every
layer is the squared input distance ``|x_i - x_j|²`` (``EGNN_dynamics.forward``, models.py:37).

**Symmetries.** The EGNN's displacement is equivariant under rotations and reflections,
invariant under translations (it sees only differences ``x_i - x_j`` and their lengths) and
equivariant under permutations (shared MLPs, sum over all other particles), and so is its mean
removal; time enters only as the same scalar on every particle. So ``symmetries`` = all four,
and the density of the flow on U is invariant under the whole group (Köhler et al. 2020, §5).

**Divergence.** There is no closed form (``has_closed_form_divergence = False``): ``log_prob``,
``sample``, ``forward`` and ``inverse`` integrate the exact trace, one backward pass per
coordinate (the CNF base's ``"exact"`` = ``"brute-force"``), in either module mode. Training
uses one Hutchinson probe (``train_divergence = "hutchinson"``, the authors' choice:
``FFJORD(trace_method='hutch')`` with ``--hutch_noise bernoulli`` = Rademacher ±1, which is
eqbench's Hutchinson probe, :func:`eqbench.flows.divergence.rademacher_like`);
``train_divergence = "exact"`` trains on the exact trace.

Why the brute-force trace over all N·D coordinates is the log-density rate on U: with
``A = I - (1/N) 1 1ᵀ ⊗ I_D`` (the orthogonal projector onto U) the field is ``v = A u``, so its
Jacobian is ``A J`` with ``J = ∂u/∂x``. The divergence of the flow restricted to U is the trace
of ``Bᵀ (A J) B`` for an orthonormal basis B of U (``B Bᵀ = A``), i.e. ``tr(A J A)``; A is
symmetric and idempotent and the trace cyclic, so ``tr(A J A) = tr(A² J) = tr(A J)``, which is
what the brute-force loop (and the Hutchinson estimator in expectation) computes — the argument
of :mod:`eqbench.flows.node` for a projected field. Here it holds twice over: u is translation
invariant, so ``J (1 ⊗ I_D) = 0`` and ``J A = J`` already. The tests check the divergence
against the trace of the full autograd Jacobian and against ``tr(Bᵀ J_v B)``.

**Parameters.** Nothing depends on N or D (the EGNN acts on pairs, the node feature is one
scalar), so every system gets the same count. With hidden width H and L layers: embedding
``2H``; per layer edge MLP ``(2H+2)H + H + H² + H``, node MLP ``2H·H + H + H² + H``,
coordinate MLP ``H² + H + H``, attention gate ``H + 1``, i.e. ``7H² + 9H + 1``. The last layer's
node MLP (``3H² + 2H``) updates ``h`` after the last coordinate update and feeds nothing the
velocity uses (the authors' code computes it too and discards it, with ``embedding_out``, in
``EGNN_dynamics``): it would receive no gradient, so the shared EGNN does not build it
(:mod:`eqbench.flows.egnn`). Defaults H = 32, L = 3: ``64 + 3·7,457 - 3,136 = 19,299``
parameters on DW-4, LJ-13 and every other system; the authors' module counts
``22,435 + 33 (embedding_out) = 22,468`` including the 3,169 that never act on the velocity.

**Text, code and defaults.** Defaults are the authors' ``main_dw4_lj13.py`` argparse values,
the same for DW-4 and LJ-13 (the E-NF paper's text gives the architecture, not these numbers;
eqbench had no offline copy of the text to compare, so the code decides throughout):

- ``hidden`` 32 (``--nf 32``, main_dw4_lj13.py:32), ``layers`` 3 (``--n_layers 3``, :34),
  ``attention`` true (:40), ``tanh`` true (:28) with ``coords_range`` 15 split as 15/L per
  layer (``EGNN(coords_range=15)``, egnn/models.py:188, 195), ``condition_time`` true (:24;
  ``h = ones · t``, models.py:32-34), sum aggregation (``--x_aggregation sum``, :47),
  residual node updates (``recurrent=True``, dw4_experiment/models.py:89), SiLU.
- Solver. Code: dopri5 with the adjoint (``odeint_adjoint``), rtol = atol = 1e-4 in training
  and 1e-7 in evaluation (flows/ffjord.py:3, 39-56). eqbench: every CNF trains with DTO, 20
  fixed RK4 steps (``solver = "dto"``, ``steps``), the same for every family so that they
  compare on one grid; ``solver = "otd"`` is eqbench's adaptive-adjoint option, the authors'
  method (dopri5 + adjoint), with eqbench's tolerances atol 1e-10, rtol 1e-5 unless ``atol`` /
  ``rtol`` are set (``{"solver": "otd", "atol": 1e-4, "rtol": 1e-4}`` is the code's training
  setting).
- Trace. Code: Hutchinson with a Rademacher probe in training (``--trace hutch``,
  ``--hutch_noise bernoulli``, :26, :30); at test time exact only for DW-4 (``if args.data ==
  'dw4': flow.set_trace('exact')``, main_dw4_lj13.py:158-159), so the code's LJ-13 test NLLs
  are Hutchinson estimates. eqbench: Hutchinson in training (default), exact in every score.
- Time direction. Code: the ODE runs from data (t = 0) to latent (t = 1). eqbench: latent
  (t = 0) to data (t = 1), for every CNF. The node feature is eqbench's t; ``t ↦ 1 - t`` is
  absorbed exactly by the embedding's weight and bias, and the sign of the velocity is learned.
- Training (not model settings; the task TOMLs set them): AdamW with amsgrad, lr 5e-4, weight
  decay 1e-12, batch 100, 300 epochs (main_dw4_lj13.py:17-19, 44, 89-90).
- Initialisation: the EGNN's (each coordinate head's last layer at Xavier gain 0.001, the
  authors' gcl.py:173-174), so the flow starts near the identity: measured on 64 prior samples
  (float64, seed 0), displacements below 5e-3 (DW-4) / 2e-2 (LJ-13) and |log-determinant|
  below 0.02 / 0.2 (LJ-13 sums 12 pair terms per particle over 39 coordinates).

Config keys (``build``): ``hidden``, ``layers``, ``attention``, ``tanh``, ``coords_range``,
``condition_time``, ``dtype`` ("float32" default or "float64") and the common CNF settings of
:func:`eqbench.flows.cnf.pop_cnf_options` (training divergence ``hutchinson`` by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from eqbench.capabilities import model_builder
from eqbench.flows.cnf import CNF, SolverConfig, cnf_settings, parse_dtype, pop_cnf_options, reject_unknown
from eqbench.flows.egnn import EGNN
from eqbench.flows.settings import Setting, check_settings, dtype_setting, integer, number
from eqbench.systems.base import SYMMETRIES, ParticleSystem

__all__ = ["DEFAULTS", "EN_FLOW_OPTIONS", "SETTINGS", "ENFlow", "build", "validate"]

#: The authors' argparse defaults (main_dw4_lj13.py), the same for DW-4 and LJ-13.
DEFAULTS: dict[str, Any] = {"hidden": 32, "layers": 3, "attention": True, "tanh": True, "coords_range": 15.0,
                            "condition_time": True}
#: Settings of ``build`` besides the common CNF ones.
EN_FLOW_OPTIONS = (*DEFAULTS, "dtype")


class ENFlow(CNF):
    """E(n)-equivariant CNF with an EGNN velocity, mean removed; see the module docstring."""

    symmetries = SYMMETRIES
    has_closed_form_divergence = False
    velocity_needs_grad = False

    def __init__(
        self,
        system: ParticleSystem,
        *,
        hidden: int = 32,
        layers: int = 3,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float = 15.0,
        condition_time: bool = True,
        dtype: torch.dtype = torch.float32,
        solver: SolverConfig | None = None,
        train_divergence: str = "hutchinson",
        eval_divergence: str = "exact",
    ):
        super().__init__(system, solver=solver, train_divergence=train_divergence, eval_divergence=eval_divergence)
        self.hidden, self.layers = int(hidden), int(layers)
        self.attention, self.tanh, self.condition_time = bool(attention), bool(tanh), bool(condition_time)
        self.coords_range = float(coords_range)
        self.egnn = EGNN(1, hidden=self.hidden, layers=self.layers, n_vectors=1, n_scalars=0,
                         attention=self.attention, tanh=self.tanh, coords_range=self.coords_range, dtype=dtype)

    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``v = A (x^L - x)`` for ``x`` ``[B, N, D]`` and a scalar time ``t`` (node feature ``h = t``,
        or 1 without ``condition_time``); the particle mean is removed, so ``Σ_i v_i = 0``."""
        h = torch.ones(*x.shape[:2], 1, dtype=x.dtype, device=x.device)
        if self.condition_time:
            h = h * torch.as_tensor(t, dtype=x.dtype, device=x.device)
        vectors, _ = self.egnn(x, h)
        u = vectors[:, :, 0]
        return u - u.mean(dim=-2, keepdim=True)

    def extra_repr(self) -> str:
        return (f"system={self.system_name}, hidden={self.hidden}, layers={self.layers}, attention={self.attention}, "
                f"tanh={self.tanh}, coords_range={self.coords_range}, condition_time={self.condition_time}, "
                f"solver={self.solver}, train_divergence={self.train_divergence}")


def _boolean() -> Setting:
    """``true`` or ``false`` (TOML booleans; 0 and 1 are refused, never coerced)."""
    return Setting(lambda v: isinstance(v, bool), "true or false")


#: The settings of ``en-flow`` (:mod:`eqbench.flows.settings`): the CNF ones (no closed-form
#: divergence) and the EGNN's.
SETTINGS = {
    **cnf_settings(closed_form=False),
    "hidden": integer(1),
    "layers": integer(1),
    "attention": _boolean(),
    "tanh": _boolean(),
    "coords_range": number(above=0.0),
    "condition_time": _boolean(),
    "dtype": dtype_setting(),
}


def validate(system: ParticleSystem, config: Mapping[str, Any]) -> None:
    """Check ``en-flow`` settings without building anything (planning calls this)."""
    check_settings(config, "en-flow", SETTINGS)


@model_builder(capabilities=["cnf", "trainable", "exact-density", "equivariant"], validate=validate,
               description="E(n)-equivariant CNF, EGNN velocity with time input, mean removed; Hutchinson in "
                           "training, exact trace in scores (Satorras et al. 2021: 19,299 params)")
def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> ENFlow:
    """Registry builder for ``en-flow``: the authors' architecture on any system.

    ``config`` accepts ``hidden`` (32), ``layers`` (3), ``attention`` (true), ``tanh`` (true),
    ``coords_range`` (15.0, split evenly over the layers; unused without ``tanh``),
    ``condition_time`` (true), ``dtype`` (``"float32"`` or ``"float64"``) and the common CNF
    settings (:data:`eqbench.flows.cnf.CNF_OPTIONS`: DTO RK4 20 steps, training divergence
    ``"hutchinson"``, scores exact). Defaults are the authors' (module docstring) for every system.

    Example:
        >>> import eqbench
        >>> flow = build(eqbench.get_system("dw4"), {"steps": 4})
        >>> flow.n_parameters, flow.train_divergence, flow.eval_divergence
        (19299, 'hutchinson', 'exact')
        >>> x, log_q = flow.sample(3)
        >>> tuple(x.shape), bool(x.sum(dim=1).abs().max() < 1e-5)
        ((3, 4, 2), True)
    """
    validate(system, config or {})
    config = dict(config or {})
    options = pop_cnf_options(config, train_divergence="hutchinson")
    model = {key: config.pop(key, default) for key, default in DEFAULTS.items()}
    dtype = parse_dtype(config.pop("dtype", "float32"), "en-flow")
    reject_unknown(config, "en-flow", EN_FLOW_OPTIONS)
    return ENFlow(system, dtype=dtype, **model, **options)
