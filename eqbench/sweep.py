"""Sweeps: one task over many models x systems x grid points x seeds, resumable, on any executor.

``sweep`` expands the task's profile for every requested (model, system) pair, sets aside pairs
the task does not support (with the task's reason, instead of failing the whole sweep), skips
cells already finished (same config hash, status ok) and runs the rest on an executor from
:mod:`eqbench.executors`. Results land in the same per-cell store as ``eqbench run``, so a
sweep and single runs share finished cells, and ``collect`` / ``report`` read them alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqbench.components import default_data_systems
from eqbench.cost import CellEstimate, CostModel
from eqbench.errors import ConfigError
from eqbench.executors import CellJob, SlurmOptions, make_executor, remove_stale_claims, run_jobs
from eqbench.records import CellResult, CellStore, check_results_dir
from eqbench.registry import MODELS, SYSTEMS, TASKS
from eqbench.snapshots import DEFAULT_SNAPSHOT_EVERY_S, check_snapshot_interval
from eqbench.workers import ProgressLines, check_time_limit
from eqbench.planning import CellPlan, NoCellsError, check_data_for, default_results_dir, plan_cells

__all__ = ["SweepPlan", "plan_sweep", "price_plan", "run_cells", "sweep", "default_threads"]


@dataclass
class SweepPlan:
    """The cells of a sweep: to run, already finished, and (model, system) pairs set aside."""

    todo: list[CellPlan] = field(default_factory=list)
    done: list[CellPlan] = field(default_factory=list)
    #: (model, system, reason): pairs the task does not support, and pairs that select no cell
    #: (:class:`~eqbench.planning.NoCellsError`); a sweep in which every pair selects none is refused.
    unsupported: list[tuple[str, str, str]] = field(default_factory=list)


def plan_sweep(
    task: str,
    models: Sequence[str] | None = None,
    systems: Sequence[str] | None = None,
    profile: str = "smoke",
    *,
    seeds: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    results_dir: str | Path | None = None,
    rerun: bool = False,
) -> SweepPlan:
    """Expand the grid; ``seeds=K`` runs seeds 0..K-1 instead of the profile's list.

    Without ``models``, the built-in models (origin ``eqbench``: the paper's, and the Gaussian
    baseline); plugins run only when named. A model-independent reference cell
    (:meth:`~eqbench.tasks.base.Task.reference_params`) is planned once, however many models
    ask for it. ``results_dir`` defaults to ``results/<profile>`` (:func:`eqbench.runner.default_results_dir`).
    """
    task_obj = TASKS.get(task)
    models = list(models) if models else [e.name for e in MODELS.entries() if e.origin == "eqbench"]
    # A task for any system sweeps every registered one except those whose data are made only on
    # request (eqbench.components.DATA_ON_REQUEST: lj13-single), which run when named.
    systems = list(systems) if systems else list(task_obj.systems or default_data_systems())
    for name in systems:
        SYSTEMS.get(name)
    for name in models:
        MODELS.get(name)
    overrides = dict(overrides or {})
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds must be a positive count, got {seeds}")
        overrides["seeds"] = list(range(seeds))
    store = CellStore(check_results_dir(default_results_dir(profile) if results_dir is None else results_dir,
                                        write=False))
    plan = SweepPlan()
    planned: set[str] = set()  # cell ids: a reference cell is shared by every model
    empty: list[str] = []  # why pairs that the task supports selected no cell
    for system in systems:
        for model in models:
            try:
                task_obj.check_supported(system, model)
            except ConfigError as exc:
                plan.unsupported.append((model, system, str(exc)))
                continue
            try:
                cells = plan_cells(task, model, system, profile, overrides=overrides)
            except NoCellsError as exc:  # e.g. augment = [true] only, on an equivariant model
                plan.unsupported.append((model, system, str(exc)))
                empty.append(str(exc))
                continue
            for cell in cells:
                if cell.cell_id in planned:
                    continue
                planned.add(cell.cell_id)
                finished = not rerun and store.is_done(cell.task, cell.cell_id)
                (plan.done if finished else plan.todo).append(cell)
    if empty and not plan.todo and not plan.done:
        others = f" (and {len(empty) - 1} more model/system pairs)" if len(empty) > 1 else ""
        raise NoCellsError(f"{empty[0]}{others}")
    return plan


def price_plan(cells: Sequence[CellPlan], calibration_dirs: Sequence[str | Path],
               device: str = "cpu") -> dict[str, CellEstimate]:
    """Each cell's estimated seconds and basis (:mod:`eqbench.cost`), calibrated from the
    finished cells of ``calibration_dirs`` on the same kind of device.

    Run a smaller profile first (``--profile quick``, or ``--seeds 1``): ``--dry-run`` then
    prices the grid from what this machine actually took.
    """
    return CostModel.from_results(calibration_dirs, device=device).estimate_all(cells)


def default_threads(jobs: int) -> int:
    """Torch threads per worker so that ``jobs`` workers share the cores without oversubscribing."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def sweep(
    task: str,
    models: Sequence[str] | None = None,
    systems: Sequence[str] | None = None,
    profile: str = "smoke",
    *,
    seeds: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    executor: str = "local",
    jobs: int = 1,
    threads: int | None = None,
    device: str = "cpu",
    time_limit_s: float | None = None,
    results_dir: str | Path | None = None,
    rerun: bool = False,
    address: str | None = None,
    slurm: SlurmOptions | None = None,
    progress: bool | None = None,
    on_plan: Callable[[SweepPlan], None] | None = None,
    artifacts: bool = True,
    snapshot_every_s: float | None = DEFAULT_SNAPSHOT_EVERY_S,
) -> tuple[SweepPlan, list[CellResult]]:
    """Plan and run a sweep; returns the plan and the results of the cells run now.

    ``on_plan`` sees the plan before any cell starts (the CLI prints its price there). Each worker
    runs :func:`eqbench.runner.preflight` on a model before that model's first cell in it (model
    code never runs in this process: a model that kills its process must only fail its cells); a
    model that breaks the contract fails its cells with the breach as their reason.

    ``time_limit_s`` (a positive number, checked before any work): a cell running longer becomes
    a failed cell "cell exceeded its time limit of N s"; a local worker in which it fired is
    replaced. Without a terminal (``progress=None``, stderr not a TTY) a line per finished cell,
    and one a minute in between, goes to stderr (:class:`~eqbench.workers.ProgressLines`).

    ``snapshot_every_s``: each cell's training saves its state this often (``None``: never), so
    a cell stopped by its limit, or a killed sweep, resumes mid-training when run again, with the
    numbers of an uninterrupted run (:mod:`eqbench.snapshots`); ``rerun`` starts cells afresh."""
    time_limit_s = check_time_limit(time_limit_s)
    snapshot_every_s = check_snapshot_interval(snapshot_every_s)
    results_dir = check_results_dir(default_results_dir(profile) if results_dir is None else results_dir)  # before any work
    plan = plan_sweep(task, models, systems, profile, seeds=seeds, overrides=overrides,
                      results_dir=results_dir, rerun=rerun)
    if on_plan is not None:
        on_plan(plan)
    if not plan.todo:
        return plan, []
    if rerun:
        store = CellStore(results_dir)
        for cell in plan.todo:
            store.remove_snapshots(cell.task, cell.cell_id)
    results = run_cells(plan.todo, results_dir, executor=executor, jobs=jobs, threads=threads, device=device,
                        time_limit_s=time_limit_s, address=address, slurm=slurm, progress=progress,
                        artifacts=artifacts, desc=f"sweep {task}", snapshot_every_s=snapshot_every_s)
    return plan, results


def run_cells(
    cells: Sequence[CellPlan],
    results_dir: str | Path,
    *,
    executor: str = "local",
    jobs: int = 1,
    threads: int | None = None,
    device: str = "cpu",
    time_limit_s: float | None = None,
    address: str | None = None,
    slurm: SlurmOptions | None = None,
    progress: bool | None = None,
    artifacts: bool = True,
    desc: str = "cells",
    snapshot_every_s: float | None = DEFAULT_SNAPSHOT_EVERY_S,
) -> list[CellResult]:
    """Run planned cells (of any tasks) on one executor, in the given order; returns their results.

    What :func:`sweep` does after planning, for callers that plan cells of several tasks at once
    (:mod:`eqbench.demo`): one pool keeps both workers busy across task boundaries. Checks the
    data before any cell, clears what a killed earlier run left, and reports progress like a
    sweep; ``time_limit_s`` must already be checked (:func:`eqbench.workers.check_time_limit`).
    """
    from tqdm.auto import tqdm

    from eqbench.tasks.common import show_progress

    if not cells:
        return []
    check_data_for(cells)  # a read-only cache without the data: one line, before any cell
    CellStore(results_dir).remove_orphaned_temps()  # what a killed earlier sweep left mid-write
    remove_stale_claims(results_dir)  # ... and the claims of its cells
    if device != "auto":
        from eqbench.devices import resolve_device

        device = resolve_device(device)
    jobs_list = [CellJob(cell, str(results_dir), device, threads or default_threads(jobs), time_limit_s, artifacts,
                         snapshot_every_s) for cell in cells]
    runner = make_executor(executor, jobs=jobs, results_dir=results_dir, address=address, slurm=slurm)
    bar = tqdm(total=len(jobs_list), desc=desc, disable=not show_progress(progress), unit="cell")
    lines = ProgressLines(desc, len(jobs_list), enabled=progress is None and not show_progress(None))

    def advance(result: CellResult) -> None:
        bar.update(1)
        lines.update(result.status == "ok")
        if result.status != "ok":
            bar.write(f"failed cell {result.cell_id} ({result.config.get('model')}, {result.config.get('system')}): "
                      f"{result.reason}")

    try:
        with lines:
            return run_jobs(runner, jobs_list, on_result=advance)
    finally:
        bar.close()
