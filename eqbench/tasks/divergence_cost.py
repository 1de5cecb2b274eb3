"""``divergence-cost``: error and cost of the divergence vs the number of particles (paper §7.1, Fig. 3a, 3c).

A CNF needs ``div v`` at every ODE step (``d log q/dt = -div v``, SPEC §1). Paper §7.1 compares
three ways to get it: brute force by autograd (one backward pass per coordinate), the
one-probe Hutchinson estimate ``εᵀ (∂v/∂x) ε`` (unbiased, one backward pass) and the kernel
flow's closed form. Brute force is exact but its cost grows fastest with the number of
particles (Fig. 3c); Hutchinson is cheap but its error grows (Fig. 3a) and spoils reweighting
(Fig. 3b, task ``bg-reweighting``); the closed form is exact and cheap.

Protocol, for each particle count N in ``particle_counts`` (the paper goes up to 128):

* **System.** ``dw4`` and ``lj13`` name the particle type: the task builds the same potential
  with N particles in its dimension (2-D double well, 3-D Lennard-Jones), a system of its own
  (:meth:`~eqbench.systems.base.ParticleSystem.with_particles`: ``dw8``, ``lj128``, ...), and
  every model takes the defaults that follow from that system's kind, lengths and size
  (:mod:`eqbench.flows.defaults`): kernel and RBF placements as for the paper's system of that
  kind, ``node`` hidden widths by N·D (the DW-4 layout up to N·D = 32, LJ-13's above, widened
  to at least N·D). The model is built afresh for each N with ``model_config`` (default: the
  registered defaults) after seeding torch with the cell's seed, so the fields are those of an
  untrained model at its default initialisation.
* **Configurations.** Random CoM-free clusters at the number density of the system's reference
  data: N positions uniform in a D-ball of radius ``R_N = R_ref (N / N_ref)^(1/D)``, minus their
  centre of mass, where ``R_ref`` is the radius for which such clusters of N_ref particles (4 or
  13) have the same mean squared distance from the centre of mass as the reference training
  data (:func:`reference_radius`). The same recipe is used at every N, including the system's own size, so the
  curves have no seam. Seeded by (seed, N).
* **Cost (Fig. 3c).** Wall time of one evaluation at time ``time`` on ``batch_size``
  configurations, as in sampling (no graph to the parameters), for each of ``methods``:
  ``velocity`` (v alone, the baseline), ``closed-form`` (models that have one; others skip it),
  ``brute-force`` and ``hutchinson`` (velocity + divergence). One untimed warm-up call, then
  ``repeats`` timed calls (paper C.7: 100), fewer when the warm-up call predicts more than
  ``budget_s`` seconds (never fewer than ``min_repeats``). Before running a count, its cost is
  extrapolated from the two previous counts; a (method, N) predicted to need more than
  ``budget_s`` for a warm-up plus ``min_repeats`` calls is not run and recorded as
  ``eval_time_skipped`` (the predicted seconds per call), as are the larger counts after it.
  Records: median (``eval_time_s``), mean, std, quartiles and the number of repeats.
  ``time_exponent`` is the least-squares slope of log(median time) against log N over the
  ``fit_points`` largest timed counts (with its standard error when there are 3 or more).
* **Hutchinson error (Fig. 3a).** On ``error_configs`` further configurations, the full
  Jacobian ``J = ∂v/∂x`` by autograd (one backward pass per coordinate), the exact divergence
  ``tr J`` and ``error_probes`` Rademacher probes per configuration. Each estimate is
  ``εᵀ J ε``: the number :func:`~eqbench.flows.divergence.hutchinson_divergence` returns for the
  same probe (one vector-Jacobian product ``εᵀJ``, then ``· ε``), obtained here for thousands of
  probes from one Jacobian; the cell checks the equality on one probe per configuration against
  ``flow.divergence(method="hutchinson", noise=ε)`` (``hutchinson_direct_rel_dev``) and, for
  models with a closed form, ``closed-form`` against ``tr J`` (``closed_form_rel_dev``). With
  ``e = ε_kᵀ J ε_k - tr J`` over all K·B estimates and ``s = sqrt(mean_b (tr J_b)²)`` (the RMS
  exact divergence over the configurations):

  - ``hutchinson_rel_error`` = mean |e| / s, ``hutchinson_rel_error_std`` = std |e| / s (the
    paper's error bars: one standard deviation over the estimations);
  - ``hutchinson_abs_error`` = mean |e| (in units of div v, nats per unit time) and its std;
  - ``hutchinson_rel_rmse`` = sqrt(mean e²) / s, and ``hutchinson_rel_rmse_analytic``, the same
    without probe noise: the Rademacher variance ``2 (‖S‖_F² - Σ_i S_ii²)``, S = (J + Jᵀ)/2,
    averaged over the configurations;
  - ``hutchinson_rel_bias`` = mean e / s with ``hutchinson_rel_bias_stderr`` (the estimator is
    unbiased: the bias must lie within a few standard errors of 0);
  - ``divergence_rms`` = s.

  Normalising by the RMS divergence over configurations rather than by each configuration's
  |tr J| keeps the measure finite: an untrained field's divergence changes sign between
  configurations, and a per-configuration ratio is dominated by the few where it nearly
  vanishes. The Jacobian costs as much as a brute-force evaluation of ``error_configs``
  configurations and is skipped by the same budget rule (``hutchinson_error_skipped``).
  ``hutchinson_rel_error_exponent`` / ``hutchinson_abs_error_exponent`` are fitted like the
  time exponent.

What to expect of the error: the absolute error grows with N (Fig. 3a; it is what spoils
reweighting, since an error of the log-density of a few nats reweights by orders of magnitude).
The relative error depends on the field: for an untrained kernel flow on double-well clusters
most pair distances of a large cluster lie beyond the last kernel centre (d > 8), where φ is
constant and the field is a near-uniform dilation, whose trace grows as N² while the estimator's
spread grows about as N, so the relative error falls with N there; on Lennard-Jones clusters
(kernels up to d ≈ 6.6) it does not.

Records of one N carry ``step = N`` (the sweep axis) and ``variant`` = the method. Models:
continuous flows only (capability ``cnf``): ``real-nvp`` and ``gaussian`` have no velocity
field whose divergence could be timed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.errors import ConfigError
from eqbench.records import CellResult, Record
from eqbench.tasks.base import CellContext, Task
from eqbench.tasks.common import check_finite, positive_int, show_progress

from eqbench.tasks.reporting import TaskSection

if TYPE_CHECKING:
    import pandas
    import torch

    from eqbench.flows.cnf import CNF

__all__ = [
    "DivergenceCost",
    "TASK",
    "METHODS",
    "PowerLawFit",
    "HutchinsonError",
    "fit_power_law",
    "predict_seconds",
    "reference_radius",
    "random_cluster",
    "jacobian",
    "hutchinson_from_jacobian",
    "rademacher_variance",
    "hutchinson_error",
]

#: Evaluations timed per particle count; ``velocity`` is v alone, the others velocity + divergence.
METHODS = ("velocity", "closed-form", "brute-force", "hutchinson")
#: Slope assumed when only one earlier count is known: brute force costs N·D backward passes of
#: an O(N²) pair field, so 3 is the pessimistic (budget-safe) guess.
_DEFAULT_SLOPE = 3.0


# ------------------------------------------------------------------------------------- fitting
@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """``value ≈ prefactor · N^exponent`` fitted by least squares in log-log space."""

    exponent: float
    prefactor: float
    stderr: float  # standard error of the exponent; NaN with two points
    counts: tuple[int, ...]


def fit_power_law(counts: Sequence[float], values: Sequence[float], points: int | None = None) -> PowerLawFit:
    """Least-squares slope of ``log value`` against ``log N`` over the ``points`` largest counts.

    Why the largest counts: the asymptotic scaling is what the paper's Fig. 3c argues about; at
    small N fixed per-call overheads flatten every curve. Non-positive or non-finite values are
    left out. Raises ``ValueError`` with fewer than two distinct counts.
    """
    pairs = sorted((float(n), float(v)) for n, v in zip(counts, values, strict=True)
                   if math.isfinite(v) and v > 0 and n > 0)
    if points is not None:
        if points < 2:
            raise ValueError(f"a power-law fit needs at least 2 points, got points={points}")
        pairs = pairs[-points:]
    if len({n for n, _ in pairs}) < 2:
        raise ValueError(f"a power-law fit needs at least 2 distinct counts, got {[n for n, _ in pairs]}")
    xs = [math.log(n) for n, _ in pairs]
    ys = [math.log(v) for _, v in pairs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    if len(xs) > 2:
        ssr = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
        stderr = math.sqrt(ssr / (len(xs) - 2) / sxx)
    else:
        stderr = math.nan
    return PowerLawFit(slope, math.exp(intercept), stderr, tuple(int(n) for n, _ in pairs))


def predict_seconds(history: Sequence[tuple[int, float]], n: int) -> float | None:
    """Seconds one call at ``n`` particles is expected to take, from the last two measured counts.

    The local slope between them is clamped to [1, 4] (no evaluation gets cheaper with more
    particles; brute force grows about as N³); with one measurement the slope is 3. ``None``
    when nothing was measured yet.
    """
    if not history:
        return None
    n1, t1 = history[-1]
    slope = _DEFAULT_SLOPE
    if len(history) >= 2:
        n0, t0 = history[-2]
        if n1 != n0 and t0 > 0 and t1 > 0:
            slope = min(4.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))
    return t1 * (n / n1) ** slope


def planned_repeats(first_call_s: float, params: Mapping[str, Any]) -> int:
    """Timed calls of one (method, N) after a warm-up call of ``first_call_s`` seconds: the
    profile's ``repeats``, fewer when they would not fit ``budget_s``, never below ``min_repeats``."""
    budget = float(params["budget_s"])
    fit = int((budget - first_call_s) / max(first_call_s, 1e-9))
    return max(params["min_repeats"], min(params["repeats"], fit))


def over_budget(predicted_call_s: float, params: Mapping[str, Any]) -> bool:
    """Whether a count predicted to take ``predicted_call_s`` per call is skipped: even its warm-up
    and ``min_repeats`` timed calls would exceed ``budget_s``."""
    return predicted_call_s * (params["min_repeats"] + 1) > float(params["budget_s"])


def study_over_budget(predicted_study_s: float, params: Mapping[str, Any]) -> bool:
    """Whether the Hutchinson error study at a count predicted to take ``predicted_study_s`` is
    skipped: it alone would exceed ``budget_s``."""
    return predicted_study_s > float(params["budget_s"])


# ------------------------------------------------------------------------------ configurations
def reference_radius(data: torch.Tensor) -> float:
    """Radius R of the uniform D-ball whose random clusters (:func:`random_cluster`, same N) have
    the data's mean squared distance from the centre of mass:
    ``R = sqrt((D + 2)/D · N/(N - 1) · ⟨|x_i - x̄|²⟩)``.

    A point uniform in the ball has ⟨r²⟩ = D R²/(D + 2); removing the centre of mass of N
    independent points scales the mean squared distance by (N - 1)/N.
    """
    n, d = data.shape[-2], data.shape[-1]
    centred = data - data.mean(dim=-2, keepdim=True)
    return math.sqrt((d + 2) / d * n / (n - 1) * float(centred.pow(2).sum(-1).mean()))


def random_cluster(n: int, n_particles: int, n_dims: int, radius: float, generator: torch.Generator,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """``n`` CoM-free configurations of ``n_particles`` positions uniform in a ball of ``radius``."""
    import torch

    from eqbench.geometry import remove_com

    direction = torch.randn(n, n_particles, n_dims, generator=generator, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = radius * torch.rand(n, n_particles, 1, generator=generator, dtype=torch.float64) ** (1.0 / n_dims)
    x = remove_com(direction * r)
    return x if dtype is None else x.to(dtype)


# ------------------------------------------------------------------------------ Hutchinson error
def jacobian(flow: CNF, t: float, x: torch.Tensor) -> torch.Tensor:
    """``∂v/∂x`` per configuration, ``[B, N·D (output), N·D (input)]``, one backward pass per row."""
    import torch

    b = x.shape[0]
    tt = torch.tensor(t, dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        v = flow.velocity(tt, xg).reshape(b, -1)
        n = v.shape[1]
        rows = []
        for k in range(n):
            (grad,) = torch.autograd.grad(v[:, k].sum(), xg, retain_graph=k < n - 1)
            rows.append(grad.reshape(b, -1))
    return torch.stack(rows, dim=1).detach()


def rademacher_variance(jac: torch.Tensor) -> torch.Tensor:
    """Variance of ``εᵀ J ε`` over Rademacher ``ε`` per configuration: ``2 (‖S‖_F² - Σ_i S_ii²)``
    with ``S = (J + Jᵀ)/2`` (only the symmetric part enters a quadratic form; the diagonal
    terms are exact because ε_i² = 1)."""
    sym = 0.5 * (jac + jac.transpose(-1, -2))
    return 2.0 * (sym.pow(2).sum((-2, -1)) - sym.diagonal(dim1=-2, dim2=-1).pow(2).sum(-1))


def hutchinson_from_jacobian(jac: torch.Tensor, n_probes: int, generator: torch.Generator,
                             chunk: int = 256) -> torch.Tensor:
    """``n_probes`` one-probe Hutchinson estimates ``εᵀ J ε`` per configuration, ``[K, B]``, float64."""
    import torch

    jac = jac.double().cpu()
    b, n, _ = jac.shape
    out = []
    for start in range(0, n_probes, chunk):
        k = min(chunk, n_probes - start)
        eps = (2 * torch.randint(0, 2, (k, b, n), generator=generator) - 1).double()
        out.append(torch.einsum("kbi,bij,kbj->kb", eps, jac, eps))
    return torch.cat(out)


@dataclasses.dataclass(frozen=True)
class HutchinsonError:
    """Error statistics of one-probe Hutchinson estimates (definitions in the module docstring)."""

    rel_error: float
    rel_error_std: float
    abs_error: float
    abs_error_std: float
    rel_rmse: float
    rel_rmse_analytic: float
    rel_bias: float
    rel_bias_stderr: float
    divergence_rms: float
    n_estimates: int


def hutchinson_error(estimates: torch.Tensor, exact: torch.Tensor, variance: torch.Tensor | None = None) -> HutchinsonError:
    """Statistics of ``estimates`` ``[K, B]`` against the exact divergences ``exact`` ``[B]``.

    ``variance`` (``[B]``, e.g. :func:`rademacher_variance`) gives the probe-noise-free RMSE;
    without it ``rel_rmse_analytic`` is NaN. Raises ``ValueError`` when every exact divergence is
    zero (no scale to be relative to).
    """
    est = estimates.double()
    exact = exact.double().to(est.device)
    err = est - exact.unsqueeze(0)
    scale = float(exact.pow(2).mean().sqrt())
    if not scale > 0:
        raise ValueError("every exact divergence is zero: a relative Hutchinson error is undefined")
    abs_err = err.abs()
    n = err.numel()
    ms = float(err.pow(2).mean())
    analytic = math.sqrt(float(variance.double().mean())) / scale if variance is not None else math.nan
    std = float(abs_err.std()) if n > 1 else 0.0
    return HutchinsonError(
        rel_error=float(abs_err.mean()) / scale,
        rel_error_std=std / scale,
        abs_error=float(abs_err.mean()),
        abs_error_std=std,
        rel_rmse=math.sqrt(ms) / scale,
        rel_rmse_analytic=analytic,
        rel_bias=float(err.mean()) / scale,
        rel_bias_stderr=math.sqrt(ms / n) / scale,
        divergence_rms=scale,
        n_estimates=n,
    )


# ------------------------------------------------------------------------------------ the task
def _number(params: Mapping[str, Any], key: str, *, low: float, high: float = math.inf) -> float:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= float(value) <= high:
        bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise ConfigError(f"{key} must be a number {bounds}, got {value!r}")
    return float(value)


class DivergenceCost(Task):
    """Hutchinson error and wall time of velocity + divergence vs the number of particles."""

    name = "divergence-cost"
    summary = "Hutchinson error and velocity + divergence wall time vs number of particles (paper §7.1, Fig. 3a, 3c)"
    systems = ("dw4", "lj13")
    requires = ("cnf",)

    def validate(self, params: Mapping[str, Any]) -> None:
        counts = params.get("particle_counts")
        if (not isinstance(counts, list) or not counts
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in counts)):
            raise ConfigError(f"particle_counts must be a non-empty list of integers >= 2, got {counts!r}")
        methods = params.get("methods")
        if not isinstance(methods, list) or not methods or any(m not in METHODS for m in methods):
            raise ConfigError(f"methods must be a non-empty list of {', '.join(METHODS)}; got {methods!r}")
        for key in ("batch_size", "repeats", "min_repeats", "error_probes"):
            positive_int(params, key)
        configs = params.get("error_configs")
        if isinstance(configs, bool) or not isinstance(configs, int) or configs < 0:
            raise ConfigError(f"error_configs must be an integer >= 0 (0: no Hutchinson error study), got {configs!r}")
        fit_points = params.get("fit_points")
        if isinstance(fit_points, bool) or not isinstance(fit_points, int) or fit_points < 2:
            raise ConfigError(f"fit_points must be an integer >= 2, got {fit_points!r}")
        if params["min_repeats"] > params["repeats"]:
            raise ConfigError(f"min_repeats ({params['min_repeats']}) must not exceed repeats ({params['repeats']})")
        if not 0 < _number(params, "budget_s", low=0.0) < math.inf:
            raise ConfigError(f"budget_s must be a finite positive number of seconds, got {params['budget_s']!r}")
        _number(params, "time", low=0.0, high=1.0)
        if not isinstance(params.get("model_config", {}), Mapping):
            raise ConfigError(f"model_config must be a table of model settings, got {params.get('model_config')!r}")

    def estimate_seconds(self, params: Mapping[str, Any], model: str, system: str,
                         calibration: Sequence[CellResult]) -> float | None:
        """Replays this task's budget rules (:func:`planned_repeats`, :func:`over_budget`) on the
        per-call seconds that calibration cells measured: ``eval_time_s`` per (method, N) scaled
        linearly to this batch size (an upper bound for small N, where a call's cost does not
        grow with the batch), counts never measured extrapolated by :func:`predict_seconds`; the
        error study per N scaled by ``error_configs``; plus the calibration cells' remainder
        (model construction, configurations). ``None`` when a needed measurement is missing."""
        import statistics

        from eqbench.components import build_model, get_system
        from eqbench.tasks.pricing import remainder_seconds

        per_call: dict[tuple[str, int], list[float]] = {}
        study: dict[int, list[float]] = {}
        remainders = []
        for cell in calibration:
            cp = cell.config.get("params", {})
            repeats = {(r.variant, r.step): r.value for r in cell.records if r.metric == "eval_repeats"}
            accounted = 0.0
            for r in cell.records:
                if r.metric == "eval_time_s" and (r.variant, r.step) in repeats:
                    accounted += (repeats[(r.variant, r.step)] + 1) * r.value
                    per_call.setdefault((r.variant, int(r.step)), []).append(
                        r.value * params["batch_size"] / cp["batch_size"])
                elif r.metric == "hutchinson_study_wall_s" and cp.get("error_configs"):
                    accounted += r.value
                    study.setdefault(int(r.step), []).append(r.value * params["error_configs"] / cp["error_configs"])
            remainders.append(remainder_seconds(cell, accounted))
        if not remainders:
            return None
        closed_form = build_model(model, get_system(system)).has_closed_form_divergence
        methods = [m for m in params["methods"] if m != "closed-form" or closed_form]
        counts = sorted(set(params["particle_counts"]))
        def timed_calls(call_s: float) -> float:  # the warm-up call and the planned repeats
            return (planned_repeats(call_s, params) + 1) * call_s

        # (seconds per N as measured, the task's skip rule, seconds spent at one N)
        series: list[tuple[dict[int, float], Callable[[float], bool], Callable[[float], float]]] = [
            ({key[1]: statistics.median(v) for key, v in per_call.items() if key[0] == m},
             lambda call_s: over_budget(call_s, params), timed_calls) for m in methods]
        if params["error_configs"] > 0:
            series.append(({n: statistics.median(v) for n, v in study.items()},
                           lambda study_s: study_over_budget(study_s, params), lambda study_s: study_s))
        total = statistics.median(remainders)
        for measured, skipped, spent in series:
            history: list[tuple[int, float]] = []
            for n in counts:
                predicted = predict_seconds(history, n)
                if predicted is not None and skipped(predicted):
                    break  # skipped, and every larger count with it (as run_cell does)
                seconds = measured.get(n, predicted)
                if seconds is None:
                    return None
                total += spent(seconds)
                history.append((n, seconds))
        return total

    def run_cell(self, ctx: CellContext) -> list[Record]:
        import torch
        from tqdm.auto import tqdm

        from eqbench.components import build_model
        from eqbench.data.loading import load_data
        from eqbench.timing import TimingStats, evaluation_call, repeat_seconds, stable_malloc

        p = ctx.params
        counts = sorted(set(p["particle_counts"]))
        t = float(p["time"])
        budget = float(p["budget_s"])
        system = ctx.system
        records = [ctx.record("stable_malloc", float(stable_malloc()), "1 = glibc mallopt applied")]
        radius_ref = reference_radius(load_data(system, "train", n=1000, seed=0))
        records.append(ctx.record("reference_radius", radius_ref, f"length, at N = {system.n_particles}"))

        time_history: dict[str, list[tuple[int, float]]] = {m: [] for m in p["methods"]}
        skipped: dict[str, bool] = {m: False for m in p["methods"]}
        jac_history: list[tuple[int, float]] = []
        err_skipped = False
        error_by_n: dict[int, HutchinsonError] = {}
        bar = tqdm(counts, desc=f"divergence-cost {ctx.model} {system.name}", leave=False,
                   disable=not show_progress(ctx.progress))
        for n in bar:
            torch.manual_seed(ctx.seed)
            flow = build_model(ctx.model, system.with_particles(n), dict(p.get("model_config", {}))).to(ctx.device)
            flow.eval()
            dtype = next(flow.parameters()).dtype
            generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + n)
            radius = radius_ref * (n / system.n_particles) ** (1.0 / system.n_dims)
            x = random_cluster(p["batch_size"], n, system.n_dims, radius, generator, dtype).to(ctx.device)
            for method in p["methods"]:
                if method == "closed-form" and not flow.has_closed_form_divergence:
                    continue  # per model that supports it (paper §7.1: only the kernel flow has one)
                bar.set_postfix(n=n, method=method)
                predicted = predict_seconds(time_history[method], n)
                if predicted is not None and (skipped[method] or over_budget(predicted, p)):
                    skipped[method] = True  # larger counts cost more: skip them too
                    records.append(ctx.record(
                        "eval_time_skipped", predicted,
                        f"s per evaluation (predicted); not run: over budget_s={budget:g}",
                        variant=method, step=n))
                    continue
                call = evaluation_call(flow, x, None if method == "velocity" else method, t)
                start = time.perf_counter()
                call()  # warm-up, and the estimate of one call
                first = time.perf_counter() - start
                repeats = planned_repeats(first, p)
                stats = TimingStats.of(repeat_seconds(call, repeats=repeats, warmup=0, device=ctx.device))
                time_history[method].append((n, stats.median))
                unit = f"s per evaluation, batch {p['batch_size']}"
                for metric, value in (("eval_time_s", stats.median), ("eval_time_mean_s", stats.mean),
                                      ("eval_time_std_s", stats.std), ("eval_time_p25_s", stats.p25),
                                      ("eval_time_p75_s", stats.p75)):
                    records.append(ctx.record(metric, value, unit, variant=method, step=n))
                records.append(ctx.record("eval_repeats", stats.n, "count", variant=method, step=n))
            if p["error_configs"] > 0:
                bar.set_postfix(n=n, method="hutchinson error")
                predicted = predict_seconds(jac_history, n)
                if predicted is not None and (err_skipped or study_over_budget(predicted, p)):
                    err_skipped = True
                    records.append(ctx.record(
                        "hutchinson_error_skipped", predicted,
                        f"s for the Jacobian (predicted); not run: over budget_s={budget:g}",
                        variant="hutchinson", step=n))
                else:
                    x_err = random_cluster(p["error_configs"], n, system.n_dims, radius, generator, dtype).to(ctx.device)
                    start = time.perf_counter()
                    error, checks = self._hutchinson_study(flow, x_err, t, p["error_probes"], generator)
                    jac_history.append((n, time.perf_counter() - start))
                    error_by_n[n] = error
                    records.extend(self._error_records(ctx, error, checks, n))
                    records.append(ctx.record("hutchinson_study_wall_s", jac_history[-1][1],
                                              f"s (Jacobian of {p['error_configs']} configurations and the estimates)",
                                              variant="hutchinson", step=n))
        bar.close()
        records.extend(self._fit_records(ctx, time_history, error_by_n, p["fit_points"]))
        check_finite(records)
        return records

    @staticmethod
    def _hutchinson_study(flow: CNF, x: torch.Tensor, t: float, probes: int,
                          generator: torch.Generator) -> tuple[HutchinsonError, dict[str, float]]:
        """Jacobian, exact trace, K estimates from the Jacobian and the two consistency checks."""
        import torch

        from eqbench.flows.divergence import rademacher_like

        jac = jacobian(flow, t, x)
        exact = jac.double().diagonal(dim1=-2, dim2=-1).sum(-1).cpu()
        scale = float(exact.pow(2).mean().sqrt()) or 1.0
        checks: dict[str, float] = {}
        noise = rademacher_like(x, generator=generator)
        with torch.no_grad():
            _, direct = flow.divergence(t, x, "hutchinson", noise=noise)
            eps = noise.reshape(x.shape[0], -1).double().cpu()
            via_jac = torch.einsum("bi,bij,bj->b", eps, jac.double().cpu(), eps)
            checks["hutchinson_direct_rel_dev"] = float((direct.double().cpu() - via_jac).abs().max()) / scale
            if flow.has_closed_form_divergence:
                _, closed = flow.divergence(t, x, "closed-form")
                checks["closed_form_rel_dev"] = float((closed.double().cpu() - exact).abs().max()) / scale
        estimates = hutchinson_from_jacobian(jac, probes, generator)
        return hutchinson_error(estimates, exact, rademacher_variance(jac.double().cpu())), checks

    @staticmethod
    def _error_records(ctx: CellContext, e: HutchinsonError, checks: Mapping[str, float], n: int) -> list[Record]:
        rel = "relative to the RMS exact divergence"
        div_unit = "div v (nats per unit time)"
        rows = [
            ("hutchinson_rel_error", e.rel_error, f"mean |error|, {rel}"),
            ("hutchinson_rel_error_std", e.rel_error_std, f"std |error|, {rel}"),
            ("hutchinson_abs_error", e.abs_error, f"mean |error|, {div_unit}"),
            ("hutchinson_abs_error_std", e.abs_error_std, f"std |error|, {div_unit}"),
            ("hutchinson_rel_rmse", e.rel_rmse, f"RMS error, {rel}"),
            ("hutchinson_rel_rmse_analytic", e.rel_rmse_analytic, f"RMS error without probe noise, {rel}"),
            ("hutchinson_rel_bias", e.rel_bias, f"mean error, {rel}"),
            ("hutchinson_rel_bias_stderr", e.rel_bias_stderr, f"standard error of the mean error, {rel}"),
            ("divergence_rms", e.divergence_rms, f"RMS exact divergence, {div_unit}"),
            ("hutchinson_estimates", e.n_estimates, "count"),
            *((name, value, f"max |deviation| from tr J, {rel}") for name, value in checks.items()),
        ]
        return [ctx.record(metric, value, unit, variant="hutchinson", step=n) for metric, value, unit in rows]

    @staticmethod
    def _fit_records(ctx: CellContext, time_history: Mapping[str, list[tuple[int, float]]],
                     error_by_n: Mapping[int, HutchinsonError], points: int) -> list[Record]:
        """Fitted scaling exponents (only where two or more counts were measured)."""
        series: list[tuple[str, str, list[int], list[float]]] = [
            ("time_exponent", method, [n for n, _ in hist], [s for _, s in hist])
            for method, hist in time_history.items()
        ]
        ns = sorted(error_by_n)
        series.append(("hutchinson_rel_error_exponent", "hutchinson", ns, [error_by_n[n].rel_error for n in ns]))
        series.append(("hutchinson_abs_error_exponent", "hutchinson", ns, [error_by_n[n].abs_error for n in ns]))
        records = []
        for metric, variant, counts, values in series:
            try:
                fit = fit_power_law(counts, values, points)
            except ValueError:
                continue
            unit = f"slope of log-log fit over N = {', '.join(map(str, fit.counts))}"
            records.append(ctx.record(metric, fit.exponent, unit, variant=variant))
            if math.isfinite(fit.stderr):
                records.append(ctx.record(f"{metric}_stderr", fit.stderr, unit, variant=variant))
        return records

    # ------------------------------------------------------------------------------------ plot
    def plot(self, table: pandas.DataFrame, out_dir: Path) -> list[Path]:
        """Per system: Hutchinson relative and absolute error vs N (Fig. 3a; bars: one std over
        the estimations, C.7) and wall time per evaluation vs N for each method on log-log axes
        (Fig. 3c; bars: quartiles), the fitted exponent in each legend entry. Values of several
        seeds are averaged."""
        import seaborn as sns

        from eqbench.plots import metric_rows, new_figure, save_figure

        written: list[Path] = []
        for system in sorted(table["system"].unique()):
            rows = table[table["system"] == system].copy()
            rows["variant"] = rows["variant"].fillna("").astype(str)
            fig, axes = new_figure(3, width=4.6, height=3.8)
            drew = False
            for ax, metric, ylabel in (
                (axes[0], "hutchinson_rel_error", "|Hutchinson − exact| / RMS exact"),
                (axes[1], "hutchinson_abs_error", "|Hutchinson − exact| (div v units)"),
            ):
                for model in sorted(rows["model"].unique()):
                    sub = rows[rows["model"] == model]
                    mean = _by_step(metric_rows(sub, metric))
                    if mean.empty:
                        continue
                    std = _by_step(metric_rows(sub, f"{metric}_std")).reindex(mean.index)
                    label = model + _exponent_label(sub, f"{metric}_exponent", "hutchinson")
                    ax.errorbar(mean.index, mean.values, yerr=std.fillna(0.0).values, marker="o",
                                capsize=2, label=label)
                    drew = True
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("number of particles N")
                ax.set_ylabel(ylabel)
                ax.legend(fontsize=7)
            axes[0].set_title(f"{system}: Hutchinson error (Fig. 3a)")
            axes[1].set_title(f"{system}: absolute error")
            ax = axes[2]
            colours = dict(zip(METHODS, sns.color_palette("colorblind", len(METHODS))))
            for model, marker in zip(sorted(rows["model"].unique()), itertools.cycle("osD^vP*X")):
                sub = rows[rows["model"] == model]
                for method in METHODS:
                    med = _by_step(metric_rows(sub[sub["variant"] == method], "eval_time_s"))
                    if med.empty:
                        continue
                    lo = _by_step(metric_rows(sub[sub["variant"] == method], "eval_time_p25_s")).reindex(med.index)
                    hi = _by_step(metric_rows(sub[sub["variant"] == method], "eval_time_p75_s")).reindex(med.index)
                    yerr = [(med - lo).clip(lower=0).fillna(0).values, (hi - med).clip(lower=0).fillna(0).values]
                    label = f"{model}: {method}" + _exponent_label(sub, "time_exponent", method)
                    ax.errorbar(med.index, med.values, yerr=yerr, marker=marker, color=colours[method], capsize=2,
                                label=label)
                    drew = True
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("number of particles N")
            ax.set_ylabel("seconds per evaluation")
            ax.set_title(f"{system}: velocity + divergence (Fig. 3c)")
            ax.legend(fontsize=6)
            if not drew:
                import matplotlib.pyplot as plt

                plt.close(fig)
                continue
            written += save_figure(fig, out_dir, f"divergence-cost_{system}")
        return written

    def report_section(self) -> TaskSection:
        """Fitted exponents per settings key and method, the per-N numbers behind Fig. 3a, 3c."""
        return TaskSection(
            task="divergence-cost",
            title="Divergence: Hutchinson error and cost vs number of particles",
            paper="§7.1, Fig. 3a, 3c",
            conventions="Wall time (median, seconds) of one velocity + divergence evaluation on this machine; "
                        "Hutchinson relative error = mean |estimate − exact| / RMS exact divergence; exponents are "
                        "least-squares slopes in log-log space over the largest particle counts. Variant = method.",
            metrics=("time_exponent", "hutchinson_rel_error_exponent", "hutchinson_abs_error_exponent"),
            axis_metrics=("eval_time_s", "hutchinson_rel_error", "hutchinson_abs_error"),
            axis_label="N",
            no_baseline="The paper reports these results only as figures (Fig. 3a, 3c); there are no published "
                        "numbers to place beside them.",
            order=4,
        )


def _by_step(rows: pandas.DataFrame) -> pandas.Series:
    """Mean value per step (particle count) over seeds, indexed by N."""
    if rows.empty:
        return rows["value"]
    return rows.groupby(rows["step"].astype(int))["value"].mean().sort_index()


def _exponent_label(rows: pandas.DataFrame, metric: str, variant: str) -> str:
    """`` (∝ N^2.03)`` from the fitted exponent records, mean over seeds; empty when absent."""
    fit = rows[(rows["metric"] == metric) & (rows["variant"].fillna("").astype(str) == variant)]["value"]
    return f" (∝ N^{fit.mean():.2f})" if not fit.empty else ""


TASK = DivergenceCost()
