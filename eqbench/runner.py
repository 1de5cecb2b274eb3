"""Run a task: expand its profile into cells, skip finished ones, record each cell atomically.

A cell that raises or produces a non-finite value is stored as a failed cell with its reason
and never stops the others (Standards: "a crash or a NaN in one cell ... never corrupts other
results"). Invalid requests (unknown names, bad settings) are refused before any work.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eqbench.config import apply_overrides, expand_grid
from eqbench.devices import resolve_device
from eqbench.errors import ConfigError, EqbenchError
from eqbench.records import CellResult, CellStore, Record, cell_id, now_iso, provenance
from eqbench.registry import MODELS, SYSTEMS, TASKS
from eqbench.tasks.base import CellContext, Task

__all__ = ["CellPlan", "plan_cells", "run", "run_cell"]


@dataclass(frozen=True)
class CellPlan:
    task: str
    model: str
    system: str
    profile: str
    seed: int
    params: Mapping[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return {"task": self.task, "model": self.model, "system": self.system, "profile": self.profile,
                "seed": self.seed, "params": dict(self.params)}

    @property
    def cell_id(self) -> str:
        return cell_id(self.config)


def _seed_list(params: Mapping[str, Any], seed: int | None) -> list[int]:
    if seed is not None:
        seeds: Any = [seed]
    else:
        seeds = params.get("seeds", [0])
        seeds = seeds if isinstance(seeds, list) else [seeds]
    for value in seeds:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"seeds must be non-negative integers, got {value!r}")
    return list(seeds)


def plan_cells(
    task: str,
    model: str,
    system: str,
    profile: str = "smoke",
    *,
    seed: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[CellPlan]:
    """Resolve names and settings and list the cells to run; raises before any work if invalid."""
    task_obj: Task = TASKS.get(task)
    SYSTEMS.get(system)
    MODELS.get(model)
    task_obj.check_supported(system, model)
    params = apply_overrides(task_obj.profile(profile), overrides or {}, f"task {task} profile {profile}")
    seeds = _seed_list(params, seed)
    params.pop("seeds", None)
    plans = []
    for point in expand_grid(params, task_obj.grid_axes):
        task_obj.validate(point)
        for cell_params in task_obj.expand_cell(point, model, system):
            plans.extend(CellPlan(task, model, system, profile, s, cell_params) for s in seeds)
    return plans


def run_cell(plan: CellPlan, *, device: str = "cpu", progress: bool | None = None) -> CellResult:
    """Run one cell in this process; failures become a failed :class:`CellResult`, never an exception."""
    started, start = now_iso(), time.perf_counter()
    status, reason, records = "ok", "", []
    try:
        import torch

        torch.manual_seed(plan.seed)
        ctx = CellContext(task=plan.task, model=plan.model, system=SYSTEMS.get(plan.system)(),
                          params=plan.params, seed=plan.seed, device=device, progress=progress)
        records = TASKS.get(plan.task).run_cell(ctx)
        bad = [r.metric for r in records if not math.isfinite(r.value)]
        if bad:
            status, reason = "failed", f"non-finite value for {', '.join(bad)}"
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a crash in one cell is recorded, the sweep goes on
        status = "failed"
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
        if not isinstance(exc, EqbenchError):
            reason += f" [{traceback.extract_tb(exc.__traceback__)[-1].name}]"
    return CellResult(task=plan.task, cell_id=plan.cell_id, config=plan.config, status=status, reason=reason,
                      started_at=started, duration_s=time.perf_counter() - start,
                      provenance=provenance(device), records=records)


def run(
    task: str,
    model: str,
    system: str,
    profile: str = "smoke",
    *,
    seed: int | None = None,
    device: str = "cpu",
    overrides: Mapping[str, Any] | None = None,
    results_dir: str | Path = "results",
    rerun: bool = False,
    progress: bool | None = None,
) -> list[CellResult]:
    """Run every cell of a task profile for one model and system.

    Finished cells (same config hash, status ok) are read back instead of rerun. ``device`` is
    ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; it is provenance, not part of the cell id.
    """
    device = resolve_device(device)
    plans = plan_cells(task, model, system, profile, seed=seed, overrides=overrides)
    store = CellStore(results_dir)
    results = []
    for plan in plans:
        if not rerun and store.is_done(plan.task, plan.cell_id):
            cached = store.read(plan.task, plan.cell_id)
            if cached is not None:
                results.append(cached)
                continue
        result = run_cell(plan, device=device, progress=progress)
        store.write(result)
        results.append(result)
    return results


def records_of(results: Sequence[CellResult]) -> list[Record]:
    return [record for result in results for record in result.records]
