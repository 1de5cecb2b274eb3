"""``timing``: wall time per training and per sampling iteration, batch 64 (paper B.1, Table 2).

Paper B.1 compares the kernel flow with the two equivariant gradient flows ("simple" and
SchNet): the kernel flow trains several times faster (the gradient flows need autograd for
``v = ∇Φ``) and samples at least an order of magnitude faster (they brute-force the Laplacian
``ΔΦ`` for exact log-weights). Table 2 was measured on a GTX 1080 Ti, so only **ratios** between
models carry over to other hardware; this task measures seconds and the ratios to a reference
model (``reference_model``, default the kernel flow) on the same machine in the same process.

Protocol, per model and system (one cell per seed):

* **Training iteration**: one maximum-likelihood step on a batch of ``batch_size`` (64)
  configurations drawn from ``n_data`` training samples: ``-log q`` with the model's training
  divergence and solver (DTO, RK4 20 steps; the kernel flow's closed form, Hutchinson for the
  others, paper §7.3, B.1: also for the simple gradient flow, whose default in eqbench is its
  closed form, see :data:`PAPER_ESTIMATORS`), backward, AdamW step (C.1).
* **Sampling iteration**: ``batch_size`` samples with their exact log importance weights
  ``-u(x) - log q(x)``: the model's exact divergence, brute force for the gradient flows and the
  neural ODE, as B.1 samples and reweights (exact log-determinant for real-nvp).
* **Estimators** (grid axis ``estimators``): ``"table-2"`` times every model with Table 2's
  estimators (:data:`PAPER_ESTIMATORS`), the comparison with the paper. ``"closed-form"`` adds,
  for each model whose exact closed-form divergence eqbench uses instead (the simple gradient
  flow, whose Φ is a pair sum), a row timed with it in training and sampling
  (:data:`CLOSED_FORM_ESTIMATORS`; ``variant = "closed-form"``): what the model costs as eqbench
  runs it. Models whose defaults already are Table 2's get no second row.
* **Epochs** (paper: "means and standard deviation over 10 epochs with 10 iterations each"):
  ``train_epochs`` epochs of ``train_iterations`` iterations (``sample_epochs`` x
  ``sample_iterations`` for sampling), after ``warmup`` untimed iterations. Each epoch gives one
  seconds-per-iteration value; records are their mean and standard deviation. The reference
  model is timed in the same cell with epochs interleaved (model, reference, reference, model,
  ...), so a change of the machine's load hits both alike; the ratio records are the ratio of the
  means and the standard deviation of the per-epoch ratios. For the reference model itself the
  ratio is 1 by definition and nothing is timed twice (unless ``model_config`` changes it).
* **References** (grid axis ``reference_model``): the model every ratio is taken to, timed in
  the same cell. The paper's is the kernel flow (Table 2); a list, possibly per model
  (``reference_model = { default = "kernel-flow", se3-acf = ["kernel-flow", "en-flow"] }``),
  gives one cell per reference, ``variant = "vs <reference>"`` for every reference but the
  kernel flow. That is how the sampling-speed claim of Midgley et al. (NeurIPS 2023, §6: the
  augmented coupling flow samples with exact log-weights more than an order of magnitude faster
  than the E(n)-equivariant CNF) is measured: both flows timed in one cell, interleaved. A model
  is not timed against itself, except as the kernel flow's own row (ratio 1).
* **Budget**: when the warm-up iteration predicts more than ``budget_s`` seconds for one
  measurement (training or sampling of one model), iterations per epoch and then epochs are cut
  (never below 2 epochs of 1 iteration); the records ``*_timed_iterations`` say how many were
  timed. Table 2's gradient flows on LJ-13 take 15-35 s per sampling iteration on one CPU thread.

Metrics (seconds are per iteration; Table 2's entries are seconds per 10 iterations, the
ratios compare directly): ``train_iteration_s`` (+ ``_std``), ``sample_iteration_s`` (+
``_std``), ``reference_train_iteration_s`` / ``reference_sample_iteration_s`` (+ ``_std``),
``train_ratio_to_reference`` / ``sample_ratio_to_reference`` (+ ``_std``), the timed iteration
counts, ``n_parameters`` and ``stable_malloc`` (whether glibc's allocator was tuned for stable
timings, :func:`eqbench.timing.stable_malloc`). Torch threads are the runner's and recorded in
each row's provenance. Models: every model with gradient-based training (``gaussian`` is fitted
in closed form: nothing to time per iteration).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.errors import ConfigError
from eqbench.records import CellResult, Record
from eqbench.tasks.base import CellContext, Task
from eqbench.tasks.common import check_finite, positive_int, show_progress

from eqbench.tasks.reporting import (
    NOT_MEASURED,
    NOT_REPRODUCED,
    REPRODUCED,
    Claim,
    ClaimResult,
    HtmlTable,
    Point,
    TaskSection,
    describe,
    fmt,
    has_capability,
    is_equivariant_flow,
    pm,
    seed_stats,
    settings_name,
    short_name,
)

if TYPE_CHECKING:
    import pandas

__all__ = ["CLOSED_FORM_ESTIMATORS", "ESTIMATORS", "PAPER_ESTIMATORS", "Timing", "TASK", "model_config_for",
           "ratio_stats"]

MODEL, REFERENCE = "model", "reference"

#: Table 2's estimators where eqbench's defaults have since become cheaper: paper B.1 trains the
#: simple gradient flow with Hutchinson and samples it with the brute-force Laplacian, while
#: eqbench's ``gradient-flow`` defaults to its closed-form divergence. A cell's ``model_config``
#: overrides these: ``{train_divergence = "exact", eval_divergence = "exact"}`` times the
#: closed form (the kernel flow and node read "exact" as their own default already).
PAPER_ESTIMATORS: dict[str, dict[str, str]] = {
    "gradient-flow": {"train_divergence": "hutchinson", "eval_divergence": "brute-force"},
}


#: The closed-form divergence in training and sampling, for the models of :data:`PAPER_ESTIMATORS`
#: (their eqbench default): the ``estimators = "closed-form"`` rows.
CLOSED_FORM_ESTIMATORS: dict[str, str] = {"train_divergence": "exact", "eval_divergence": "exact"}
#: Values of the ``estimators`` grid axis.
ESTIMATORS: tuple[str, ...] = ("table-2", "closed-form")
#: ``variant`` of a cell per ``estimators`` value.
_VARIANTS = {"table-2": "", "closed-form": "closed-form"}


def model_config_for(model: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The settings ``model`` is built with in a timing cell: Table 2's estimators
    (:data:`PAPER_ESTIMATORS`), or the closed form for ``estimators = "closed-form"``, updated by
    the cell's ``model_config``.

    Example:
        >>> model_config_for("gradient-flow", {"estimators": "table-2"})
        {'train_divergence': 'hutchinson', 'eval_divergence': 'brute-force'}
        >>> model_config_for("gradient-flow", {"estimators": "closed-form"})
        {'train_divergence': 'exact', 'eval_divergence': 'exact'}
    """
    if model not in PAPER_ESTIMATORS:
        estimators: dict[str, str] = {}
    elif params.get("estimators", "table-2") == "closed-form":
        estimators = dict(CLOSED_FORM_ESTIMATORS)
    else:
        estimators = dict(PAPER_ESTIMATORS[model])
    return {**estimators, **dict(params.get("model_config", {}))}


def ratio_stats(numerator: list[float], denominator: list[float]) -> tuple[float, float]:
    """``(mean(numerator) / mean(denominator), std of the per-epoch ratios)``.

    The ratio of means is the headline (it weights every iteration alike); the spread of the
    per-epoch ratios of interleaved epochs shows how stable it is on a loaded machine.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("ratio_stats needs two equally long, non-empty series")
    per_epoch = [a / b for a, b in zip(numerator, denominator)]
    std = statistics.stdev(per_epoch) if len(per_epoch) > 1 else 0.0
    return statistics.fmean(numerator) / statistics.fmean(denominator), std


class Timing(Task):
    """Wall time per training and sampling iteration at batch 64, with ratios to the kernel flow."""

    name = "timing"
    summary = "wall time per training and sampling iteration, batch 64, ratios to the kernel flow (paper B.1, Table 2)"
    requires = ("trainable",)
    #: The paper's systems (Table 2): every cell also times the reference kernel flow, and the
    #: ratios to it are what compares with the paper; the known-answer ``harmonic`` system has
    #: no published timing to place beside.
    systems = ("dw2", "dw4", "lj13")
    data_splits = {"n_data": "train"}
    grid_axes = ("estimators", "reference_model")

    def validate(self, params: Mapping[str, Any]) -> None:
        for key in ("batch_size", "n_data", "train_epochs", "train_iterations", "sample_epochs",
                    "sample_iterations"):
            positive_int(params, key)
        warmup = params.get("warmup")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ConfigError(f"warmup must be an integer >= 1 (the warm-up also sizes the budget), got {warmup!r}")
        for key in ("train_epochs", "sample_epochs"):
            if params[key] < 2:
                raise ConfigError(f"{key} must be >= 2: the standard deviation needs two epochs, got {params[key]}")
        budget = params.get("budget_s")
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget < math.inf:
            raise ConfigError(f"budget_s must be a finite positive number of seconds, got {budget!r}")
        reference = params.get("reference_model")
        if not isinstance(reference, str):
            raise ConfigError(f"reference_model must be a model name, \"\" for no ratios, or a list of them "
                              f"(a grid axis); got {reference!r}")
        if reference:
            from eqbench.registry import MODELS

            MODELS.get(reference)  # unknown name: an error listing the valid ones
        if not isinstance(params.get("model_config", {}), Mapping):
            raise ConfigError(f"model_config must be a table of model settings, got {params.get('model_config')!r}")
        estimators = params.get("estimators", "table-2")
        if estimators not in ESTIMATORS:
            raise ConfigError(f"estimators must be one of {', '.join(ESTIMATORS)} (a list of them is a grid axis); "
                              f"got {estimators!r}")

    def expand_cell(self, params: Mapping[str, Any], model: str, system: str) -> list[dict[str, Any]]:
        """Name the cell's variant (``closed-form`` rows, references other than the kernel flow);
        drop a ``closed-form`` row for a model that has no separate one, and a model timed against
        itself under any reference but the kernel flow (whose own row holds the ratio 1)."""
        point = dict(params)
        estimators = point.setdefault("estimators", "table-2")
        if estimators == "closed-form" and model not in PAPER_ESTIMATORS:
            return []
        reference = point["reference_model"]
        if reference and reference != PAPER_REFERENCE and reference == model and not point.get("model_config"):
            return []
        parts = [_VARIANTS[estimators]] if _VARIANTS[estimators] else []
        if reference and reference != PAPER_REFERENCE:
            parts.append(f"vs {reference}")
        point["variant"] = ", ".join(parts)
        return [point]

    def no_cells_reason(self, params: Mapping[str, Any], model: str, system: str) -> str:
        if params.get("reference_model") == model:
            return (f"model {model!r} is its own reference_model; time it against another model "
                    f"(--set reference_model={PAPER_REFERENCE})")
        return (f"estimators = \"closed-form\" only, and model {model!r} is timed with its own default "
                "estimators under \"table-2\" already; include \"table-2\" (--set estimators=[\"table-2\"])")

    @staticmethod
    def _with_reference(params: Mapping[str, Any], model: str) -> bool:
        """The reference is timed alongside unless it is this very model with default settings."""
        reference = params["reference_model"]
        return bool(reference) and (reference != model or bool(params.get("model_config")))

    def estimate_seconds(self, params: Mapping[str, Any], model: str, system: str,
                         calibration: Sequence[CellResult]) -> float | None:
        """Replays :func:`eqbench.timing.budget_plan` on the seconds per iteration that
        calibration cells measured (scaled linearly to this batch size): warm-up plus the planned
        epochs of each role and phase, plus the calibration cells' remainder (model
        construction, data). ``None`` when a needed iteration time was never measured."""
        from eqbench.tasks.pricing import remainder_seconds
        from eqbench.timing import budget_plan

        roles = [MODEL, REFERENCE] if self._with_reference(params, model) else [MODEL]
        per_iteration: dict[tuple[str, str], list[float]] = {}
        remainders = []
        for cell in calibration:
            cp = cell.config.get("params", {})
            values = {r.metric: r.value for r in cell.records}
            accounted = 0.0
            for phase in ("train", "sample"):
                for role, prefix in ((MODEL, ""), (REFERENCE, "reference_")):
                    seconds = values.get(f"{prefix}{phase}_iteration_s")
                    timed = values.get(f"{prefix}{phase}_timed_iterations")
                    if seconds is None or timed is None:
                        continue
                    accounted += (timed + cp["warmup"]) * seconds
                    per_iteration.setdefault((role, phase), []).append(
                        seconds * params["batch_size"] / cp["batch_size"])
            remainders.append(remainder_seconds(cell, accounted))
        if not remainders:
            return None
        total = statistics.median(remainders)
        for phase in ("train", "sample"):
            if any((role, phase) not in per_iteration for role in roles):
                return None
            seconds = {role: statistics.median(per_iteration[(role, phase)]) for role in roles}
            plans = {role: budget_plan(seconds[role], params[f"{phase}_epochs"], params[f"{phase}_iterations"],
                                       float(params["budget_s"])) for role in roles}
            epochs = min(plan[0] for plan in plans.values())
            total += sum((params["warmup"] + epochs * plans[role][1]) * seconds[role] for role in roles)
        return total

    def run_cell(self, ctx: CellContext) -> list[Record]:
        import torch

        from eqbench.components import build_model
        from eqbench.data.loading import load_data
        from eqbench.timing import sample_step, stable_malloc, train_step

        p = ctx.params
        malloc = stable_malloc()
        reference = p["reference_model"]
        with_reference = self._with_reference(p, ctx.model)
        flows = {}
        torch.manual_seed(ctx.seed)
        flows[MODEL] = build_model(ctx.model, ctx.system, model_config_for(ctx.model, p)).to(ctx.device)
        if with_reference:
            torch.manual_seed(ctx.seed)
            flows[REFERENCE] = build_model(reference, ctx.system).to(ctx.device)
        dtype = next(flows[MODEL].parameters()).dtype
        data = load_data(ctx.system, "train", n=p["n_data"], seed=ctx.seed, dtype=dtype, device=ctx.device)
        train_steps, sample_steps = {}, {}
        for role, flow in flows.items():
            flow_data = data.to(next(flow.parameters()).dtype)
            train_steps[role] = train_step(flow, flow_data, batch=p["batch_size"],
                                           generator=torch.Generator().manual_seed(ctx.seed))
            sample_steps[role] = sample_step(flow, ctx.system, batch=p["batch_size"])

        records = [ctx.record("n_parameters", flows[MODEL].n_parameters, "count"),
                   ctx.record("stable_malloc", float(malloc), "1 = glibc mallopt applied")]
        for phase, steps, epochs_key, iters_key in (("train", train_steps, "train_epochs", "train_iterations"),
                                                    ("sample", sample_steps, "sample_epochs", "sample_iterations")):
            records += self._measure(ctx, phase, steps, p[epochs_key], p[iters_key], reference, with_reference)
        check_finite(records)
        return records

    @staticmethod
    def _measure(ctx: CellContext, phase: str, steps: Mapping[str, Any], epochs: int, iterations: int,
                 reference: str, with_reference: bool) -> list[Record]:
        """Warm up, size the plan to the budget, time interleaved epochs, and make the records."""
        from eqbench.timing import budget_plan, interleaved_epochs, synchronize

        p = ctx.params
        plans = {}
        for role, step in steps.items():
            for _ in range(p["warmup"]):
                synchronize(ctx.device)
                start = time.perf_counter()
                step()
                synchronize(ctx.device)
                first = time.perf_counter() - start
            plans[role] = budget_plan(first, epochs, iterations, float(p["budget_s"]))
        n_epochs = min(plan[0] for plan in plans.values())
        per_epoch = {role: plan[1] for role, plan in plans.items()}
        seconds = interleaved_epochs(steps, epochs=n_epochs, iterations=per_epoch, device=ctx.device,
                                     progress=show_progress(ctx.progress), desc=f"timing {ctx.model} {phase}")
        unit = f"s per {phase} iteration, batch {p['batch_size']}"
        own = seconds[MODEL]
        records = [
            ctx.record(f"{phase}_iteration_s", statistics.fmean(own), f"{unit}, mean over epochs"),
            ctx.record(f"{phase}_iteration_s_std", statistics.stdev(own) if len(own) > 1 else 0.0,
                       f"{unit}, std over epochs"),
            ctx.record(f"{phase}_timed_iterations", n_epochs * per_epoch[MODEL],
                       f"count ({n_epochs} epochs x {per_epoch[MODEL]} iterations)"),
        ]
        if with_reference:
            ref = seconds[REFERENCE]
            ratio, ratio_std = ratio_stats(own, ref)
            records += [
                ctx.record(f"reference_{phase}_iteration_s", statistics.fmean(ref), f"{unit}, {reference}, mean"),
                ctx.record(f"reference_{phase}_iteration_s_std", statistics.stdev(ref) if len(ref) > 1 else 0.0,
                           f"{unit}, {reference}, std over epochs"),
                ctx.record(f"reference_{phase}_timed_iterations", n_epochs * per_epoch[REFERENCE],
                           f"count ({n_epochs} epochs x {per_epoch[REFERENCE]} iterations)"),
                ctx.record(f"{phase}_ratio_to_reference", ratio, f"ratio to {reference}, mean / mean"),
                ctx.record(f"{phase}_ratio_to_reference_std", ratio_std, f"ratio to {reference}, std over epochs"),
            ]
        elif reference:  # the model is the reference: 1 by definition
            records += [ctx.record(f"{phase}_ratio_to_reference", 1.0, f"ratio to {reference} (itself)"),
                        ctx.record(f"{phase}_ratio_to_reference_std", 0.0, f"ratio to {reference} (itself)")]
        return records

    # ------------------------------------------------------------------------------------ plot
    def plot(self, table: pandas.DataFrame, out_dir: Path) -> list[Path]:
        """Bars per system and model: seconds per training and per sampling iteration (± std over
        epochs), and their ratios to the reference model on log axes (Table 2: compare ratios).
        Several seeds are averaged."""
        import numpy as np

        from eqbench.plots import metric_rows, new_figure, save_figure

        panels = [("train_iteration_s", "s per training iteration"),
                  ("sample_iteration_s", "s per sampling iteration (exact weights)"),
                  ("train_ratio_to_reference", "training time / reference"),
                  ("sample_ratio_to_reference", "sampling time / reference")]
        if metric_rows(table, [m for m, _ in panels]).empty:
            return []
        systems = sorted(table["system"].unique())
        models = sorted(table["model"].unique())
        fig, axes = new_figure(len(panels), width=4.2, height=3.8)
        width = 0.8 / max(1, len(models))
        for ax, (metric, label) in zip(axes, panels):
            for k, model in enumerate(models):
                means, errs = [], []
                for system in systems:
                    sel = table[(table["system"] == system) & (table["model"] == model)]
                    values = metric_rows(sel, metric)["value"]
                    stds = metric_rows(sel, f"{metric}_std")["value"]
                    means.append(values.mean() if not values.empty else np.nan)
                    errs.append(stds.mean() if not stds.empty else 0.0)
                xs = np.arange(len(systems)) + (k - (len(models) - 1) / 2) * width
                ax.bar(xs, means, width=width, yerr=errs, capsize=2, label=model)
            ax.set_xticks(np.arange(len(systems)), systems)
            ax.set_yscale("log")
            ax.set_ylabel(label)
            if metric.endswith("_to_reference"):
                ax.axhline(1.0, color="black", linewidth=0.8)
                units = metric_rows(table, metric)["unit"].dropna().astype(str)
                ref = units.iloc[0].removeprefix("ratio to ").split(",")[0].split(" (")[0] if not units.empty else ""
                ax.set_title(f"{label.split(' /')[0]} relative to {ref}")
            else:
                ax.set_title(label.split(" (")[0])
        axes[0].legend(fontsize=7)
        return save_figure(fig, out_dir, "timing")

    def report_section(self) -> TaskSection:
        """Seconds and ratios per settings key beside Table 2 (its ratios computed from its
        seconds); decides the claim that the kernel flow is the fastest."""
        return _report_section()


# -- report (what eqbench.report shows of this task) --------------------------------------------

#: The paper's kernel flow: Table 2 compares the other models with it, and it is this task's
#: default ``reference_model``, so the claim below is by nature about this model id.
PAPER_REFERENCE = "kernel-flow"
_RATIOS = ("train_ratio_to_reference", "sample_ratio_to_reference")
_TABLE2 = {"train": "train_time_10_iterations_s", "sample": "sample_time_10_iterations_s"}


def _ratio_rows(ok: pandas.DataFrame, reference: str = PAPER_REFERENCE) -> pandas.DataFrame:
    """Timing ratios to ``reference``, which each ratio's unit names (``"ratio to en-flow, ..."``).
    Rows without the name (tables from before it was recorded) count as the paper's kernel flow."""
    rows = ok[(ok["task"] == "timing") & ok["metric"].isin(_RATIOS)]
    ref = rows["unit"].astype(str).str.extract(r"^ratio to ([^,( ]+)", expand=False)
    named = ref == reference
    return rows[named | ref.isna()] if reference == PAPER_REFERENCE else rows[named]


def _table2_ratio(baselines: pandas.DataFrame, system: str, model: str, kind: str) -> float | None:
    """Table 2's seconds of ``model`` over the kernel flow's, on ``system``; ``None`` if absent."""
    if baselines.empty:
        return None
    t2 = baselines[(baselines["table"] == "Table 2") & (baselines["system"] == system)
                   & (baselines["metric"] == _TABLE2[kind])].set_index("model")["value"]
    if model in t2.index and PAPER_REFERENCE in t2.index:
        return float(t2[model]) / float(t2[PAPER_REFERENCE])
    return None


def claim_kernel_fastest(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> ClaimResult:
    """The kernel flow trains and samples fastest (B.1, Table 2).

    The paper compares it with the equivariant gradient flows of Table 2 (the models Table 2 lists
    beside the kernel flow in ``published.csv``; ``gradient-flow`` and ``schnet-flow`` when the
    baselines file is missing). Threshold: reproduced when every settings key of every such model
    has training and sampling ratios to the kernel flow (means over seeds) above 1 on every system.
    Other models' ratios (e.g. the non-equivariant nODE, which Table 2 does not list) and the
    ``closed-form`` rows (eqbench's estimator, not Table 2's) are quoted but do not decide the verdict.
    """
    if not baselines.empty:
        compared = sorted(set(baselines.loc[baselines["table"] == "Table 2", "model"]) - {PAPER_REFERENCE})
    else:
        compared = ["gradient-flow", "schnet-flow"]
    stats = seed_stats(_ratio_rows(ok), _RATIOS)
    stats = stats[stats["model"] != PAPER_REFERENCE]
    if not stats["model"].isin(compared).any():
        return ClaimResult(NOT_MEASURED, f"needs timing rows of {' and '.join(compared)} (ratios to the kernel flow).")
    parts, extra, points, passed = [], [], [], True
    for _, g in stats.groupby("settings_key", sort=False):
        by = {r["metric"]: r for _, r in g.iterrows()}
        first = g.iloc[0]
        # Table 2's claim is about Table 2's estimators: eqbench's closed-form rows are quoted only.
        decisive = first["model"] in compared and str(first.get("variant") or "") != _VARIANTS["closed-form"]
        texts = []
        for kind in ("train", "sample"):
            r = by.get(f"{kind}_ratio_to_reference")
            if r is None:
                texts.append(f"{kind} –")
                if decisive:
                    passed = False
                continue
            texts.append(f"{kind} ×{describe(r, 3)}")
            if decisive:
                passed = passed and float(r["mean"]) > 1
            points.append(Point(f"{short_name(r, system=True)}: {kind}", float(r["mean"]),
                                float(r["std"]) if r["n_seeds"] > 1 else math.nan, int(r["n_seeds"]),
                                _table2_ratio(baselines, str(r["system"]), str(r["model"]), kind)))
        text = f"{first['system']} {settings_name(first)}: " + ", ".join(texts)
        (parts if decisive else extra).append(text)
    sentence = "slower than the kernel flow by: " + "; ".join(parts)
    if extra:
        sentence += " (not Table 2's models or estimators, not decisive: " + "; ".join(extra) + ")"
    return ClaimResult(REPRODUCED if passed else NOT_REPRODUCED, sentence + ".", tuple(points),
                       "time / kernel-flow time")


#: The peer of Midgley et al.'s sampling-speed claim (NeurIPS 2023, §6): the E(n)-equivariant CNF.
PEER_CNF = "en-flow"
#: "More than an order of magnitude faster": the coupling flow's sampling time over the CNF's.
SPEEDUP_THRESHOLD = 0.1
#: The systems the claim was made on.
_SPEED_CLAIM_SYSTEMS = ("dw4", "lj13")


def claim_coupling_samples_faster(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> ClaimResult:
    """An equivariant augmented coupling flow samples with exact log-weights more than 10x faster
    than the E(n)-equivariant CNF (Midgley et al. 2023, §6), on DW-4 and LJ-13.

    Rows: sampling-time ratios of every learned equivariant augmented flow (capabilities
    ``augmented``, ``equivariant``, ``trainable``) to :data:`PEER_CNF`, measured in one cell with
    interleaved epochs (``reference_model = "en-flow"``). Both sides sample with exact
    log-weights: the CNF integrates its exact (brute-force) divergence, the coupling flow returns
    its exact joint density. Reproduced when every such settings key has a mean ratio below 0.1
    on both systems; not measured while a system has no such rows.
    """
    rows = _ratio_rows(ok, PEER_CNF)
    if not rows.empty:
        rows = rows[has_capability(rows, "augmented") & is_equivariant_flow(rows)]
    stats = seed_stats(rows, _RATIOS)
    missing = [s for s in _SPEED_CLAIM_SYSTEMS if not (stats["system"] == s).any()]
    if missing:
        return ClaimResult(NOT_MEASURED, f"needs sampling-time ratios of an equivariant augmented flow to {PEER_CNF} "
                                         f"timed in one cell (timing with reference_model = \"{PEER_CNF}\") on "
                                         f"{' and '.join(missing)}.")
    parts, points, passed = [], [], True
    for _, g in stats.groupby("settings_key", sort=False):
        by = {r["metric"]: r for _, r in g.iterrows()}
        first = g.iloc[0]
        sample = by.get("sample_ratio_to_reference")
        if sample is None:
            passed = False
            parts.append(f"{first['system']} {settings_name(first)}: sampling not timed")
            continue
        passed = passed and float(sample["mean"]) < SPEEDUP_THRESHOLD
        train = by.get("train_ratio_to_reference")
        text = f"{first['system']} {settings_name(first)}: sampling ×{describe(sample, 3)}"
        if train is not None:
            text += f", training ×{describe(train, 3)}"
        parts.append(text)
        points.append(Point(f"{short_name(sample, system=True)}: sample", float(sample["mean"]),
                            float(sample["std"]) if sample["n_seeds"] > 1 else math.nan, int(sample["n_seeds"])))
    return ClaimResult(REPRODUCED if passed else NOT_REPRODUCED,
                       f"time relative to {PEER_CNF} (threshold < {SPEEDUP_THRESHOLD:g}): " + "; ".join(parts) + ".",
                       tuple(points), f"time / {PEER_CNF} time")


def _ratio_table(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> list[HtmlTable]:
    """Measured ratios to the kernel flow, one row per settings key, beside Table 2's ratios
    computed from its seconds."""
    stats = seed_stats(_ratio_rows(ok), _RATIOS)
    stats = stats[stats["model"] != PAPER_REFERENCE]
    if stats.empty:
        return []
    rows = []
    for _, g in stats.groupby("settings_key", sort=False):
        by = {r["metric"]: r for _, r in g.iterrows()}
        first = g.iloc[0]
        cells = [str(first["profile"]), str(first["system"]), str(first["model"]), str(first["settings"])]
        seeds = 0
        for kind in ("train", "sample"):
            r = by.get(f"{kind}_ratio_to_reference")
            cells.append("–" if r is None else pm(float(r["mean"]), float(r["std"]), int(r["n_seeds"])))
            published = _table2_ratio(baselines, str(first["system"]), str(first["model"]), kind)
            cells.append("–" if published is None else fmt(published, 3))
            seeds = max(seeds, 0 if r is None else int(r["n_seeds"]))
        rows.append(cells + [str(seeds)])
    rows.sort()
    return [HtmlTable(caption="Ratio to the kernel flow: measured here (mean ± std across seeds, per settings key) "
                              "vs Table 2 (ratio of its seconds)",
                      header=["profile", "system", "model", "settings", "train: measured", "train: Table 2",
                              "sample: measured", "sample: Table 2", "seeds"], rows=rows)]


def _pair_parameters(row: dict[str, Any]) -> tuple[str, str, str] | None:
    """C.1-C.5 parameter counts are recorded under the same metric name by every training task."""
    return (row["model"], "", "n_parameters") if row["metric"] == "n_parameters" else None


def _report_section() -> TaskSection:
    return TaskSection(
        task="timing",
        title="Training and sampling time per iteration",
        paper="B.1, Table 2",
        conventions="Seconds per iteration at batch 64 on this machine (Table 2 prints seconds per 10 iterations "
                    "on a GTX 1080 Ti). Only ratios between models carry over between machines: "
                    "ratio = model time / kernel-flow time, measured in the same cell with interleaved epochs. "
                    "The published ratios below are computed from Table 2's seconds.",
        metrics=("train_iteration_s", "sample_iteration_s", "train_ratio_to_reference",
                 "sample_ratio_to_reference", "n_parameters"),
        baseline=lambda r: r["table"] == "Table 2",
        pair=_pair_parameters,
        extra_tables=_ratio_table,
        claims=(Claim("kernel-fastest", "The kernel flow is the fastest to train and sample", "B.1, Table 2",
                      claim_kernel_fastest),
                Claim("coupling-samples-faster",
                      "The SE(3) augmented coupling flow samples with exact log-weights more than 10x faster "
                      "than the E(n)-equivariant CNF", "Midgley et al. 2023, §6",
                      claim_coupling_samples_faster, needs=("augmented", "equivariant", "trainable"),
                      source="midgley2023")),
        order=6,
    )


TASK = Timing()
