"""The demo: every claim of the paper judged from three seeds in one short run (``make demo``).

The paper makes five claims that eqbench judges (:func:`eqbench.report.evaluate_claims`):
equivariant flows generalise from few samples (§7.3), reweighting works for equivariant flows
only (§7.4), exact divergence is needed for reweighting (§7.1, Fig. 3b), the equivariant flow
finds all five DW-4 minima (§7.5), and the kernel flow is the fastest to train and sample (B.1,
Table 2). :data:`DEMO_STEPS` names, for each claim, the smallest set of ``quick``-profile cells
that decides it: the paper's models on the double-well systems, three seeds each, with the
``quick`` profile's settings except where a step narrows them (fewer training-set sizes, fewer
iterations and samples). Those narrowed settings are part of every cell's settings key, so the
demo's rows never pool with a plain ``quick`` run's, and the report names them beside each
verdict. A verdict from the demo is a quick-budget verdict; ``--profile paper`` sweeps give the
paper's budgets.

All cells of all steps run in one worker pool (:func:`eqbench.sweep.run_cells`), longest steps
first, so two workers stay busy across task boundaries; finished cells are skipped on a rerun,
as in any sweep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqbench.planning import CellPlan
from eqbench.sweep import SweepPlan, plan_sweep, run_cells

__all__ = ["DEMO_PROFILE", "DEMO_SEEDS", "DEMO_STEPS", "DemoStep", "headline_rows", "plan_demo", "run_demo"]

#: The profile every demo cell runs under: verdicts come only from ``quick`` and ``paper`` cells.
DEMO_PROFILE = "quick"
#: Seeds per settings key: a verdict needs its spread across seeds.
DEMO_SEEDS = 3


@dataclass(frozen=True)
class DemoStep:
    """One task's cells in the demo: ``models`` x ``systems`` x the task's quick grid narrowed by
    ``overrides``, seeds 0 .. :data:`DEMO_SEEDS` - 1; ``claims`` are the claim keys it feeds."""

    task: str
    models: tuple[str, ...]
    systems: tuple[str, ...]
    claims: tuple[str, ...]
    overrides: Mapping[str, Any] = field(default_factory=dict)


#: Longest first (the pool takes cells in this order).
DEMO_STEPS: tuple[DemoStep, ...] = (
    # §7.5, Fig. 7a: trained on one noisy minimum (ML, then the λ = 0.5 ML/KL mix), the kernel
    # flow reaches all five minima; the nODE's count is quoted beside it. Only the flow's own
    # method is needed (no MCMC references).
    DemoStep("metastable-states", ("kernel-flow", "node"), ("dw4",), ("dw4-minima",),
             {"variant": ["flow"], "rounds": 1, "ml_iterations": 300, "mix_iterations": 250}),
    # §7.4: the kernel flow reweights DW-4 to the MCMC mean energy, the nODE (with and without
    # augmentation) does not; Fig. 3b: on DW-2 the Hutchinson log q ruins the free-energy profile.
    DemoStep("bg-reweighting", ("kernel-flow", "node"), ("dw4",), ("reweighting",),
             {"pretrain_iterations": 200, "mix_iterations": 200, "n_samples": 5000, "n_test": 5000}),
    DemoStep("bg-reweighting", ("kernel-flow",), ("dw2",), ("exact-divergence",),
             {"pretrain_iterations": 200, "mix_iterations": 200, "n_samples": 5000, "n_test": 5000}),
    # §7.3, Fig. 5: test NLL and train-test gap at the smallest training set.
    DemoStep("density-estimation", ("kernel-flow", "node"), ("dw4",), ("generalisation",), {"n_train": [10]}),
    # B.1, Table 2: seconds per training and sampling iteration against the kernel flow, timed in
    # the same cell with Table 2's estimators.
    DemoStep("timing", ("gradient-flow", "schnet-flow"), ("dw4",), ("kernel-fastest",),
             {"estimators": ["table-2"], "train_epochs": 3, "train_iterations": 2, "sample_epochs": 2,
              "sample_iterations": 1}),
)


def plan_demo(results_dir: str | Path, *, rerun: bool = False,
              steps: Sequence[DemoStep] | None = None) -> list[SweepPlan]:
    """Each step's sweep plan (cells to run and cells already finished in ``results_dir``);
    ``steps`` default to :data:`DEMO_STEPS`.

    Example:
        >>> plans = plan_demo("results/demo")
        >>> sorted({cell.task for plan in plans for cell in plan.todo + plan.done})
        ['bg-reweighting', 'density-estimation', 'metastable-states', 'timing']
    """
    return [plan_sweep(step.task, step.models, step.systems, DEMO_PROFILE, seeds=DEMO_SEEDS,
                       overrides=dict(step.overrides), results_dir=results_dir, rerun=rerun)
            for step in (DEMO_STEPS if steps is None else steps)]


def run_demo(results_dir: str | Path, *, jobs: int = 2, threads: int | None = 1, rerun: bool = False,
             progress: bool | None = None, artifacts: bool = True) -> list[Any]:
    """Run every demo cell not yet finished in ``results_dir`` (one pool of ``jobs`` workers);
    returns the results of the cells run now. The report is written by the caller."""
    todo: list[CellPlan] = []
    seen: set[str] = set()
    for plan in plan_demo(results_dir, rerun=rerun):
        for cell in plan.todo:
            if cell.cell_id not in seen:
                seen.add(cell.cell_id)
                todo.append(cell)
    return run_cells(todo, results_dir, jobs=jobs, threads=threads, progress=progress, artifacts=artifacts,
                     desc="demo")


def headline_rows(verdicts: Sequence[Any]) -> list[tuple[str, str, str, str, str]]:
    """``(claim, paper section, verdict, measured, paper)`` per judged claim, for the terminal and
    the README's opening table: each measured point as mean ± std (seeds), the paper's number
    where one exists. ``verdicts``: :func:`eqbench.report.evaluate_claims` of the demo's table.
    Only the paper's claims (``source = "kohler2020"``): the demo runs no cells for a peer's claim,
    which the report judges from the sweeps that feed it."""
    rows = []
    for cv in verdicts:
        if cv.claim.source != "kohler2020":
            continue
        result = cv.result
        measured = "; ".join(_point_text(p) for p in result.points) or "–"
        if result.points and result.quantity:
            measured = f"{result.quantity}: {measured}"
        published = "; ".join(f"{p.label}: {_num(p.published)}" for p in result.points if p.published is not None)
        rows.append((cv.claim.statement, cv.claim.paper, cv.verdict_text, measured, published or "–"))
    return rows


def _num(value: float) -> str:
    return f"{value:.3g}"


def _point_text(p: Any) -> str:
    spread = "" if p.std != p.std else f" ± {_num(p.std)}"  # NaN: a single seed
    return f"{p.label}: {_num(p.mean)}{spread} ({p.n_seeds} seeds)"
