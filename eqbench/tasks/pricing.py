"""Pricing one cell from finished cells: the primitives a task's price rule is made of.

A task names its timed phases and their work (:meth:`~eqbench.tasks.base.Task.cost_phases`);
these functions turn measured cells into seconds per unit of work. They live in the tasks layer
because tasks use them in :meth:`~eqbench.tasks.base.Task.estimate_seconds`; the sweep-level cost
model (:mod:`eqbench.cost`) sits above and calls the tasks (DESIGN "Layers, one direction").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from eqbench.errors import ConfigError
from eqbench.records import CellResult

if TYPE_CHECKING:
    from eqbench.tasks.base import Task

__all__ = ["phase_estimate", "phase_seconds", "remainder_seconds"]


def phase_seconds(cell: CellResult, phases: Iterable[str]) -> dict[str, float]:
    """Measured seconds of each phase in ``phases`` that ``cell`` recorded (summed over steps,
    e.g. over the rounds of a metastable-states cell)."""
    wanted = set(phases)
    seconds: dict[str, float] = {}
    for record in cell.records:
        if record.metric in wanted and math.isfinite(record.value):
            seconds[record.metric] = seconds.get(record.metric, 0.0) + float(record.value)
    return seconds


def remainder_seconds(cell: CellResult, accounted_s: float) -> float:
    """What the phases of a cell do not account for (never negative)."""
    return max(0.0, float(cell.duration_s) - accounted_s)


def phase_estimate(task: Task, params: Mapping[str, Any], system: str,
                   calibration: Sequence[CellResult]) -> float | None:
    """The default price of a cell: work x pooled seconds per unit of work, phase by phase, plus
    the unaccounted remainder of the calibration cells nearest in total work.

    ``None`` when the task defines no phases or a phase with work has never been measured.
    """
    work = {phase: float(w) for phase, w in task.cost_phases(params, system).items()}
    if not work or not calibration:
        return None
    seconds_sum: dict[str, float] = {}
    work_sum: dict[str, float] = {}
    sized_remainders: list[tuple[float, float]] = []  # (log total work, remainder seconds)
    for cell in calibration:
        try:
            cell_work = task.cost_phases(cell.config.get("params", {}), system)
        except (ConfigError, KeyError, TypeError, ValueError):
            continue  # settings of an older version of the task: not comparable
        measured = phase_seconds(cell, cell_work)
        for phase, amount in cell_work.items():
            if amount > 0 and phase in measured:
                seconds_sum[phase] = seconds_sum.get(phase, 0.0) + measured[phase]
                work_sum[phase] = work_sum.get(phase, 0.0) + float(amount)
        total = sum(cell_work.values())
        sized_remainders.append((math.log(total) if total > 0 else 0.0,
                                 remainder_seconds(cell, sum(measured.values()))))
    if not sized_remainders:
        return None
    price = 0.0
    for phase, amount in work.items():
        if amount <= 0:
            continue
        if not work_sum.get(phase):
            return None
        price += amount * seconds_sum[phase] / work_sum[phase]
    total_new = sum(work.values())
    size = math.log(total_new) if total_new > 0 else 0.0
    nearest = min(abs(s - size) for s, _ in sized_remainders)
    price += statistics.median(r for s, r in sized_remainders if abs(s - size) == nearest)
    return price
