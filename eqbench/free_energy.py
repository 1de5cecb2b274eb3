"""An absolute yardstick: ``log Z`` of a system on U by annealed importance sampling, ``H(p)``, ``KL(p‖q)``.

Why: a test NLL alone says which flow is better, not how far any flow is from the target. With
``Z = ∫_U exp(-u(x)) dx`` the target's entropy is ``H(p) = ⟨u⟩_p + log Z`` and a flow's test NLL
(an estimate of the cross-entropy ``-⟨log q⟩_p``) becomes ``KL(p‖q) = NLL - H(p) ≥ 0``, zero only
for a perfect flow (SPEC §1 conventions). ``log Z`` must come from an estimator that involves no
flow under test: annealed importance sampling (AIS; Neal, "Annealed importance sampling",
Statistics and Computing 11, 125-139, 2001).

**The measure.** Everything lives on the centre-of-mass-free subspace U of dimension
``k = (N-1) D`` with the Lebesgue measure that the isometry ``y = Bᵀ vec(x)``
(:func:`eqbench.geometry.com_free_basis`) carries over from R^k: the measure on which the flows'
prior :class:`eqbench.flows.prior.CoMFreeNormal` is normalised, ``log ρ(z) = -|z|²/2 - ½ k log 2π``,
and hence the one every eqbench NLL is defined on. The AIS base is the isotropic normal of scale
``σ`` on U, ``π_0(x) ∝ exp(-|x|²/(2σ²))``, with ``log Z_0 = ½ k log(2π σ²)`` in closed form
(for ``σ = 1`` exactly :meth:`~eqbench.systems.base.ParticleSystem.prior_log_normaliser`).

**The estimator.** Intermediate targets on the geometric path
``f_β(x) = -(1-β) |x|²/(2σ²) - β u(x)``, ``β_t = (t/K)^p`` for ``t = 0 … K`` (``K``
temperatures, default ``p = 4``). Each chain starts from ``π_0``; at temperature ``t`` it adds
``f_{β_t}(x) - f_{β_{t-1}}(x) = (β_t - β_{t-1}) (|x|²/(2σ²) - u(x))`` to its log weight and then
makes ``n_steps`` Metropolis-adjusted Langevin (MALA) moves that leave ``π_{β_t}`` invariant,
proposals ``x' = x - (ε_t²/2) ∇V_β(x) + ε_t ξ`` with ``ξ`` the standard normal on U, the drift's
length capped at ``ε_t sqrt(k)`` (truncated MALA, Roberts & Tweedie 1996: stuck chains in the
quartic and d⁻¹² tails otherwise) and the centre of mass removed after every move (float64, all chains vectorised in torch). Then
``E[w] = Z/Z_0`` for every chain (Neal 2001, §2), and ``log Ẑ = log Z_0 + log mean(w)``.

- *Why the power schedule, dense near the base.* The variance of the log weights is roughly
  ``Σ_t (Δβ_t)² Var_{π_β}(u - |x|²/2σ²)``; near ``β = 0`` the chains sit where the base puts
  them, where ``u`` is huge and broad (overlapping Lennard-Jones particles: ``u ~ d⁻¹²``), so the
  first steps must be tiny: ``β_1 = K^-p`` (2e-17 for LJ-13's K = 15,000). Near ``β = 1`` the
  increments are large but ``u`` is narrow there. ``p = 4`` was chosen by measurement: on LJ-13
  (500 chains, 4,000 temperatures) it gave a standard error of 0.18 against 0.37 for ``p = 6``;
  on DW-4 ``p = 2`` and ``p = 4`` did equally well. The schedule is fixed before any chain runs,
  so the estimator stays unbiased.
- *Why a base wider than the prior for the double wells.* AIS needs a base that covers the
  target. Its scale is matched to the target's second moment, ``σ² = ⟨|x|²⟩_p / k``
  (the isotropic normal on U closest to p in KL(p‖π_0)), measured once on the reference data
  (DW-2: 5.5, DW-4: 4.6, LJ-13: 0.50; a fixed setting per system in
  :mod:`eqbench.data.log_z`); the scale changes only the variance, never the expectation.
- *Why MALA with per-temperature step sizes from a pilot.* The step size that keeps a target
  acceptance (0.57, the optimal MALA rate of Roberts & Rosenthal 1998) changes by orders of
  magnitude along the path (the base's ``σ`` at ``β = 0``, a fraction of the LJ core at ``β = 1``).
  A pilot of few independent chains walks the same schedule and adapts ``log ε_t`` by a
  Robbins-Monro step on its acceptance at every temperature; the production chains then use
  those ``ε_t`` unchanged, so each production transition is a fixed π_β-invariant kernel and
  ``E[w] = Z/Z_0`` holds exactly.

**Sequential Monte Carlo, for many particles.** In plain AIS every chain carries its weight to
the end. On LJ-55 (162 dimensions) the log weights of a Gaussian start spread by ~200 nats
within the first 150 of 3,000 temperatures (β < 1e-5, where overlapping particles still hold
energies of ~1e6 kT) and by ~470 nats by β ≈ 0.2, after which the spread stays: the ESS is 1-2
chains of 64, and the chains end ~110 kT above ⟨u⟩_p, still condensing. With
``resample_ess`` and ``n_groups`` the chains form independent populations, and a population
whose ESS fraction drops below ``resample_ess`` is resampled (systematic resampling; the
Del Moral, Doucet & Jasra 2006 SMC sampler with MALA moves): each population's log Z estimate
is the sum of its banked ``log mean w`` plus the final one, an unbiased estimate of Z/Z_0 per
population, and the populations are the i.i.d. units of the error bars (bootstrap and spread
over populations). The reverse run resamples the same way, so the bidirectional sandwich
still holds.

**Errors.** The chains are independent, so the standard error of ``log Ẑ`` is the bootstrap
over chains of ``log mean w``; the Kish ESS of the final weights (fraction of chains) says how
far that can be trusted (a handful of dominating chains makes any error bar optimistic), and
the spread of ``log mean w`` over 10 disjoint groups of chains is reported beside it. ``log Ẑ``
is a stochastic *lower* bound (Jensen: ``E log Ẑ ≤ log Z``); running the same chain backwards
from exact samples of p (:func:`reverse_ais_log_z`) gives a stochastic *upper* bound (Grosse,
Ghahramani & Adams 2015, "bidirectional Monte Carlo"), so the gap between the two bounds the
bias of both.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from scipy.special import logsumexp

from eqbench.geometry import remove_com

__all__ = [
    "AISResult",
    "AISSettings",
    "EnergyModel",
    "EntropyEstimate",
    "KLEstimate",
    "ais_log_z",
    "annealing_schedule",
    "base_log_z",
    "entropy",
    "kl_from_nll",
    "log_mean_exp_stderr",
    "pair_log_z_quadrature",
    "reverse_ais_log_z",
]

#: Optimal acceptance rate of MALA in high dimension (Roberts & Rosenthal 1998).
MALA_TARGET_ACCEPTANCE = 0.57


class EnergyModel(Protocol):
    """What AIS needs of a target: particle counts, ``u(x)`` and ``∇u(x)`` (a ParticleSystem has them)."""

    n_particles: int
    n_dims: int

    def energy(self, x: torch.Tensor) -> torch.Tensor: ...

    def gradient(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class AISSettings:
    """Settings of one AIS estimate (module docstring says why each default).

    ``n_temperatures`` K intermediate distributions ``β_t = (t/K)^schedule_power``;
    ``n_steps`` MALA moves per temperature; ``base_scale`` σ of the normal base on U; a pilot of
    ``n_pilot_chains`` chains (its own seed, ``seed + 1``) adapts the step size at every
    temperature over ``pilot_rounds`` moves towards ``target_acceptance``; ``n_bootstrap``
    resamples of the chains give the standard error. ``resample_ess`` and ``n_groups`` (both or
    neither) switch to sequential Monte Carlo: ``n_groups`` independent populations of
    ``n_chains / n_groups`` chains, each resampled when its ESS fraction falls below
    ``resample_ess``; the populations give the standard error.
    """

    n_chains: int = 1000
    n_temperatures: int = 1000
    schedule_power: float = 4.0
    base_scale: float = 1.0
    n_steps: int = 1
    target_acceptance: float = MALA_TARGET_ACCEPTANCE
    n_pilot_chains: int = 128
    pilot_rounds: int = 3
    n_bootstrap: int = 1000
    seed: int = 0
    resample_ess: float | None = None
    n_groups: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_chains", "n_temperatures", "n_steps", "n_pilot_chains", "pilot_rounds", "n_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AISSettings.{name} must be a positive integer, got {value!r}")
        if self.n_chains < 2:
            raise ValueError("AISSettings.n_chains must be at least 2 (the error comes from the spread over chains)")
        if not (self.base_scale > 0 and math.isfinite(self.base_scale)):
            raise ValueError(f"AISSettings.base_scale must be positive, got {self.base_scale!r}")
        if not self.schedule_power >= 1:
            raise ValueError(f"AISSettings.schedule_power must be >= 1, got {self.schedule_power!r}")
        if not 0 < self.target_acceptance < 1:
            raise ValueError(f"AISSettings.target_acceptance must lie in (0, 1), got {self.target_acceptance!r}")
        if (self.resample_ess is None) != (self.n_groups is None):
            raise ValueError("AISSettings.resample_ess and n_groups go together (sequential Monte Carlo): "
                             "set both or neither")
        if self.resample_ess is not None:
            if not 0 < self.resample_ess <= 1:
                raise ValueError(f"AISSettings.resample_ess must lie in (0, 1], got {self.resample_ess!r}")
            groups = self.n_groups
            if isinstance(groups, bool) or not isinstance(groups, int) or groups < 2 or self.n_chains % groups:
                raise ValueError(f"AISSettings.n_groups must be an integer >= 2 that divides n_chains = "
                                 f"{self.n_chains}, got {groups!r}")

    @property
    def smc(self) -> bool:
        """Whether chains are resampled (sequential Monte Carlo) rather than plain AIS."""
        return self.resample_ess is not None

    def key_fields(self) -> dict[str, Any]:
        """The settings as a dict, the SMC fields left out while they are off (so that a plain AIS
        estimate cached before they existed keeps its key)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not (k in ("resample_ess", "n_groups") and v is None)}


@dataclass
class AISResult:
    """One AIS estimate of ``log Z`` on U and its diagnostics.

    ``log_z_stderr``: bootstrap over chains of ``log mean w``; ``group_stderr``: spread of the
    estimate over 10 disjoint groups of chains divided by sqrt(10) (a cross-check of the
    bootstrap); ``ess_fraction``: Kish ESS of the final weights over ``n_chains``;
    ``acceptance`` and ``step_sizes``: per temperature (production chains; steps from the pilot);
    ``direction``: ``"forward"`` (base → target, a stochastic lower bound) or ``"reverse"``
    (target → base from exact samples, a stochastic upper bound).
    """

    log_z: float
    log_z_stderr: float
    group_stderr: float
    log_z_base: float
    ess_fraction: float
    n_chains: int
    n_temperatures: int
    acceptance: list[float]
    step_sizes: list[float]
    wall_s: float
    seed: int
    direction: str
    settings: AISSettings
    log_weights: np.ndarray = field(repr=False)
    resamplings: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-ready diagnostics (the weights left out; acceptance and steps rounded)."""
        acc = np.asarray(self.acceptance)
        return {
            "log_z": self.log_z, "log_z_stderr": self.log_z_stderr, "group_stderr": self.group_stderr,
            "log_z_base": self.log_z_base, "ess_fraction": self.ess_fraction, "n_chains": self.n_chains,
            "n_temperatures": self.n_temperatures, "direction": self.direction, "wall_s": self.wall_s,
            "seed": self.seed, "settings": dataclasses.asdict(self.settings),
            "acceptance_min": float(acc.min()), "acceptance_mean": float(acc.mean()),
            "acceptance_max": float(acc.max()),
            "acceptance": [round(float(a), 4) for a in self.acceptance],
            "step_sizes": [float(f"{s:.5g}") for s in self.step_sizes],
            "log_weight_std": float(np.std(self.log_weights)),
            **({"estimator": f"sequential Monte Carlo, {self.settings.n_groups} independent populations of "
                             f"{self.n_chains // self.settings.n_groups} chains, resampled below ESS "
                             f"{self.settings.resample_ess}", "resamplings": self.resamplings,
                "population_log_z": [float(v) for v in self.log_weights]}
               if self.settings.smc else {"estimator": "annealed importance sampling"}),
        }


def annealing_schedule(n_temperatures: int, power: float = 4.0) -> torch.Tensor:
    """``β_t = (t/K)^power``, ``t = 0 … K`` (float64, K + 1 values from 0 to 1), dense near the base.

    Why a power law: the first increments must be tiny where the base puts chains into the
    target's hard core, and the spacing must stay finite near the target (module docstring).

    Example:
        >>> annealing_schedule(4, power=2).tolist()
        [0.0, 0.0625, 0.25, 0.5625, 1.0]
    """
    if n_temperatures < 1:
        raise ValueError(f"n_temperatures must be >= 1, got {n_temperatures}")
    t = torch.arange(n_temperatures + 1, dtype=torch.float64) / n_temperatures
    return t.pow(power)


def base_log_z(n_particles: int, n_dims: int, scale: float = 1.0) -> float:
    """``log ∫_U exp(-|x|²/(2σ²)) dx = ½ (N-1) D log(2π σ²)``: the AIS base's closed form on U.

    For ``σ = 1`` this is the Gaussian constant of every eqbench NLL (SPEC §1).

    Example:
        >>> round(base_log_z(4, 2), 3)  # DW-4's NLL constant
        5.514
    """
    return 0.5 * (n_particles - 1) * n_dims * math.log(2.0 * math.pi * scale * scale)


def log_mean_exp_stderr(log_w: np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> tuple[float, float]:
    """``(log mean exp(log_w), its bootstrap standard error over the rows)``.

    Why the bootstrap: ``log mean w`` is a non-linear function of heavy-tailed weights; resampling
    the independent chains gives its spread without a delta-method approximation.

    Example:
        >>> value, err = log_mean_exp_stderr(np.zeros(10))
        >>> value, err
        (0.0, 0.0)
    """
    log_w = np.asarray(log_w, dtype=np.float64)
    n = log_w.size
    value = float(logsumexp(log_w) - math.log(n))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    boot = logsumexp(log_w[idx], axis=1) - math.log(n)
    return value, float(np.std(boot, ddof=1))


def _ess_fraction(log_w: np.ndarray) -> float:
    w = np.exp(log_w - log_w.max())
    return float(w.sum() ** 2 / (w * w).sum() / w.size)


def _group_stderr(log_w: np.ndarray, groups: int = 10) -> float:
    if log_w.size < 2 * groups:
        return float("nan")
    parts = np.array_split(log_w, groups)
    values = np.array([logsumexp(p) - math.log(p.size) for p in parts])
    return float(values.std(ddof=1) / math.sqrt(groups))


class _Annealer:
    """The AIS inner loop: geometric path from the normal base of scale σ to exp(-u), MALA on U."""

    def __init__(self, target: EnergyModel, scale: float, generator: torch.Generator):
        self.target = target
        self.inv_var = 1.0 / (scale * scale)
        self.generator = generator
        self.n_dof = (target.n_particles - 1) * target.n_dims

    def _state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return 0.5 * self.inv_var * x.pow(2).sum(dim=(-2, -1)), self.target.energy(x), self.target.gradient(x)

    def _drift(self, x: torch.Tensor, g: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
        """Langevin drift ``-(ε²/2) ∇V_β(x)``, its length capped at ``ε sqrt(k)`` (the noise's length).

        Why the cap (truncated MALA, Roberts & Tweedie 1996): with a quartic or d⁻¹² energy, a
        chain far out in the tails gets a drift that overshoots by orders of magnitude, every
        proposal is rejected and the chain stays stuck while its weight dies (measured on DW-2
        from the wide base: 1 chain in 200 ended with log w below -500). The capped drift is
        used on both sides of the Metropolis-Hastings ratio, so the move stays π_β-invariant.
        """
        grad = (1.0 - beta) * self.inv_var * x + beta * g
        drift = -0.5 * eps * eps * grad
        length = torch.linalg.vector_norm(drift.flatten(-2), dim=-1)
        cap = eps * math.sqrt(self.n_dof)
        factor = torch.clamp(cap / length.clamp_min(1e-300), max=1.0)
        return drift * factor.view(-1, 1, 1)

    def mala(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], beta: float,
             eps: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """One MALA move per chain at ``β`` with step ``eps``; returns ``(x, state, accepted)``."""
        e0, u, g = state
        v = (1.0 - beta) * e0 + beta * u
        drift = self._drift(x, g, beta, eps)
        noise = remove_com(torch.randn(x.shape, generator=self.generator, dtype=x.dtype))
        y = remove_com(x + drift + eps * noise)
        e0_y, u_y, g_y = self._state(y)
        v_y = (1.0 - beta) * e0_y + beta * u_y
        drift_y = self._drift(y, g_y, beta, eps)
        forward = (y - x - drift).pow(2).sum(dim=(-2, -1))
        backward = (x - y - drift_y).pow(2).sum(dim=(-2, -1))
        log_alpha = v - v_y + (forward - backward) / (2.0 * eps * eps)
        log_uniform = torch.rand(log_alpha.shape, generator=self.generator, dtype=x.dtype).log()
        accept = (log_uniform < log_alpha) & torch.isfinite(log_alpha)
        mask = accept.view(-1, 1, 1)
        return (torch.where(mask, y, x),
                (torch.where(accept, e0_y, e0), torch.where(accept, u_y, u), torch.where(mask, g_y, g)),
                accept)

    def run(self, x: torch.Tensor, betas: torch.Tensor, steps: list[float], n_steps: int,
            adapt: tuple[float, int] | None = None,
            smc: tuple[float, int] | None = None) -> tuple[torch.Tensor, list[float], list[float]]:
        """Anneal chains ``x`` along ``betas`` (either direction); return ``(log w, acceptance, steps)``.

        ``betas[0]`` is the distribution ``x`` is drawn from. With ``adapt = (target, rounds)``
        (the pilot) the step of temperature t starts from the one of t-1 and is adapted over
        ``rounds`` moves by ``log ε += 1.5 (acceptance - target)``; else ``steps[t-1]`` is used as is.
        With ``smc = (ess, groups)`` the chains form ``groups`` independent populations, each
        resampled whenever its ESS fraction falls below ``ess`` (:meth:`_resample`), and the
        returned ``log w`` holds one value per population, its estimate of log(Z_end / Z_start).
        """
        state = self._state(x)
        log_w = torch.zeros(x.shape[0], dtype=x.dtype)
        group_log_z = torch.zeros(smc[1] if smc else 0, dtype=x.dtype)
        self.resamplings = 0
        acceptance: list[float] = []
        used: list[float] = []
        eps = steps[0]
        for t in range(1, len(betas)):
            beta, previous = float(betas[t]), float(betas[t - 1])
            log_w += (beta - previous) * (state[0] - state[1])
            if smc is not None:
                index = self._resample(log_w, group_log_z, *smc)
                if index is not None:
                    x, state = x[index], tuple(v[index] for v in state)
            accepted = 0.0
            if adapt is not None:
                target_rate, rounds = adapt
                for _ in range(rounds * (10 if t == 1 else 1)):
                    x, state, acc = self.mala(x, state, beta, eps)
                    rate = float(acc.double().mean())
                    eps = float(eps * math.exp(1.5 * (rate - target_rate)))
                    accepted = rate
            else:
                eps = steps[t - 1]
                total = 0.0
                for _ in range(n_steps):
                    x, state, acc = self.mala(x, state, beta, eps)
                    total += float(acc.double().mean())
                accepted = total / n_steps
            acceptance.append(accepted)
            used.append(eps)
        if smc is not None:
            per_group = log_w.view(smc[1], -1)
            return group_log_z + torch.logsumexp(per_group, dim=1) - math.log(per_group.shape[1]), acceptance, used
        return log_w, acceptance, used

    def _resample(self, log_w: torch.Tensor, group_log_z: torch.Tensor, threshold: float,
                  groups: int) -> torch.Tensor | None:
        """Systematic resampling of each population whose ESS fraction is below ``threshold``.

        Why (sequential Monte Carlo samplers, Del Moral, Doucet & Jasra 2006): in plain AIS the
        log weights of a high-dimensional system spread by hundreds of nats (LJ-55: a few chains
        hold all the weight after the first hundred temperatures), and the estimate rests on one
        chain. Resampling hands the low-weight chains' places to copies of the heavy ones; the
        population's ``log mean w`` at that moment is banked in ``group_log_z`` and its weights
        restart at zero. The product of the banked means is an unbiased estimate of Z_end/Z_start
        for each population (Del Moral 2004), so the populations are i.i.d. estimates and their
        spread is the error. Updates ``log_w`` and ``group_log_z`` in place; returns the chain
        index (``None`` when no population is resampled).
        """
        per_group = log_w.view(groups, -1)
        size = per_group.shape[1]
        normalised = torch.softmax(per_group, dim=1)
        ess = 1.0 / normalised.pow(2).sum(dim=1) / size
        low = ess < threshold
        if not bool(low.any()):
            return None
        index = torch.arange(log_w.shape[0]).view(groups, size).clone()
        offsets = torch.rand(groups, generator=self.generator, dtype=log_w.dtype)
        positions = (offsets.unsqueeze(1) + torch.arange(size, dtype=log_w.dtype)) / size
        cumulative = normalised.cumsum(dim=1)
        cumulative[:, -1] = 1.0
        picked = torch.searchsorted(cumulative, positions).clamp(max=size - 1)
        picked += torch.arange(groups).unsqueeze(1) * size
        index[low] = picked[low]
        group_log_z[low] += torch.logsumexp(per_group[low], dim=1) - math.log(size)
        per_group[low] = 0.0
        self.resamplings += int(low.sum())
        return index.view(-1)


def _pilot_steps(target: EnergyModel, settings: AISSettings, betas: torch.Tensor) -> list[float]:
    """Per-temperature MALA steps adapted by a pilot run of independent chains (seed + 1)."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    annealer = _Annealer(target, settings.base_scale, generator)
    x = settings.base_scale * remove_com(torch.randn(settings.n_pilot_chains, target.n_particles, target.n_dims,
                                                     generator=generator, dtype=torch.float64))
    start = [0.5 * settings.base_scale]
    _, _, steps = annealer.run(x, betas, start, 1, adapt=(settings.target_acceptance, settings.pilot_rounds))
    return _smooth_log(steps, max(1, settings.n_temperatures // 50))


def _smooth_log(steps: list[float], half_width: int) -> list[float]:
    """Moving average of ``log ε`` over ``2 half_width + 1`` neighbouring temperatures.

    Why: the pilot measures each temperature's acceptance on few chains over few moves, so its
    steps jitter by ~20 % from one temperature to the next (measured on the harmonic trap:
    production acceptance 0.13-0.89 unsmoothed), while the best step changes smoothly along a
    dense schedule. Averaging over neighbours keeps the trend and removes the jitter.
    """
    logs = np.log(np.asarray(steps, dtype=np.float64))
    padded = np.pad(logs, half_width, mode="edge")
    kernel = np.ones(2 * half_width + 1) / (2 * half_width + 1)
    return [float(v) for v in np.exp(np.convolve(padded, kernel, mode="valid"))]


def _result(log_w: torch.Tensor, sign: float, log_z0: float, acceptance: list[float], steps: list[float],
            wall_s: float, settings: AISSettings, direction: str, n_chains: int, resamplings: int) -> AISResult:
    # Forward: E[w] = Z / Z_0; reverse: E[w] = Z_0 / Z. Either way the weights (per chain, or per
    # SMC population its estimate of that ratio) are averaged as they are, and
    # log Z = log Z_0 + sign * log mean w. For SMC the i.i.d. units are the populations: the
    # bootstrap and the group spread run over them.
    lw = log_w.numpy()
    value, err = log_mean_exp_stderr(lw, settings.n_bootstrap, settings.seed)
    spread = float(lw.std(ddof=1) / math.sqrt(lw.size)) if settings.smc else _group_stderr(lw)
    return AISResult(
        log_z=log_z0 + sign * value, log_z_stderr=err, group_stderr=spread, log_z_base=log_z0,
        ess_fraction=_ess_fraction(lw), n_chains=n_chains, n_temperatures=settings.n_temperatures,
        acceptance=acceptance, step_sizes=steps, wall_s=wall_s, seed=settings.seed, direction=direction,
        settings=settings, log_weights=lw, resamplings=resamplings,
    )


def ais_log_z(target: EnergyModel, settings: AISSettings = AISSettings(),
              steps: list[float] | None = None) -> AISResult:
    """``log ∫_U exp(-u(x)) dx`` by forward annealed importance sampling (Neal 2001), with its error.

    Why: the absolute normaliser of the target on U (the measure of every eqbench NLL), from
    nothing but the energy, so that ``KL(p‖q) = NLL - H(p)`` needs no flow to be trusted.
    ``target`` is a :class:`~eqbench.systems.base.ParticleSystem` (or anything with
    ``n_particles``, ``n_dims``, ``energy`` and ``gradient``). ``steps`` (one MALA step per
    temperature) skips the pilot, e.g. to reuse the steps of an earlier estimate. The estimate
    is a stochastic lower bound of ``log Z``; see the module docstring for the design.

    Example:
        >>> from eqbench.components import get_system
        >>> trap = get_system("harmonic")   # u = |x|²/2 on U: log Z = 4.5 log 2π = 8.27
        >>> r = ais_log_z(trap, AISSettings(n_chains=200, n_temperatures=50, base_scale=1.5, n_pilot_chains=32))
        >>> abs(r.log_z - 4.5 * math.log(2 * math.pi)) < 0.2
        True
    """
    start = time.perf_counter()
    betas = annealing_schedule(settings.n_temperatures, settings.schedule_power)
    if steps is None:
        steps = _pilot_steps(target, settings, betas)
    if len(steps) != settings.n_temperatures:
        raise ValueError(f"{len(steps)} step sizes for {settings.n_temperatures} temperatures")
    generator = torch.Generator().manual_seed(settings.seed)
    annealer = _Annealer(target, settings.base_scale, generator)
    x = settings.base_scale * remove_com(torch.randn(settings.n_chains, target.n_particles, target.n_dims,
                                                     generator=generator, dtype=torch.float64))
    log_w, acceptance, used = annealer.run(x, betas, list(steps), settings.n_steps, smc=_smc(settings))
    log_z0 = base_log_z(target.n_particles, target.n_dims, settings.base_scale)
    return _result(log_w, 1.0, log_z0, acceptance, used, time.perf_counter() - start, settings, "forward",
                   settings.n_chains, annealer.resamplings)


def reverse_ais_log_z(target: EnergyModel, samples: torch.Tensor, steps: list[float],
                      settings: AISSettings = AISSettings()) -> AISResult:
    """``log Z`` by reverse AIS from exact samples of p: a stochastic *upper* bound (cross-check).

    Why: the same chain run from the target to the base (``β`` from 1 to 0, the transitions of
    the forward run in reverse order, ``steps`` as a forward estimate adapted them) has
    ``E[w] = Z_0 / Z``, so ``log Z_0 - log mean w`` overestimates ``log Z`` in expectation while
    the forward estimate underestimates it (bidirectional Monte Carlo, Grosse et al. 2015): the
    gap bounds the bias of both. ``samples`` ``[n, N, D]`` must follow exp(-u) (the reference
    MCMC data); ``settings.n_chains`` is ignored (one chain per sample).

    Example:
        >>> from eqbench.components import get_system
        >>> trap = get_system("harmonic")
        >>> s = AISSettings(n_chains=200, n_temperatures=50, base_scale=1.5, n_pilot_chains=32)
        >>> exact = remove_com(torch.randn(200, 4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
        >>> r = reverse_ais_log_z(trap, exact, ais_log_z(trap, s).step_sizes, s)
        >>> abs(r.log_z - 4.5 * math.log(2 * math.pi)) < 0.2
        True
    """
    start = time.perf_counter()
    if len(steps) != settings.n_temperatures:
        raise ValueError(f"{len(steps)} step sizes for {settings.n_temperatures} temperatures")
    betas = annealing_schedule(settings.n_temperatures, settings.schedule_power).flip(0)
    generator = torch.Generator().manual_seed(settings.seed + 2)
    annealer = _Annealer(target, settings.base_scale, generator)
    # The move at β_{t-1} (forward step index t-2) follows the increment to β_{t-1}; the last
    # increment (to β = 0) is followed by a move at β = 0, which does not change the weights.
    reverse_steps = list(steps[-2::-1]) + [steps[0]]
    x = remove_com(samples.to(torch.float64))
    settings = dataclasses.replace(settings, n_chains=int(x.shape[0]))
    log_w, acceptance, used = annealer.run(x, betas, reverse_steps, settings.n_steps, smc=_smc(settings))
    log_z0 = base_log_z(target.n_particles, target.n_dims, settings.base_scale)
    return _result(log_w, -1.0, log_z0, acceptance, used, time.perf_counter() - start, settings, "reverse",
                   settings.n_chains, annealer.resamplings)


def _smc(settings: AISSettings) -> tuple[float, int] | None:
    return (settings.resample_ess, settings.n_groups) if settings.smc else None  # type: ignore[return-value]


def pair_log_z_quadrature(system: EnergyModel, r_max: float | None = None) -> float:
    """``log Z`` on U of a two-particle system by 1-D radial quadrature: the known answer for DW-2.

    Why: with N = 2 the CoM-free subspace U has dimension D and every invariant energy depends
    on the distance ``r = |x_1 - x_2|`` only, so ``Z`` is a one-dimensional integral that
    scipy evaluates to ~1e-10, independently of any sampler.

    **Jacobian.** For ``x ∈ U``, ``x_1 = r⃗/2``, ``x_2 = -r⃗/2`` with ``r⃗ = x_1 - x_2 ∈ R^D``. The
    isometric coordinate of U (Helmert column ``(1, -1)/√2``, :func:`eqbench.geometry.com_free_basis`)
    is ``y = r⃗/√2``, since ``|x|² = |x_1|² + |x_2|² = |r⃗|²/2 = |y|²``. So ``dx_U = dy = 2^(-D/2) d^D r⃗``
    and, in polar coordinates with ``S_(D-1) = 2 π^(D/2) / Γ(D/2)`` (2π in 2-D, 4π in 3-D),

        ``Z = 2^(-D/2) S_(D-1) ∫_0^∞ r^(D-1) exp(-u(r)) dr``.

    Check on the Gaussian ``u = |x|²/2 = r²/4`` in D = 2: ``½ · 2π · ∫ r e^(-r²/4) dr = π · 2 = 2π``
    ``= (2π)^(k/2)`` with ``k = 2``, the prior's normaliser on U (tests check D = 2 and 3).

    ``u(r)`` is the system's own ``energy`` at ``x_1 = (r/2, 0, …) = -x_2``, so any radial one-body
    term counts too. ``r_max`` (default: 20 length scales, or 50 without one) bounds the integral.

    Example:
        >>> from eqbench.components import get_system
        >>> pair = get_system("harmonic").with_particles(2)    # u = r²/4 in 3-D: log Z = 1.5 log 2π
        >>> round(pair_log_z_quadrature(pair) - 1.5 * math.log(2 * math.pi), 8)
        0.0
    """
    from scipy.integrate import quad

    if system.n_particles != 2:
        raise ValueError(f"radial quadrature needs 2 particles, got {system.n_particles}")
    d = system.n_dims
    scale = float(getattr(system, "length_scale", 2.5))
    r_max = 20.0 * scale if r_max is None else r_max

    def energy(r: np.ndarray) -> np.ndarray:
        x = torch.zeros(len(r), 2, d, dtype=torch.float64)
        x[:, 0, 0] = torch.as_tensor(r, dtype=torch.float64) / 2.0
        x[:, 1, 0] = -x[:, 0, 0]
        return system.energy(x).numpy()

    grid = np.linspace(0.0, r_max, 20_001)[1:]
    u_grid = energy(grid)
    shift = float(np.min(u_grid))  # integrate exp(-(u - min u)) so nothing overflows
    peak = float(grid[np.argmin(u_grid)])

    def integrand(r: float) -> float:
        return r ** (d - 1) * math.exp(-(float(energy(np.array([r]))[0]) - shift)) if r > 0 else 0.0

    value, _ = quad(integrand, 0.0, r_max, points=[peak], limit=500, epsabs=0.0, epsrel=1e-11)
    sphere = 2.0 * math.pi ** (d / 2.0) / math.gamma(d / 2.0)
    return math.log(value) + math.log(sphere) - 0.5 * d * math.log(2.0) - shift


# ------------------------------------------------------------------------------ entropy and KL
@dataclass(frozen=True)
class EntropyEstimate:
    """``H(p) = ⟨u⟩_p + log Z`` on U in nats, with its parts and their standard errors."""

    system: str
    entropy: float
    entropy_stderr: float
    log_z: float
    log_z_stderr: float
    mean_energy: float
    mean_energy_stderr: float


@dataclass(frozen=True)
class KLEstimate:
    """``KL(p‖q) = NLL - H(p)`` in nats and its standard error (parts added in quadrature)."""

    kl: float
    stderr: float
    nll: float
    entropy: float


def entropy(system: EnergyModel | Any, log_z: float, mean_energy: float, *, log_z_stderr: float = 0.0,
            mean_energy_stderr: float = 0.0) -> EntropyEstimate:
    """The target's differential entropy on U, ``H(p) = -⟨log p⟩_p = ⟨u⟩_p + log Z``, with its error.

    Why: ``H(p)`` is the smallest NLL any model can reach on exact samples, so ``NLL - H(p)``
    (:func:`kl_from_nll`) is an absolute distance. ``log_z`` must be on the measure of eqbench's
    NLLs (U, :func:`ais_log_z`); ``mean_energy`` from exact samples (the reference test data).
    The two errors are independent (different runs) and add in quadrature.

    Example:
        >>> from eqbench.components import get_system
        >>> h = entropy(get_system("harmonic"), 4.5 * math.log(2 * math.pi), 4.5)
        >>> round(h.entropy, 3)  # = k/2 (1 + log 2π), the prior's NLL on its own samples
        12.77
    """
    value = mean_energy + log_z
    err = math.hypot(log_z_stderr, mean_energy_stderr)
    return EntropyEstimate(system=str(getattr(system, "name", system)), entropy=value, entropy_stderr=err,
                           log_z=log_z, log_z_stderr=log_z_stderr, mean_energy=mean_energy,
                           mean_energy_stderr=mean_energy_stderr)


def kl_from_nll(nll: float, nll_stderr: float, h: EntropyEstimate) -> KLEstimate:
    """``KL(p‖q) = NLL - H(p) ≥ 0`` and its error ``sqrt(se_NLL² + se_logZ² + se_⟨u⟩²)``.

    Why: a test NLL (nats on U, SPEC §1) estimates the cross-entropy ``-⟨log q⟩_p``; minus the
    entropy it is the forward KL, zero for a perfect model, comparable across systems.
    Quadrature treats the three errors as independent; when the NLL and ``⟨u⟩`` come from the
    same test set they are positively correlated (a good flow has ``-log q ≈ u + const``), so the
    quadrature error is then conservative. A negative KL beyond its error means an inconsistency
    (a wrong constant, a biased ``log Z`` or an estimated density), not a better-than-perfect flow.

    Example:
        >>> h = EntropyEstimate("harmonic", 12.77, 0.01, 8.27, 0.01, 4.5, 0.0)
        >>> k = kl_from_nll(12.80, 0.02, h)
        >>> round(k.kl, 3), round(k.stderr, 4)
        (0.03, 0.0224)
    """
    err = math.sqrt(nll_stderr ** 2 + h.log_z_stderr ** 2 + h.mean_energy_stderr ** 2)
    return KLEstimate(kl=nll - h.entropy, stderr=err, nll=nll, entropy=h.entropy)
