"""Run a task: plan its cells (:mod:`eqbench.planning`), check the model, skip finished cells,
record each cell atomically.

A cell that raises or produces a non-finite value is stored as a failed cell with its reason
and never stops the others (Standards: "a crash or a NaN in one cell ... never corrupts other
results"). Invalid requests (unknown names, bad settings) are refused before any work.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from eqbench.devices import resolve_device
from eqbench.errors import EqbenchError
from eqbench.planning import CellPlan, code_versions, default_results_dir, plan_cells
from eqbench.records import CellResult, CellStore, Record, now_iso, provenance
from eqbench.registry import SYSTEMS, TASKS
from eqbench.tasks.base import CellContext

__all__ = ["CellPlan", "ContractError", "code_versions", "default_results_dir", "plan_cells", "preflight", "run",
           "run_cell"]


class ContractError(EqbenchError):
    """A model that breaks the flow contract (:mod:`eqbench.testing`) is refused before it is scored."""


_PREFLIGHT_CACHE: dict[str, dict[str, Any]] = {}


def _model_facts(model: str, system: str, model_config: Mapping[str, Any], code: Mapping[str, str]) -> dict[str, Any]:
    """Build the model once, run :func:`eqbench.testing.check_flow_quick`, and say what it is."""
    key = json.dumps([model, system, dict(model_config), dict(code)], sort_keys=True, default=str)
    if key in _PREFLIGHT_CACHE:
        return _PREFLIGHT_CACHE[key]
    from eqbench.components import build_model, capabilities_of, declared_capabilities, get_system
    from eqbench.testing import check_flow_quick

    system_obj = get_system(system)
    flow = build_model(model, system_obj, dict(model_config))  # its errors are the cell's, unchanged
    built, declared = capabilities_of(flow), declared_capabilities(model)
    if declared is not None and declared != built:
        raise ContractError(f"model {model!r} declares capabilities {sorted(declared)} but builds a flow "
                            f"with {sorted(built)} on {system} (eqbench.model_builder; README 'Adding a model')")
    try:
        report = check_flow_quick(flow, system_obj)
    except AssertionError as exc:
        raise ContractError(f"model {model!r} fails the flow contract on {system}: {exc} "
                            f"(eqbench.testing.check_flow_quick; README 'Results store')") from None
    facts = {"capabilities": sorted(built),
             "density": getattr(flow, "density_estimate", None) or "exact",
             "n_parameters": int(flow.n_parameters),
             "contract": sorted(report.passed)}
    _PREFLIGHT_CACHE[key] = facts
    return facts


def preflight(plans: Sequence[CellPlan]) -> list[CellPlan]:
    """Run the cheap part of the flow contract once per (model, system, model settings) before
    any of their cells runs, and attach what it learnt to the plans (``model_info``).

    A model whose samples are not CoM-free, whose ``sample`` and ``log_prob`` disagree, or that
    breaks a symmetry it claims is refused with the reason (:class:`ContractError`): such a
    model's likelihoods are not comparable with the others', however good they look.
    """
    return [replace(plan, model_info=_model_facts(plan.model, plan.system, plan.params.get("model_config") or {},
                                                   plan.code)) for plan in plans]


def run_cell(plan: CellPlan, *, device: str = "cpu", progress: bool | None = None) -> CellResult:
    """Run one cell in this process; failures become a failed :class:`CellResult`, never an exception.

    A plan without ``model_info`` (a sweep's cells: the sweep's parent process never runs model
    code, which may crash it) gets its :func:`preflight` here, in the worker, once per process
    and model; a model that fails it makes a failed cell whose reason is the contract breach.
    """
    started, start = now_iso(), time.perf_counter()
    status, reason, records = "ok", "", []
    try:
        import torch

        if not plan.model_info:
            plan = preflight([plan])[0]

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
                      provenance=provenance(device), records=records, model_info=dict(plan.model_info))


def run(
    task: str,
    model: str,
    system: str,
    profile: str = "smoke",
    *,
    seed: int | None = None,
    device: str = "cpu",
    overrides: Mapping[str, Any] | None = None,
    results_dir: str | Path | None = None,
    rerun: bool = False,
    progress: bool | None = None,
) -> list[CellResult]:
    """Run every cell of a task profile for one model and system.

    Finished cells (same config hash, status ok) are read back instead of rerun. ``device`` is
    ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; it is provenance, not part of the cell id.
    Results go to ``results_dir``, by default ``results/<profile>`` (:func:`default_results_dir`).
    Before the first cell runs, the model passes :func:`preflight` or is refused.

    Example:
        >>> import eqbench, tempfile
        >>> cells = eqbench.run("test-nll", "gaussian", "dw2", "smoke", results_dir=tempfile.mkdtemp())
        >>> cells[0].status, "equivariant" in cells[0].model_info["capabilities"]
        ('ok', True)
    """
    device = resolve_device(device)
    plans = plan_cells(task, model, system, profile, seed=seed, overrides=overrides)
    store = CellStore(default_results_dir(profile) if results_dir is None else results_dir)
    todo = [plan for plan in plans if rerun or not store.is_done(plan.task, plan.cell_id)]
    if todo:
        store.remove_orphaned_temps()
    checked = {plan.cell_id: plan for plan in preflight(todo)}
    results = []
    for plan in plans:
        if plan.cell_id not in checked:
            cached = store.read(plan.task, plan.cell_id)
            if cached is not None:
                results.append(cached)
                continue
            checked.update((p.cell_id, p) for p in preflight([plan]))
        result = run_cell(checked[plan.cell_id], device=device, progress=progress)
        store.write(result)
        results.append(result)
    return results


def records_of(results: Sequence[CellResult]) -> list[Record]:
    return [record for result in results for record in result.records]
