"""Steps several tasks share: parameter checks, fitting a model, scoring and sampling it.

Kept here so that every task trains with the same loop (:func:`eqbench.train.fit`, paper C.1:
AdamW, lr 5e-3, weight decay 0.01, batch 64) and scores with the same NLL (SPEC §1, §4), and a
number from one task means the same as the number of the same name from another. Every NLL a
task records goes through :func:`nll_records`, whose unit says what the number is: ``"nats,
exact"`` for the flows with an exact density, ``"nats, IW estimate K=64"`` for real NVP's
importance-weighted CoM marginal (paper B.2), with the gap to K = 1 recorded beside it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eqbench.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from eqbench.flows.base import Flow
    from eqbench.records import Record
    from eqbench.tasks.base import CellContext
    from eqbench.train import TrainResult

__all__ = [
    "positive_int",
    "fraction",
    "mean_nll",
    "nll_unit",
    "nll_records",
    "KL_SETTING",
    "check_kl_setting",
    "kl_records",
    "ScoredLogQ",
    "score_log_q",
    "forward_ess_records",
    "train_flow",
    "training_options",
    "guard_records",
    "selection_records",
    "sample_positions",
    "sample_with_log_q",
    "show_progress",
    "variant_name",
    "augmentation_cells",
    "augmentation_reason",
    "check_finite",
    "FINITE_ENERGY_UNIT",
    "DISTANCE_UNIT",
    "SAMPLE_METRIC_SETTINGS",
    "check_sample_metric_settings",
    "sample_quality_records",
    "TEST_SOURCES",
    "COMMUNITY_TEST_DETAIL",
    "split_source",
    "check_test_source",
    "community_missing",
    "community_missing_reason",
    "split_detail",
    "with_detail",
    "load_test_split",
]


def positive_int(params: Mapping[str, Any], key: str) -> int:
    """``params[key]`` as a positive int, or a ConfigError naming the key and the value."""
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def fraction(params: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """``params[key]`` as a number in [0, 1]."""
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{key} must be a number in [0, 1], got {value!r}")
    return float(value)


def variant_name(augment: bool) -> str:
    """``"aug"`` for augmented training (paper Fig. 5's "aug neq nODE"), ``""`` otherwise."""
    return "aug" if augment else ""


def augmentation_cells(params: Mapping[str, Any], model: str, system: str) -> list[dict[str, Any]]:
    """The cell a grid point with an ``augment`` flag becomes: none for augmenting a model that is
    equivariant (its likelihood is invariant, so augmentation would change nothing but the noise),
    else the point with its ``variant`` named (``"aug"`` or ``""``). Shared by the tasks that
    compare non-equivariant models with and without augmentation (paper §7.3, §7.4)."""
    from eqbench.components import get_system
    from eqbench.tasks.base import model_capabilities

    point = dict(params)
    if point["augment"] and "equivariant" in model_capabilities(model, get_system(system)):
        return []
    point["variant"] = variant_name(point["augment"])
    return [point]


def augmentation_reason(params: Mapping[str, Any], model: str) -> str:
    """Why :func:`augmentation_cells` made no cell: only ``augment = true`` was asked for, and the
    model is equivariant."""
    return (f"augment = true only, and model {model!r} is equivariant: augmenting its training would change "
            "nothing, so it runs only without augmentation; include false (--set augment=[false])")


def show_progress(progress: bool | None) -> bool:
    """Progress bars only where someone watches: on a terminal unless told otherwise."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def mean_nll(flow: Flow, x: torch.Tensor, batch_size: int = 500, **options: Any) -> float:
    """:func:`eqbench.train.mean_nll`, imported on call so that importing a task stays torch-free.
    Record NLLs with :func:`nll_records`, which says whether they are exact or estimated."""
    from eqbench.train import mean_nll as batched_mean_nll

    return batched_mean_nll(flow, x, batch_size, **options)


def nll_unit(flow: Flow, detail: str = "") -> str:
    """The unit of an NLL of ``flow``: ``"nats, exact"`` or ``"nats, IW estimate K=64"`` (+ ``detail``).

    SPEC §1: "every NLL record states whether its trace was exact or estimated"; K is part of
    what an importance-weighted number is (the estimate rises towards the marginal with K).
    """
    what = flow.density_estimate or "exact"
    return f"nats, {what}" + (f", {detail}" if detail else "")


@dataclass(frozen=True)
class ScoredLogQ:
    """Per-configuration log-densities of a flow on given configurations, as the tasks score them.

    ``scored``: what :meth:`~eqbench.flows.base.Flow.log_prob` returns (exact, or the K-draw
    importance-weighted estimate of the marginal). ``extended``: for a flow with an auxiliary
    variable (``flow.iw_draws`` set), the one-draw value ``log q(x, a) - log π(a|x)`` with
    ``a ~ π(a|x)``, the exact density on the extended space whose importance weights
    ``-u - log q`` are unbiased for the extended target (what the forward ESS of such a flow uses,
    Midgley et al. 2023); ``None`` for exact flows, whose ``scored`` values serve both.
    """

    scored: np.ndarray
    extended: np.ndarray | None = None

    @property
    def for_weights(self) -> np.ndarray:
        """The log q that importance weights on these configurations take."""
        return self.scored if self.extended is None else self.extended


def _log_prob_values(flow: Flow, x: torch.Tensor, batch_size: int, **options: Any) -> np.ndarray:
    import torch

    flow.eval()
    with torch.no_grad():
        parts = [flow.log_prob(x[i:i + batch_size], **options).double().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(parts).numpy()


def score_log_q(ctx: CellContext, flow: Flow, x: torch.Tensor, batch_size: int = 500) -> ScoredLogQ:
    """:class:`ScoredLogQ` of ``x``: draws of an importance-weighted density come from generators
    seeded with the cell's seed, so a rerun scores the same numbers. No gradients."""
    import torch

    if flow.iw_draws is None:
        return ScoredLogQ(_log_prob_values(flow, x, batch_size))
    seeded = {"generator": torch.Generator().manual_seed(ctx.seed)}
    return ScoredLogQ(_log_prob_values(flow, x, batch_size, **seeded),
                      _log_prob_values(flow, x, batch_size, iw_draws=1,
                                       generator=torch.Generator().manual_seed(ctx.seed)))


def forward_ess_records(ctx: CellContext, flow: Flow, log_q: ScoredLogQ, energies: Any,
                        metric: str = "forward_ess_fraction", *, detail: str = "") -> list[Record]:
    """The forward ESS fraction (:func:`eqbench.metrics.forward_ess_fraction`) of target samples
    (an MCMC test set) with energies ``energies`` and log-densities ``log_q`` under the flow.

    Configurations whose weight is undefined (NaN energy or log q) are left out and counted in
    ``<metric>_undefined``; the unit says how log q was computed (exact, or the one-draw
    extended-space density of an augmented flow). ``forward_log_w_std``, the spread of the finite
    log-weights, says how far a forward ESS of ~0 is from useful (for lognormal weights the
    fraction is ``exp(-σ²)``). ``detail`` (:func:`split_detail`) is appended to the units
    of the records computed on the test configurations.
    """
    import numpy as np

    from eqbench import metrics

    u = metrics.as_array(energies)
    log_w = -u - log_q.for_weights
    defined = ~np.isnan(log_w)
    how = ("exact log q" if log_q.extended is None
           else "extended-space one-draw density log q(x,a) - log π(a|x), a ~ π(a|x)")
    n = len(log_w)
    unit = (f"fraction, forward ESS n²/(Σw·Σ1/w) (Midgley et al. 2023), w = exp(-u - log q) at the "
            f"{int(defined.sum())} of {n} MCMC test-split configurations with a defined weight (x ~ p); {how}")
    records = [ctx.record(metric, metrics.forward_ess_fraction(log_w[defined]) if defined.any() else 0.0,
                          with_detail(unit, detail))]
    records.append(ctx.record(f"{metric}_undefined", float((~defined).sum()),
                              with_detail("count (NaN weight, left out)", detail)))
    finite = log_w[np.isfinite(log_w)]
    if finite.size > 1:
        records.append(ctx.record("forward_log_w_std", float(finite.std()),
                                  with_detail(f"nats, std of log w = -u - log q over the {finite.size} test "
                                              f"configurations with a finite weight, {how}", detail)))
    return records


def nll_records(ctx: CellContext, flow: Flow, x: torch.Tensor, metric: str, *, detail: str = "",
                batch_size: int = 500, scored: ScoredLogQ | None = None) -> list[Record]:
    """Records of the mean NLL of ``x`` under ``flow`` as ``metric``, with a unit that says what it is.

    Exact flows: one record, unit ``"nats, exact"``. Flows whose ``log_prob`` is an
    importance-weighted estimate with K = ``flow.iw_draws`` draws (real NVP's CoM marginal,
    paper B.2): the estimate (unit ``"nats, IW estimate K=64"``) and ``<metric>_k1_gap``, the
    one-draw NLL minus the K-draw NLL — positive in expectation (the K-draw estimate is the
    tighter bound), and the size of the bias a one-draw evaluation would carry. Draws
    come from a generator seeded with the cell's seed, so a rerun records the same numbers.
    ``detail`` is appended to the unit (e.g. the solver). ``scored``: the values of
    :func:`score_log_q` for ``x`` when the caller needs them too (forward ESS), so they are
    computed once.
    """
    k = flow.iw_draws
    scored = scored if scored is not None else score_log_q(ctx, flow, x, batch_size)
    value = float(-scored.scored.mean())
    kl = kl_records(ctx, flow, scored, metric, detail=detail)
    if k is None:
        return [ctx.record(metric, value, nll_unit(flow, detail)), *kl]
    one = float(-scored.extended.mean())
    return [ctx.record(metric, value, nll_unit(flow, detail)),
            ctx.record(f"{metric}_k1_gap", one - value,
                       f"nats, NLL(K=1) - NLL(K={k})" + (f", {detail}" if detail else "")), *kl]


#: The profile setting that turns on :func:`kl_records` (true in the quick and paper profiles).
KL_SETTING = "kl_divergence"


def check_kl_setting(params: Mapping[str, Any]) -> None:
    """``kl_divergence``, where a profile sets it, is true or false."""
    if KL_SETTING in params and not isinstance(params[KL_SETTING], bool):
        raise ConfigError(f"{KL_SETTING} must be true or false, got {params[KL_SETTING]!r}")


def kl_records(ctx: CellContext, flow: Flow, scored: ScoredLogQ, metric: str, *, detail: str = "") -> list[Record]:
    """``KL(p‖q) = NLL_test - H(p)`` beside a test NLL, when the cell's ``kl_divergence`` is true.

    Why: an NLL alone has no absolute meaning (it moves with the data set and its constant);
    ``H(p) = ⟨u⟩_p + log Z`` is the NLL of a perfect model, so ``NLL - H(p) ≥ 0`` says how far
    the flow is from the target, in nats, comparably across systems. ``log Z`` comes from the
    cached forward-AIS estimate (:mod:`eqbench.data.log_z`; computed once per machine on first
    use, about a minute for DW-4 and ten for LJ-13 on one core), ``⟨u⟩_p`` from the test split.
    Only ``metric == "nll_test"`` (the split ``⟨u⟩_p`` comes from) gets one. Records
    ``kl_test`` and ``kl_test_stderr`` (standard errors of the NLL over the scored
    configurations, of log Z and of ``⟨u⟩`` added in quadrature); the unit names the estimator,
    H(p), and the forward/reverse AIS gap, which bounds the bias of log Z (0.26 nats on LJ-13, far
    above its standard error). A flow whose NLL is an estimate gets an estimated KL, and says so.
    ``detail``: what the NLL's unit adds (the community test split, :func:`split_detail`),
    named in the KL's unit as the split NLL_test was scored on.
    """
    if metric != "nll_test" or ctx.params.get(KL_SETTING) is not True:
        return []
    from eqbench import free_energy
    from eqbench.data.log_z import load_log_z, log_z_method

    record = load_log_z(ctx.system)
    h = free_energy.entropy(ctx.system, record["log_z"], record["mean_energy"], log_z_stderr=record["log_z_stderr"],
                            mean_energy_stderr=record["mean_energy_stderr"])
    values = -scored.scored
    nll_stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    kl = free_energy.kl_from_nll(float(values.mean()), nll_stderr, h)
    gap = record.get("bidirectional_gap")
    estimate = f", from an NLL that is an {flow.density_estimate}" if flow.iw_draws is not None else ""
    unit = (f"nats, KL(p‖q) = NLL_test - H(p), H(p) = {h.entropy:.4f} ± {h.entropy_stderr:.4f} "
            f"(⟨u⟩ of eqbench's test split + log Z by {log_z_method(record)}, a lower bound"
            + (f"; {log_z_method(record, 'reverse')} {gap:+.3f} above it" if gap is not None else "") + f"){estimate}"
            + (f"; NLL_test on the {detail}" if detail else ""))
    return [ctx.record("kl_test", kl.kl, unit),
            ctx.record("kl_test_stderr", kl.stderr, "nats, standard error of kl_test: NLL over the scored test "
                                                   "configurations, log Z and ⟨u⟩ in quadrature")]


def training_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`eqbench.train.TrainConfig` fields a cell's training settings set (optimizer,
    lr, weight decay, clipping, schedule, warm-up, KL batch size, energy cut, micro-batch;
    :data:`eqbench.config.TRAINING_DEFAULTS` for any the parameters lack), so that every task
    trains by the same settings.

    Example:
        >>> training_options({"lr": 1e-3, "grad_clip": "off"})["lr"], training_options({})["grad_clip"]
        (0.001, None)
    """
    from eqbench.config import TRAINING_DEFAULTS, check_training_settings

    p = {**TRAINING_DEFAULTS, **{k: v for k, v in params.items() if k in TRAINING_DEFAULTS}}
    check_training_settings(p)
    return {"optimizer": p["optimizer"], "lr": float(p["lr"]), "weight_decay": float(p["weight_decay"]),
            "grad_clip": _grad_clip(p["grad_clip"]),
            "schedule": p["schedule"], "lr_warmup": int(p["lr_warmup"]), "kl_batch_size": int(p["kl_batch_size"]),
            "kl_energy_cut": None if p["kl_energy_cut"] == "off" else float(p["kl_energy_cut"]),
            "micro_batch": None if p["micro_batch"] == "off" else int(p["micro_batch"])}


def _grad_clip(setting: Any) -> float | str | None:
    """The :class:`eqbench.train.TrainConfig` value of the ``grad_clip`` setting."""
    from eqbench.grad_guard import GRAD_GUARD_SETTING

    if setting == "off":
        return None
    return GRAD_GUARD_SETTING if setting == GRAD_GUARD_SETTING else float(setting)


def guard_records(ctx: CellContext, *results: TrainResult) -> list[Record]:
    """``skipped_steps``: the training steps the gradient guard did not apply, summed over the
    cell's training phases (none without ``grad_clip="dynamic"``), so a guarded run says how
    often the guard acted."""
    counts = [r.skipped_steps for r in results if r.skipped_steps is not None]
    if not counts:
        return []
    return [ctx.record("skipped_steps", sum(counts), "count, steps the gradient guard did not apply "
                                                      "(grad_clip = dynamic)")]


def training_loss_records(ctx: CellContext, result: TrainResult, *, curve: bool = True) -> list[Record]:
    """``final_train_loss`` and, with ``curve``, ``train_loss`` at every logged step.

    A model with a training penalty (se3-acf's ``frame_penalty``) trains on the NLL estimate plus
    that penalty, so its loss is not an NLL: the unit then says so, and ``train_penalty`` /
    ``final_train_penalty`` record the penalty's share, so the NLL part is the difference.
    """
    if not result.history:
        return []
    penalised = any("penalty" in entry for entry in result.history)
    unit = "nats, training estimator" + (" + training penalty (train_penalty)" if penalised else "")
    penalty_unit = "nats, the model's training penalty"
    last = result.history[-1]
    records = [ctx.record("final_train_loss", last["loss"], unit)]
    if penalised:
        records.append(ctx.record("final_train_penalty", last.get("penalty", 0.0), penalty_unit))
    for entry in result.history if curve else ():
        step = int(entry["iteration"])
        records.append(ctx.record("train_loss", entry["loss"], unit, step=step))
        if penalised:
            records.append(ctx.record("train_penalty", entry.get("penalty", 0.0), penalty_unit, step=step))
    return records


def train_flow(
    ctx: CellContext,
    flow: Flow,
    train: torch.Tensor | None,
    *,
    iterations: int,
    batch_size: int = 64,
    augment: bool = False,
    lambda_start: float = 0.0,
    lambda_end: float = 0.0,
    seed_offset: int = 0,
    validation: torch.Tensor | None = None,
) -> TrainResult:
    """Fit ``flow`` in place: closed form where the model has one, else :func:`eqbench.train.fit`.

    With ``validation`` configurations, the profile's ``model_selection`` (``"best-validation"``
    or ``"last"``, :data:`eqbench.train.SELECTIONS`) and ``validate_every`` decide which
    checkpoint is returned. Raises ``FloatingPointError`` with the loop's reason when training
    diverges, so the runner records the cell as failed instead of scoring a broken model.
    With ``ctx.snapshots`` the fit saves its state as it goes and resumes from an earlier run's
    (:mod:`eqbench.snapshots`).
    """
    from eqbench.train import TrainConfig, TrainResult, fit

    p = ctx.params
    if hasattr(flow, "fit_closed_form"):
        if train is None:
            raise ConfigError(f"model {ctx.model} is fitted in closed form and needs training data")
        flow.fit_closed_form(train)
        return TrainResult("ok", "", 0, 0.0)
    config = TrainConfig(iterations=iterations, batch_size=batch_size, **training_options(p), augment=augment,
                         lambda_start=lambda_start, lambda_end=lambda_end, seed=ctx.seed + seed_offset,
                         selection=str(p.get("model_selection", "last")) if validation is not None else "last",
                         validate_every=int(p.get("validate_every", 50)))
    slot = ctx.snapshots.next_slot() if ctx.snapshots is not None else None
    result = fit(flow, ctx.system, train, config, progress=ctx.progress, validation=validation, snapshot=slot)
    if slot is not None and result.resumed_from_iteration is not None:
        ctx.snapshots.resumed.append({"fit": slot.index, "iteration": int(result.resumed_from_iteration),
                                      "of": int(iterations)})
    if result.status != "ok":
        raise FloatingPointError(result.reason)
    return result


def selection_records(ctx: CellContext, result: TrainResult) -> list[Record]:
    """The validation NLL curve (``nll_val`` per iteration: exact, on the validation split) and
    which checkpoint was scored (``selected_iteration``, its unit naming the rule), so every
    scored number says how its model was chosen."""
    if result.validation:
        rule = str(ctx.params.get("model_selection", "last"))
    else:
        rule = "last" if result.iterations_done else "closed-form fit"
    records = [ctx.record("nll_val", value, "nats, exact, validation split", step=step)
               for step, value in result.validation]
    # With validation, iteration 0 (the untrained flow) is a legitimate choice: never fall back.
    selected = result.selected_iteration if result.validation else result.iterations_done
    records.append(ctx.record("selected_iteration", selected, f"iteration, {rule}"))
    if result.validation:
        records.append(ctx.record("validation_wall_s", result.validation_wall_s, "s"))
    return records


def sample_with_log_q(flow: Flow, n: int, *, batch_size: int = 1000, seed: int = 0,
                      progress: bool | None = None, desc: str = "sample") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples and their exact ``log q`` in batches without gradients (eval mode: exact trace)."""
    import torch
    from tqdm.auto import tqdm

    flow.eval()
    generator = torch.Generator().manual_seed(seed)
    xs, log_qs = [], []
    with torch.no_grad():
        starts = range(0, n, batch_size)
        for start in tqdm(starts, desc=desc, disable=not show_progress(progress), leave=False):
            x, log_q = flow.sample(min(batch_size, n - start), generator=generator)
            xs.append(x)
            log_qs.append(log_q)
    return torch.cat(xs), torch.cat(log_qs)


def sample_positions(flow: Flow, n: int, *, batch_size: int = 1000, seed: int = 0,
                     generator: torch.Generator | None = None, progress: bool | None = None,
                     desc: str = "sample") -> torch.Tensor:
    """``n`` configurations without ``log q`` (:meth:`eqbench.flows.base.Flow.sample_positions`),
    in batches without gradients: the configurations :func:`sample_with_log_q` draws with the same
    seed and batch size, for metrics that never weight them. A ``generator`` (drawn on across
    calls, as metastable-states' rounds do) replaces the one seeded with ``seed``."""
    import torch
    from tqdm.auto import tqdm

    flow.eval()
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        starts = range(0, n, batch_size)
        xs = [flow.sample_positions(min(batch_size, n - start), generator=generator)
              for start in tqdm(starts, desc=desc, disable=not show_progress(progress), leave=False)]
    return torch.cat(xs)


def check_finite(records: list, what: str = "") -> None:
    """Raise FloatingPointError naming the first non-finite record (the runner records why)."""
    for record in records:
        if not math.isfinite(record.value):
            raise FloatingPointError(f"{what}{record.metric} is not finite ({record.value})")


# -- sample-quality metrics of the field (shared by bg-reweighting, energy-training, evaluate, density-estimation)

#: Unit suffix of the unweighted flow statistics an infinite energy would make infinite.
FINITE_ENERGY_UNIT = "flow samples of finite energy"

#: Unit of the distance W2s: reduced length units (σ-free: the systems are in reduced units).
DISTANCE_UNIT = "length (reduced)"

#: Settings that size the coordinate W2s (:func:`sample_quality_records`), in every profile of a
#: task that records them: the most configurations per set in the unaligned and the aligned W2.
SAMPLE_METRIC_SETTINGS = ("coord_w2_samples", "coord_w2_aligned_samples")


def check_sample_metric_settings(params: Mapping[str, Any]) -> None:
    """The settings :func:`sample_quality_records` reads, as positive integers."""
    for key in SAMPLE_METRIC_SETTINGS:
        positive_int(params, key)


def sample_quality_records(ctx: CellContext, x: np.ndarray, u: np.ndarray, x_ref: np.ndarray, u_ref: np.ndarray,
                           *, log_w: np.ndarray | None = None, detail: str = "") -> list[Record]:
    """The sample-quality numbers later work reports (iDEM 2024, Midgley et al. 2023, Klein et al.
    2023), flow samples ``x`` against reference configurations ``x_ref`` (the MCMC test set).

    ``x`` ``[n, N, D]`` are the samples with finite coordinates, ``u`` their energies (``+inf``
    allowed: a clash), ``log_w`` (optional) their log importance weights; with ``log_w`` the
    ``_reweighted`` variants are recorded too. Records (:mod:`eqbench.sample_metrics`):

    - ``energy_w1_flow`` / ``energy_w2_flow``: W1 / W2 of the energies, kT, the distance (not its
      p-th power), over the samples of finite energy (none when no sample has one);
    - ``distance_w2_flow``: W2 of the pooled interatomic distances (reduced length units);
    - ``dist_tv_flow``: total variation of the 200-bin interatomic-distance histograms over the
      reference's range (sample mass outside the range counts fully; iDEM drops it);
    - ``coord_w2_flow`` / ``coord_w2_aligned_flow``: W2 (not squared) of the configurations,
      exact OT, plain and after permutation + rotation/reflection alignment of every pair, on at
      most ``coord_w2_samples`` / ``coord_w2_aligned_samples`` configurations per set (seeded by
      the cell's seed; the unit gives the counts used);
    - ``sample_metrics_wall_s``: seconds spent on all of the above.

    ``detail`` (:func:`split_detail`) is appended to the unit of every record compared with
    ``x_ref`` (the community test split, where the cell scores on it).
    """
    import dataclasses
    import time

    import numpy as np

    from eqbench import metrics, sample_metrics

    p = ctx.params
    start = time.perf_counter()
    finite = np.isfinite(u)
    tv_unit = (f"TV in [0, 1], {sample_metrics.TV_BINS} bins over the reference pair-distance range "
               "(sample mass outside the range counts fully)")
    records = []
    if finite.any():
        records += [
            ctx.record("energy_w1_flow", sample_metrics.energy_wasserstein(u[finite], u_ref, p=1),
                       f"kT, W1, {FINITE_ENERGY_UNIT}"),
            ctx.record("energy_w2_flow", sample_metrics.energy_wasserstein(u[finite], u_ref, p=2),
                       f"kT, W2 (not squared), {FINITE_ENERGY_UNIT}"),
        ]
    records += [
        ctx.record("distance_w2_flow", metrics.distance_wasserstein(x, x_ref), DISTANCE_UNIT),
        ctx.record("dist_tv_flow", sample_metrics.distance_histogram_tv(x, x_ref), tv_unit),
    ]
    if log_w is not None:
        weights = metrics.normalized_weights(log_w)
        records += [
            ctx.record("energy_w1_reweighted", sample_metrics.energy_wasserstein(u, u_ref, p=1, log_w=log_w),
                       "kT, W1"),
            ctx.record("energy_w2_reweighted", sample_metrics.energy_wasserstein(u, u_ref, p=2, log_w=log_w),
                       "kT, W2 (not squared)"),
            ctx.record("distance_w2_reweighted", metrics.distance_wasserstein(x, x_ref, weights_a=weights),
                       DISTANCE_UNIT),
            ctx.record("dist_tv_reweighted", sample_metrics.distance_histogram_tv(x, x_ref, log_w=log_w),
                       f"{tv_unit}, importance-weighted samples"),
        ]
    for metric, align, key in (("coord_w2_flow", "none", "coord_w2_samples"),
                               ("coord_w2_aligned_flow", "permutation-rotation", "coord_w2_aligned_samples")):
        n_max = p[key]
        value = sample_metrics.coordinate_w2(x, x_ref, align=align, n_max=n_max, seed=ctx.seed)
        counts = f"{min(len(x), n_max)}x{min(len(x_ref), n_max)} configurations"
        how = "no alignment" if align == "none" else "each pair aligned (permutation, rotation/reflection)"
        records.append(ctx.record(metric, value, f"{DISTANCE_UNIT}, W2 (not squared), exact OT, {counts}, {how}"))
    if detail:
        records = [dataclasses.replace(r, unit=with_detail(r.unit, detail)) for r in records]
    records.append(ctx.record("sample_metrics_wall_s", time.perf_counter() - start, "s"))
    return records


# -- the test split a task scores on: eqbench's own or the community's (density-estimation,
#    bg-reweighting, evaluate)

#: ``test_source``: eqbench's own test split, or the community (EFM/DEM) test split of the same
#: target (``eqbench data --source community``; CoM removed on load, flaws reported there), so
#: that a model's numbers sit beside the published ones of that lineage.
TEST_SOURCES = ("eqbench", "community")
#: Appended to the unit of every record scored on, or compared with, the community test split.
COMMUNITY_TEST_DETAIL = ("community test split (EFM/DEM files via DEM, CoM removed on load; DW-4: rows repeat "
                         "and ~89 % also occur in its train split)")


def split_source(params: Mapping[str, Any]) -> str:
    """The cell's ``test_source`` (``"eqbench"`` where a profile predates the setting)."""
    return params.get("test_source", "eqbench")


def check_test_source(params: Mapping[str, Any]) -> None:
    """``test_source`` is one of :data:`TEST_SOURCES`."""
    if split_source(params) not in TEST_SOURCES:
        raise ConfigError(f"test_source must be one of {', '.join(TEST_SOURCES)}, got {params.get('test_source')!r}")


def community_missing(params: Mapping[str, Any], system: str) -> bool:
    """``test_source = community`` asked for a system without a community test split (a task
    makes no cell of it, and says why with :func:`community_missing_reason`)."""
    if split_source(params) != "community":
        return False
    from eqbench.data.external import REFERENCE_FILES

    return (system, "test") not in REFERENCE_FILES


def community_missing_reason(system: str) -> str:
    """Why a ``test_source = community`` request of ``system`` made no cell, naming the systems that have one."""
    from eqbench.data.external import REFERENCE_FILES

    have = sorted({name for name, split in REFERENCE_FILES if split == "test"})
    return f"test_source = community: no community test split for {system}; available for {', '.join(have)}"


def split_detail(params: Mapping[str, Any]) -> str:
    """What the units of records scored on the test split add: :data:`COMMUNITY_TEST_DETAIL` on
    the community split, nothing on eqbench's own (its units stay as they were)."""
    return COMMUNITY_TEST_DETAIL if split_source(params) == "community" else ""


def with_detail(unit: str, detail: str) -> str:
    """``unit`` with ``detail`` appended (``"unit, detail"``), or ``unit`` unchanged when there is none."""
    return f"{unit}, {detail}" if detail else unit


def load_test_split(ctx: CellContext, n: int, *, dtype: Any = None, device: Any = "cpu") -> torch.Tensor:
    """``n`` configurations of the cell's test split (``test_source``: eqbench's or the
    community's), drawn with the cell's seed; float64 unless ``dtype`` says otherwise."""
    import torch

    from eqbench.data.loading import load_data

    return load_data(ctx.system, split="test", n=n, seed=ctx.seed, dtype=torch.float64 if dtype is None else dtype,
                     device=device, source=split_source(ctx.params))

