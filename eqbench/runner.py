"""Run a task: expand its profile into cells, skip finished ones, record each cell atomically.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eqbench.config import apply_overrides, expand_grid
from eqbench.devices import resolve_device
from eqbench.errors import ConfigError, EqbenchError
from eqbench.records import CellResult, CellStore, Record, cell_id, now_iso, provenance, settings_key
from eqbench.registry import MODELS, SYSTEMS, TASKS
from eqbench.tasks.base import CellContext, Task
from eqbench.versions import eqbench_code_version, object_code_version

__all__ = ["CellPlan", "ContractError", "code_versions", "default_results_dir", "plan_cells", "preflight", "run",
           "run_cell"]


class ContractError(EqbenchError):
    """A model that breaks the flow contract (:mod:`eqbench.testing`) is refused before it is scored."""


@dataclass(frozen=True)
class CellPlan:
    """One cell to run: its identity (``config``: names, profile, seed, settings, code versions)
    and, not part of the identity, what the pre-flight check learnt about the model."""

    task: str
    model: str
    system: str
    profile: str
    seed: int
    params: Mapping[str, Any]
    #: Versions of the code that computes the cell (:func:`code_versions`); part of its id.
    code: Mapping[str, str] = field(default_factory=dict)
    #: Facts about the model from :func:`preflight` (capabilities, density kind, parameters).
    model_info: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def config(self) -> dict[str, Any]:
        config = {"task": self.task, "model": self.model, "system": self.system, "profile": self.profile,
                  "seed": self.seed, "params": dict(self.params)}
        if self.code:
            config["code"] = dict(self.code)
        return config

    @property
    def cell_id(self) -> str:
        return cell_id(self.config)

    @property
    def settings_key(self) -> str:
        """The cell's identity without its seed: cells that differ only in seed share it."""
        return settings_key(self.config)


def code_versions(task: str, model: str) -> dict[str, str]:
    """``{"eqbench": ...}`` plus ``"model"`` / ``"task"`` where those come from other code
    (a plugin, a ``module:attr`` path): see :mod:`eqbench.versions`."""
    versions = {"eqbench": eqbench_code_version()}
    for kind, obj in (("model", MODELS.get(model)), ("task", type(TASKS.get(task)))):
        version = object_code_version(obj)
        if version != versions["eqbench"]:
            versions[kind] = version
    return versions


def default_results_dir(profile: str) -> Path:
    """``results/<profile>``: one directory per profile, so cells of different profiles never
    meet in one table by accident (a smoke cell is not a seed of a quick cell)."""
    return Path("results") / profile


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
    code = code_versions(task, model)
    plans = []
    for point in expand_grid(params, task_obj.grid_axes):
        task_obj.validate(point)
        for cell_params in task_obj.expand_cell(point, model, system):
            plans.extend(CellPlan(task, model, system, profile, s, cell_params, code) for s in seeds)
    return plans


_PREFLIGHT_CACHE: dict[str, dict[str, Any]] = {}


def _model_facts(model: str, system: str, model_config: Mapping[str, Any], code: Mapping[str, str]) -> dict[str, Any]:
    """Build the model once, run :func:`eqbench.testing.check_flow_quick`, and say what it is."""
    key = json.dumps([model, system, dict(model_config), dict(code)], sort_keys=True, default=str)
    if key in _PREFLIGHT_CACHE:
        return _PREFLIGHT_CACHE[key]
    from eqbench.components import build_model, capabilities_of, get_system
    from eqbench.testing import check_flow_quick

    system_obj = get_system(system)
    try:
        flow = build_model(model, system_obj, dict(model_config))
    except EqbenchError:
        raise
    except Exception as exc:  # a plugin's builder may fail in any way: one line, naming the model
        raise ContractError(f"model {model!r} cannot be built for {system}: {type(exc).__name__}: {exc}") from exc
    try:
        report = check_flow_quick(flow, system_obj)
    except AssertionError as exc:
        raise ContractError(f"model {model!r} fails the flow contract on {system}: {exc} "
                            f"(eqbench.testing.check_flow_quick; README 'Adding a model')") from None
    except Exception as exc:  # noqa: BLE001  (a crash in the model's own code is a contract failure)
        raise ContractError(f"model {model!r} crashed in the contract check on {system}: "
                            f"{type(exc).__name__}: {exc}") from exc
    facts = {"capabilities": sorted(capabilities_of(flow)),
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
