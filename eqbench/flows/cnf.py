"""Continuous normalizing flows on torchdiffeq: DTO and OTD, with pluggable divergence (paper §4, §7.2).

A CNF transports ``z`` at t = 0 to ``x`` at t = 1 along ``dx/dt = v(t, x)`` and accumulates
``L(t) = ∫ div v dt``, so ``log|det ∂x/∂z| = L(1)`` (SPEC §1: ``d log q/dt = -div v``). The
inverse integrates from 1 back to 0.

Two ways to train (paper §4 "Numerical Implementations", §7.2):

- **DTO** (discretise-then-optimise, the training default): a fixed grid of 20 RK4 steps whose
  operations autograd differentiates directly; gradients are exact for the discretised map.
- **OTD** (optimise-then-discretise): adaptive dopri5 (atol 1e-10, rtol 1e-5) with the adjoint
  method; the number of function evaluations grows as the field gets stiffer (paper Fig. 4b).

Subclasses implement :meth:`CNF.velocity` and, where they have one, a closed-form divergence
(:meth:`CNF.velocity_and_divergence`, ``has_closed_form_divergence = True``).

**Exact unless asked.** :meth:`CNF.log_prob`, :meth:`CNF.sample`, :meth:`CNF.forward` and
:meth:`CNF.inverse` integrate the trace with ``eval_divergence`` (an exact method: closed form,
else one autograd pass per dimension) whatever ``self.training`` is, so a score never depends
on the module's mode. One Hutchinson probe (paper §7.1, §7.3) is used where a caller names it,
``flow.log_prob(x, divergence="hutchinson")``; ``train_divergence`` is the method the training
loop names through :meth:`~eqbench.flows.base.Flow.training_log_prob` (Hutchinson by default for
the models without closed form, §7.3; exact for the kernel flow).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from eqbench.errors import ConfigError
from eqbench.flows.base import Flow
from eqbench.flows.divergence import METHODS, brute_force_divergence, hutchinson_divergence, rademacher_like
from eqbench.flows.settings import Setting, choice, integer, number
from eqbench.systems.base import ParticleSystem

__all__ = ["SolverConfig", "CNF", "CNF_OPTIONS", "DTYPES", "EXACT_METHODS", "cnf_settings", "parse_dtype",
           "pop_cnf_options", "reject_unknown"]

SOLVER_MODES = ("dto", "otd")
#: Divergence methods that compute the trace exactly (up to round-off): the only valid
#: ``eval_divergence`` values, so ``log_prob``/``sample`` are exact unless a caller names another.
EXACT_METHODS = ("exact", "closed-form", "brute-force")


@dataclass(frozen=True)
class SolverConfig:
    """How the ODE is integrated (paper §7.2)."""

    mode: str = "dto"
    steps: int = 20
    atol: float = 1e-10
    rtol: float = 1e-5

    def __post_init__(self) -> None:
        if self.mode not in SOLVER_MODES:
            raise ConfigError(f"unknown solver mode {self.mode!r}; valid: {', '.join(SOLVER_MODES)}")
        if not integer(1).check(self.steps):
            raise ConfigError(f"solver steps must be a positive integer, got {self.steps!r}")
        for name in ("atol", "rtol"):
            if not number(above=0.0).check(getattr(self, name)):
                raise ConfigError(f"solver {name} must be a finite number > 0, got {getattr(self, name)!r}")


class _Dynamics(nn.Module):
    """The augmented right-hand side ``(x, L) -> (v, div v)`` for one solve."""

    def __init__(self, cnf: CNF, method: str, noise: torch.Tensor | None):
        super().__init__()
        self.cnf = cnf
        self.method = method
        self.noise = noise

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        x, _ = state
        self.cnf.nfe += 1
        v, div = self.cnf.divergence(t, x, self.method, noise=self.noise)
        return v, div


class _Velocity(nn.Module):
    """The plain right-hand side ``x -> v`` for a solve that needs no log-determinant."""

    def __init__(self, cnf: CNF):
        super().__init__()
        self.cnf = cnf

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.cnf.nfe += 1
        if self.cnf.has_closed_form_divergence:
            # The closed form needs no autograd and is what sample() integrates: same positions.
            return self.cnf.velocity_and_divergence(t, x)[0]
        if not self.cnf.velocity_needs_grad:
            return self.cnf.velocity(t, x)
        # A gradient flow differentiates its potential: autograd on, nothing kept under no_grad.
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            v = self.cnf.velocity(t, x)
        return v if keep_graph else v.detach()


class CNF(Flow):
    """Base class of the continuous flows; see the module docstring."""

    #: True when :meth:`velocity_and_divergence` computes the exact trace without autograd.
    has_closed_form_divergence: bool = False
    #: True when :meth:`velocity` itself differentiates (gradient flows ``v = ∇Φ``).
    velocity_needs_grad: bool = False

    def __init__(
        self,
        system: ParticleSystem,
        *,
        solver: SolverConfig | None = None,
        train_divergence: str = "exact",
        eval_divergence: str = "exact",
    ):
        super().__init__(system)
        self.solver = solver or SolverConfig()
        for method in (train_divergence, eval_divergence):
            self._check_method(method)
        if eval_divergence not in EXACT_METHODS:
            raise ConfigError(
                f"eval_divergence must be exact ({', '.join(EXACT_METHODS)}), got {eval_divergence!r}: log_prob and "
                "sample are exact; ask for an estimator by name, e.g. log_prob(x, divergence='hutchinson')")
        #: Divergence the training loop uses (:attr:`training_estimator`); never implied by ``self.training``.
        self.train_divergence = train_divergence
        #: Divergence of :meth:`log_prob` / :meth:`sample` / :meth:`forward` / :meth:`inverse` when none is named.
        self.eval_divergence = eval_divergence
        #: Function evaluations since the last reset (forward and, for OTD, adjoint passes).
        self.nfe = 0
        #: Function evaluations of the most recent solve's forward pass.
        self.last_solve_nfe = 0

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``v(t, x)`` for ``x`` of shape ``[B, N, D]``; must preserve the centre of mass."""

    def velocity_and_divergence(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form ``(v, div v)``; only models with ``has_closed_form_divergence``."""
        raise ConfigError(f"{type(self).__name__} has no closed-form divergence; use brute-force or hutchinson")

    # ------------------------------------------------------------------ divergence
    def _check_method(self, method: str) -> None:
        if method not in METHODS:
            raise ConfigError(f"unknown divergence method {method!r}; valid: {', '.join(METHODS)}")
        if method == "closed-form" and not self.has_closed_form_divergence:
            raise ConfigError(f"{type(self).__name__} has no closed-form divergence; valid: exact, brute-force, hutchinson")

    def divergence(
        self, t: torch.Tensor | float, x: torch.Tensor, method: str = "exact", *, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v(t, x), div v(t, x))`` by ``method``: exact (closed form if any, else brute force),
        closed-form, brute-force or hutchinson (one Rademacher probe; pass ``noise`` to fix it).

        Differentiable with respect to the parameters whenever gradients are enabled.
        """
        self._check_method(method)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if method in ("exact", "closed-form") and self.has_closed_form_divergence:
            # A closed form needs no autograd (even where ``velocity`` does): differentiable
            # whenever gradients are enabled, nothing recorded under ``no_grad``.
            return self.velocity_and_divergence(t, x)
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            v = self.velocity(t, x)
            if method == "hutchinson":
                div = hutchinson_divergence(v, x, noise if noise is not None else rademacher_like(x),
                                            create_graph=create_graph)
            else:
                div = brute_force_divergence(v, x, create_graph=create_graph)
        if not create_graph:
            v, div = v.detach(), div.detach()
        return v, div

    # ------------------------------------------------------------------ integration
    def integrate(self, x0: torch.Tensor, t0: float, t1: float, method: str | None = None):
        """Solve from ``t0`` to ``t1``; returns ``(x(t1), ∫_{t0}^{t1} div v dt)``.

        ``method`` defaults to ``eval_divergence`` (exact) in either module mode; Hutchinson draws
        one Rademacher probe per row from the global generator, fixed along the trajectory.
        """
        method = method or self.eval_divergence
        self._check_method(method)
        noise = rademacher_like(x0) if method == "hutchinson" else None
        dynamics = _Dynamics(self, method, noise)
        state = (x0, torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device))
        xs, logdets = self._solve(dynamics, state, x0, t0, t1, adjoint=True)
        return xs[-1], logdets[-1]

    def _solve(self, dynamics: nn.Module, state, like: torch.Tensor, t0: float, t1: float, *, adjoint: bool):
        """One solve on the configured solver: DTO's fixed RK4 grid, or OTD's dopri5 (through the
        adjoint when ``adjoint``); sets :attr:`last_solve_nfe`. ``like`` gives dtype and device."""
        nfe_before = self.nfe
        times = torch.tensor([t0, t1], dtype=like.dtype, device=like.device)
        if self.solver.mode == "dto":
            out = odeint(dynamics, state, times, method="rk4", options={"step_size": abs(t1 - t0) / self.solver.steps})
        elif adjoint:
            params = tuple(p for p in self.parameters() if p.requires_grad)
            out = odeint_adjoint(dynamics, state, times, method="dopri5", atol=self.solver.atol,
                                 rtol=self.solver.rtol, adjoint_params=params)
        else:
            out = odeint(dynamics, state, times, method="dopri5", atol=self.solver.atol, rtol=self.solver.rtol)
        #: Evaluations of this solve's forward pass (OTD's adjoint pass adds to ``nfe`` later).
        self.last_solve_nfe = self.nfe - nfe_before
        return out

    def forward(self, z: torch.Tensor, *, divergence: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log|det ∂x/∂z|)``; the trace by ``divergence`` (default ``eval_divergence``, exact)."""
        return self.integrate(z, 0.0, 1.0, divergence)

    def inverse(self, x: torch.Tensor, *, divergence: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log|det ∂z/∂x|)``; the trace by ``divergence`` (default ``eval_divergence``, exact)."""
        return self.integrate(x, 1.0, 0.0, divergence)

    def log_prob(self, x: torch.Tensor, *, divergence: str | None = None) -> torch.Tensor:
        """``log q(x)``: exact by default in either module mode; ``divergence="hutchinson"`` for the
        one-probe estimate (unbiased for ``log q``, paper §7.1), any method of :meth:`divergence`."""
        z, logdet = self.inverse(x, divergence=divergence)
        return self.prior.log_prob(z) + logdet

    def sample(self, n: int, *, generator: torch.Generator | None = None, divergence: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples and ``log q`` of each: exact by default in either mode (valid importance
        weights, SPEC §1); ``divergence`` names another method. ``generator`` fixes the prior draws
        (Hutchinson probes come from the global generator)."""
        ref = self._reference_tensor()
        z = self.prior.sample(n, generator=generator, dtype=ref.dtype, device=ref.device)
        x, logdet = self.forward(z, divergence=divergence)
        return x, self.prior.log_prob(z) - logdet

    def sample_positions(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`sample`'s configurations without ``log q``: the velocity alone is integrated.

        Why: without a closed-form divergence the exact trace costs one backward pass per
        coordinate per evaluation (39 on LJ-13), and callers that only look at configurations
        discard it. With the fixed-step DTO solver the positions do not depend on the trace, so
        they are :meth:`sample`'s to rounding (tested); the adaptive OTD solver controls its steps
        on the positions alone here, so they agree within its tolerance.

        Example:
            >>> import torch, eqbench
            >>> flow = eqbench.build_model("en-flow", "dw4", {"steps": 4})
            >>> x = flow.sample_positions(2, generator=torch.Generator().manual_seed(1))
            >>> x_ref, _ = flow.sample(2, generator=torch.Generator().manual_seed(1))
            >>> bool(torch.allclose(x, x_ref, atol=1e-6))
            True
        """
        ref = self._reference_tensor()
        z = self.prior.sample(n, generator=generator, dtype=ref.dtype, device=ref.device)
        return self._solve(_Velocity(self), z, z, 0.0, 1.0, adjoint=False)[-1]

    @property
    def training_estimator(self) -> dict[str, Any]:
        """``{"divergence": train_divergence}``: what :func:`eqbench.train.fit` integrates with."""
        return {"divergence": self.train_divergence}

    def training_sample(self, n: int, *, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample` with the training divergence (the reverse-KL term of training)."""
        return self.sample(n, generator=generator, divergence=self.train_divergence)

    def with_solver(self, **changes) -> CNF:
        """Switch DTO/OTD or the step count in place (``mode``, ``steps``, ``atol``, ``rtol``)."""
        self.solver = replace(self.solver, **changes)
        return self


#: Values of the ``dtype`` setting every model builder accepts.
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_dtype(value: object, model: str) -> torch.dtype:
    """``"float32"`` / ``"float64"`` (or those torch dtypes) for a builder's ``dtype`` setting."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"{model} setting dtype must be one of {', '.join(DTYPES)}; got {value!r}")
    return DTYPES[name]


#: Settings every CNF builder accepts besides its own hyperparameters.
CNF_OPTIONS = ("solver", "steps", "atol", "rtol", "train_divergence", "eval_divergence")


def cnf_settings(*, closed_form: bool) -> dict[str, Setting]:
    """The schema (:mod:`eqbench.flows.settings`) of the settings every CNF builder accepts:
    ``solver`` (dto, otd), ``steps`` (a positive integer), ``atol`` / ``rtol`` (finite, > 0),
    ``train_divergence`` (a divergence method the model has), ``eval_divergence`` (an exact one)."""
    methods = tuple(m for m in METHODS if closed_form or m != "closed-form")
    exact = tuple(m for m in EXACT_METHODS if closed_form or m != "closed-form")
    return {
        "solver": choice(*SOLVER_MODES),
        "steps": integer(1),
        "atol": number(above=0.0),
        "rtol": number(above=0.0),
        "train_divergence": choice(*methods),
        "eval_divergence": choice(*exact, valid=(
            f"exact ({', '.join(exact)}): log_prob and sample are exact; ask for an estimator by name, "
            "e.g. log_prob(x, divergence='hutchinson')")),
    }


def pop_cnf_options(config: dict, *, train_divergence: str = "exact") -> dict:
    """Remove the common CNF settings from ``config`` and return them as ``CNF.__init__`` kwargs.

    ``solver`` is ``"dto"`` (default; RK4 on ``steps`` = 20 points) or ``"otd"`` (dopri5 with
    ``atol``/``rtol``, adjoint). Models without a closed-form divergence pass
    ``train_divergence="hutchinson"`` as their default (paper §7.3). ``eval_divergence`` (what
    ``log_prob``/``sample`` use unless told otherwise) must be one of :data:`EXACT_METHODS`.
    Values are taken as they are (the builder checked them with :func:`cnf_settings`): a
    setting is never truncated or coerced.
    """
    solver = SolverConfig(
        mode=config.pop("solver", "dto"),
        steps=config.pop("steps", 20),
        atol=float(config.pop("atol", 1e-10)),
        rtol=float(config.pop("rtol", 1e-5)),
    )
    return {
        "solver": solver,
        "train_divergence": config.pop("train_divergence", train_divergence),
        "eval_divergence": config.pop("eval_divergence", "exact"),
    }


def reject_unknown(config: dict, model: str, valid: tuple[str, ...]) -> None:
    """Raise a ConfigError naming the unknown settings left in ``config`` and the valid ones."""
    if config:
        raise ConfigError(
            f"unknown {model} settings: {', '.join(sorted(config))}; valid: {', '.join(sorted({*valid, *CNF_OPTIONS}))}"
        )
