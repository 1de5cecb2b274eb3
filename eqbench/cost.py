"""What a sweep cell will cost, priced from cells this machine has already finished.

A paper grid is hundreds of cells, some of them hours long, so ``sweep --dry-run`` prices it
before anything runs. Prices are measured, never assumed:

1. A finished cell with exactly the same settings (any seed) prices the cell directly: the
   median of their durations.
2. Otherwise the task scales finished cells of the same task, model, system and variant in *any*
   profile (a quick run prices the paper profile). By default (:func:`phase_estimate`) each task names
   the timed phases of a cell, i.e. the records that hold a phase's measured seconds
   (``train_wall_s``, ``minimize_wall_s`` ...), and the work each phase does for given settings
   (:meth:`~eqbench.tasks.base.Task.cost_phases`: training iterations x batch, configurations
   scored, Metropolis steps ...). Seconds per unit of work are pooled over the calibration
   cells; what no phase covers (data loading, model construction) is the remainder of the
   calibration cells nearest in size. Tasks whose cost is not linear in a few counts (repeat
   counts adapted to a time budget) override :meth:`~eqbench.tasks.base.Task.estimate_seconds`
   with their own rule from the same records.
3. Nothing comparable finished: the cell is unpriced (``None``) and says so; no guess.

A model-independent reference cell (model :data:`~eqbench.tasks.base.REFERENCE_MODEL`) is priced
from finished reference cells, including those that earlier versions ran under the model that
asked for them (:func:`priced_as`), so older calibration runs still price them.

Calibration cells must have run on the same kind of device (``cpu`` / ``cuda``) as the sweep
being priced. The estimate is per cell; :func:`wall_seconds` packs cells onto ``jobs`` workers.
"""

from __future__ import annotations

import heapq
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.errors import ConfigError, EqbenchError
from eqbench.records import CellResult, CellStore
from eqbench.tasks.base import REFERENCE_MODEL
from eqbench.tasks.pricing import phase_estimate, phase_seconds

if TYPE_CHECKING:
    from eqbench.planning import CellPlan

__all__ = ["CellEstimate", "CostModel", "PriceCheck", "check_prices", "device_kind", "phase_estimate", "phase_seconds",
           "priced_as", "wall_seconds"]


@dataclass(frozen=True)
class CellEstimate:
    """Predicted seconds of one cell (``None``: unpriced) and what the number rests on."""

    seconds: float | None
    basis: str


def device_kind(device: str | None) -> str:
    """``"cuda"`` or ``"cpu"`` (``cuda:1`` and ``auto`` on a GPU machine count as ``cuda``)."""
    device = (device or "cpu").lower()
    if device == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:  # pragma: no cover - torch is a dependency
            return "cpu"
    return "cuda" if device.startswith("cuda") else device.split(":")[0]


def priced_as(config: Mapping[str, Any]) -> tuple[Any, Mapping[str, Any]]:
    """The model and settings a finished cell prices under: its own, except for a cell its task
    declares model-independent (:meth:`~eqbench.tasks.base.Task.reference_params`) that was run
    under a model's name before such cells were shared: it prices the shared reference cell."""
    model, params = config.get("model"), config.get("params", {})
    if model != REFERENCE_MODEL:
        from eqbench.registry import TASKS

        try:
            shared = TASKS.get(config.get("task")).reference_params(params)
        except (EqbenchError, KeyError, TypeError, ValueError):  # a task not installed here, odd params
            shared = None
        if shared is not None:
            return REFERENCE_MODEL, shared
    return model, params


def _without_seed(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two cells' settings equal, whatever their seed and profile name."""
    model, params = priced_as(config)
    return (config.get("task"), model, config.get("system"), json.dumps(params, sort_keys=True, default=str))


class CostModel:
    """Prices cells from a set of finished cells (usually a results directory)."""

    def __init__(self, finished: Iterable[CellResult], device: str | None = "cpu"):
        kind = device_kind(device)
        self._cells = [c for c in finished
                       if c.status == "ok" and math.isfinite(c.duration_s)
                       and device_kind(c.provenance.get("device")) == kind]
        self._by_pair: dict[tuple[str, str, str], list[CellResult]] = {}
        self._by_settings: dict[tuple[Any, ...], list[CellResult]] = {}
        for cell in self._cells:
            cfg = cell.config
            self._by_pair.setdefault((cfg.get("task"), priced_as(cfg)[0], cfg.get("system")), []).append(cell)
            self._by_settings.setdefault(_without_seed(cfg), []).append(cell)

    @classmethod
    def from_results(cls, results_dirs: str | Path | Sequence[str | Path], device: str | None = "cpu") -> CostModel:
        """Calibrate from the finished cells of one or more results directories."""
        dirs = [results_dirs] if isinstance(results_dirs, str | Path) else list(results_dirs)
        return cls((cell for d in dirs for cell in CellStore(d).iter_cells()), device=device)

    def __len__(self) -> int:
        return len(self._cells)

    def estimate(self, plan: CellPlan, *, leave_out: str | None = None) -> CellEstimate:
        """Price ``plan``; ``leave_out`` names a cell id not to price it from (its own result)."""
        from eqbench.registry import TASKS

        same = [c.duration_s for c in self._by_settings.get(_without_seed(plan.config), []) if c.cell_id != leave_out]
        if same:
            return CellEstimate(statistics.median(same), f"measured: {len(same)} cell(s) with these settings")
        pair = [c for c in self._by_pair.get((plan.task, plan.model, plan.system), []) if c.cell_id != leave_out]
        if not pair:
            return CellEstimate(None, f"no finished {plan.task} cell of {plan.model} on {plan.system}")
        # Same variant only: a variant can be a different algorithm (OTD vs DTO, long MCMC vs flow).
        variant = plan.params.get("variant", "")
        calibration = [c for c in pair if c.config.get("params", {}).get("variant", "") == variant]
        if not calibration:
            return CellEstimate(None, f"no finished {plan.task} cell of {plan.model} on {plan.system} "
                                      f"with variant {variant!r}")
        try:
            seconds = TASKS.get(plan.task).estimate_seconds(plan.params, plan.model, plan.system, calibration)
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            return CellEstimate(None, f"cannot price these settings: {exc}")
        profiles = sorted({str(c.config.get("profile", "?")) for c in calibration})
        if seconds is None:
            return CellEstimate(None, f"{plan.task} cannot scale its {len(calibration)} finished cell(s) to these settings")
        return CellEstimate(seconds, f"scaled from {len(calibration)} {'/'.join(profiles)} cell(s)")

    def estimate_all(self, plans: Sequence[CellPlan]) -> dict[str, CellEstimate]:
        return {plan.cell_id: self.estimate(plan) for plan in plans}


def wall_seconds(cell_seconds: Sequence[float], jobs: int) -> float:
    """Wall time of running cells of these durations on ``jobs`` workers, each cell on the
    worker that frees first, in the order given (a sweep submits in plan order)."""
    if not cell_seconds:
        return 0.0
    workers = [0.0] * max(1, min(jobs, len(cell_seconds)))
    for seconds in cell_seconds:
        heapq.heappush(workers, heapq.heappop(workers) + seconds)
    return max(workers)


@dataclass(frozen=True)
class PriceCheck:
    """A finished cell's measured duration beside its price from other cells."""

    cell: CellResult
    estimate: CellEstimate

    @property
    def ratio(self) -> float | None:
        """Estimate / measured (``None`` when unpriced)."""
        if self.estimate.seconds is None or not self.cell.duration_s > 0:
            return None
        return self.estimate.seconds / self.cell.duration_s


def check_prices(results_dir: str | Path, calibration_dirs: Sequence[str | Path],
                 tasks: Sequence[str] | None = None) -> list[PriceCheck]:
    """Price every finished cell of ``results_dir`` from the finished cells of
    ``calibration_dirs`` other than itself (leave one out), as ``--dry-run`` would have before
    it ran, for comparison with its measured duration: how far a price can be trusted. Each
    cell is calibrated on its own kind of device."""
    from eqbench.planning import CellPlan

    pool = [c for d in calibration_dirs for c in CellStore(d).iter_cells()]
    models: dict[str, CostModel] = {}  # one per kind of device
    checks = []
    for cell in CellStore(results_dir).iter_cells():
        cfg = cell.config
        if cell.status != "ok" or (tasks and cfg.get("task") not in tasks):
            continue
        kind = device_kind(cell.provenance.get("device"))
        if kind not in models:
            models[kind] = CostModel(pool, device=kind)
        plan = CellPlan(cfg["task"], cfg["model"], cfg["system"], cfg.get("profile", ""), int(cfg.get("seed", 0)),
                        dict(cfg.get("params", {})))
        checks.append(PriceCheck(cell, models[kind].estimate(plan, leave_out=cell.cell_id)))
    return checks
