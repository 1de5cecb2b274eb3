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

from eqbench.artifacts import ArtifactWriter
from eqbench.devices import resolve_device
from eqbench.errors import CellTimeout, EqbenchError
from eqbench.planning import CellPlan, check_data_for, code_versions, default_results_dir, plan_cells
from eqbench.records import CellResult, CellStore, Record, check_results_dir, now_iso, provenance
from eqbench.registry import MODELS, SYSTEMS, TASKS
from eqbench.snapshots import DEFAULT_SNAPSHOT_EVERY_S, SnapshotPlan, check_snapshot_interval
from eqbench.tasks.base import REFERENCE_MODEL, CellContext
from eqbench.workers import ProgressLines, WorkerPool, check_time_limit, time_limit, time_limit_reason

__all__ = ["CellPlan", "ContractError", "code_versions", "default_results_dir", "failed_result", "flow_facts",
           "plan_cells", "preflight", "prepare_cell", "run", "run_cell", "run_cell_limited"]


class ContractError(EqbenchError):
    """A model that breaks the flow contract (:mod:`eqbench.testing`) is refused before it is scored."""


_PREFLIGHT_CACHE: dict[str, dict[str, Any]] = {}


def flow_facts(flow: Any, system: Any, name: str, declared: frozenset[str] | None = None) -> dict[str, Any]:
    """Run :func:`eqbench.testing.check_flow_quick` on a built ``flow`` and say what it is
    (capabilities, density kind, parameter count, the contract checks passed); a flow that is not
    what its builder ``declared`` or breaks the contract raises :class:`ContractError`."""
    from eqbench.components import capabilities_of
    from eqbench.testing import check_flow_quick

    built = capabilities_of(flow)
    if declared is not None and declared != built:
        raise ContractError(f"model {name!r} declares capabilities {sorted(declared)} but builds a flow "
                            f"with {sorted(built)} on {system.name} (eqbench.model_builder; README 'Adding a model')")
    try:
        report = check_flow_quick(flow, system)
    except AssertionError as exc:
        raise ContractError(f"model {name!r} fails the flow contract on {system.name}: {exc} "
                            f"(eqbench.testing.check_flow_quick; README 'Results store')") from None
    return {"capabilities": sorted(built),
            "density": getattr(flow, "density_estimate", None) or "exact",
            "n_parameters": int(flow.n_parameters),
            "contract": sorted(report.passed)}


def _model_facts(model: str, system: str, model_config: Mapping[str, Any], code: Mapping[str, str]) -> dict[str, Any]:
    """Build the model once and take its :func:`flow_facts` (cached per process)."""
    key = json.dumps([model, system, dict(model_config), dict(code)], sort_keys=True, default=str)
    if key in _PREFLIGHT_CACHE:
        return _PREFLIGHT_CACHE[key]
    from eqbench.components import build_model, declared_capabilities, get_system

    system_obj = get_system(system)
    flow = build_model(model, system_obj, dict(model_config))  # its errors are the cell's, unchanged
    facts = flow_facts(flow, system_obj, model, declared_capabilities(model))
    _PREFLIGHT_CACHE[key] = facts
    return facts


def preflight(plans: Sequence[CellPlan]) -> list[CellPlan]:
    """Run the cheap part of the flow contract once per (model, system, model settings) before
    any of their cells runs, and attach what it learnt to the plans (``model_info``).

    A model whose samples are not CoM-free, whose ``sample`` and ``log_prob`` disagree, or that
    breaks a symmetry it claims is refused with the reason (:class:`ContractError`): such a
    model's likelihoods are not comparable with the others', however good they look.
    A model-independent reference cell (model :data:`~eqbench.tasks.base.REFERENCE_MODEL`)
    builds no model and is passed through unchecked.
    """
    return [plan if plan.model == REFERENCE_MODEL else
            replace(plan, model_info=_model_facts(plan.model, plan.system, plan.params.get("model_config") or {},
                                                  plan.code)) for plan in plans]


def run_cell(plan: CellPlan, *, device: str = "cpu", progress: bool | None = None,
             artifacts_dir: str | Path | None = None, results_root: str | Path | None = None,
             flow: Any = None, snapshot_dir: str | Path | None = None,
             snapshot_every_s: float | None = DEFAULT_SNAPSHOT_EVERY_S) -> CellResult:
    """Run one cell in this process; failures become a failed :class:`CellResult`, never an exception.

    ``artifacts_dir``: where the cell keeps its model and samples (:mod:`eqbench.artifacts`;
    ``None`` keeps nothing); the cell lists them relative to ``results_root``. ``flow``: an
    already-built flow the task scores instead of building one (``ctx.extras["flow"]``; the
    ``evaluate`` task, :func:`eqbench.evaluation.evaluate`). ``snapshot_dir``: where training
    saves its state every ``snapshot_every_s`` seconds and resumes from an earlier run's
    (:mod:`eqbench.snapshots`; ``None`` for either: no snapshots); a cell that resumed says so in
    ``provenance["resumed"]``.

    A plan without ``model_info`` (a sweep's cells: the sweep's parent process never runs model
    code, which may crash it) gets its :func:`preflight` here, in the worker, once per process
    and model; a model that fails it makes a failed cell whose reason is the contract breach.
    """
    started, start = now_iso(), time.perf_counter()
    status, reason, records = "ok", "", []
    snapshots = SnapshotPlan(Path(snapshot_dir), snapshot_every_s) \
        if snapshot_dir is not None and snapshot_every_s is not None else None
    writer = ArtifactWriter(Path(artifacts_dir), root=Path(results_root) if results_root else None) \
        if artifacts_dir is not None else None
    try:
        import torch

        if not plan.model_info:
            plan = preflight([plan])[0]

        torch.manual_seed(plan.seed)
        ctx = CellContext(task=plan.task, model=plan.model, system=SYSTEMS.get(plan.system)(),
                          params=plan.params, seed=plan.seed, device=device, progress=progress,
                          artifacts=writer, code=dict(plan.code), extras={} if flow is None else {"flow": flow},
                          snapshots=snapshots)
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
    where = provenance(device)
    if snapshots is not None and snapshots.resumed:
        where["resumed"] = snapshots.describe()
    return CellResult(task=plan.task, cell_id=plan.cell_id, config=plan.config, status=status, reason=reason,
                      started_at=started, duration_s=time.perf_counter() - start,
                      provenance=where, records=records, model_info=dict(plan.model_info),
                      artifacts=dict(writer.manifest) if writer is not None else {})


def prepare_cell(plan: CellPlan) -> None:
    """Import what a cell of ``plan`` runs (torch, the task's module, the model builder's module,
    the flow contract) *before* its time limit is armed: an alarm that interrupts an import leaves
    the module half-initialised for the rest of the process. An import that fails here is left
    to the cell, which records it as its failure."""
    try:
        import torch  # noqa: F401

        import eqbench.components  # noqa: F401
        import eqbench.testing  # noqa: F401

        TASKS.get(plan.task)
        SYSTEMS.get(plan.system)
        if plan.model != REFERENCE_MODEL:
            MODELS.get(plan.model)
    except Exception:  # noqa: BLE001  (the cell meets it again and records it)
        pass


def failed_result(plan: CellPlan, reason: str, device: str, *, started_at: str | None = None,
                  duration_s: float = float("nan")) -> CellResult:
    """A failed cell recorded by whoever noticed the failure (a worker past its limit, the parent
    of a worker that died)."""
    return CellResult(task=plan.task, cell_id=plan.cell_id, config=plan.config, status="failed", reason=reason,
                      started_at=started_at or now_iso(), duration_s=duration_s, provenance=provenance(device))


def run_cell_limited(plan: CellPlan, *, device: str = "cpu", time_limit_s: float | None = None,
                     progress: bool | None = None, artifacts_dir: str | Path | None = None,
                     results_root: str | Path | None = None, snapshot_dir: str | Path | None = None,
                     snapshot_every_s: float | None = DEFAULT_SNAPSHOT_EVERY_S) -> CellResult:
    """:func:`run_cell` under a time limit (:func:`eqbench.workers.time_limit`), armed after the
    cell's heavy imports (:func:`prepare_cell`). A cell in which the limit fired is a failed
    cell with reason "cell exceeded its time limit of N s", whatever the cell's code made of the
    exception; the process is then tainted (a :class:`~eqbench.workers.WorkerPool` worker retires).
    Its training snapshots (``snapshot_dir``) stay, so running the cell again resumes it."""
    prepare_cell(plan)
    started, start = now_iso(), time.perf_counter()
    result, limit = None, None
    try:
        with time_limit(time_limit_s) as limit:
            result = run_cell(plan, device=device, progress=progress, artifacts_dir=artifacts_dir,
                              results_root=results_root, snapshot_dir=snapshot_dir,
                              snapshot_every_s=snapshot_every_s)
    except CellTimeout:
        pass
    except BaseException:
        if limit is None or not limit.fired:
            raise
    if (limit is not None and limit.fired) or result is None:
        result = failed_result(plan, time_limit_reason(time_limit_s or 0), device, started_at=started,
                               duration_s=time.perf_counter() - start)
    return result


def _cell_in_worker(job: tuple[CellPlan, str, float | None, bool | None, str | None, str | None, int,
                                str | None, float | None]) -> CellResult:
    """One cell of :func:`run` with a time limit, in a :class:`~eqbench.workers.WorkerPool` worker."""
    plan, device, limit, progress, artifacts_dir, results_root, threads, snapshot_dir, every = job
    import torch

    torch.set_num_threads(max(1, threads))
    return run_cell_limited(plan, device=device, time_limit_s=limit, progress=progress, artifacts_dir=artifacts_dir,
                            results_root=results_root, snapshot_dir=snapshot_dir, snapshot_every_s=every)


def _preflight_in_worker(job: tuple[list[CellPlan], float | None, int]) -> list[CellPlan] | None:
    """:func:`preflight` of :func:`run` with a time limit, in a worker; ``None`` if it ran past it."""
    plans, limit, threads = job
    import torch

    torch.set_num_threads(max(1, threads))
    for plan in plans:
        prepare_cell(plan)
    state = None
    try:
        with time_limit(limit) as state:
            checked = preflight(plans)
    except CellTimeout:
        return None
    except BaseException:
        if state is None or not state.fired:
            raise
    return None if state is None or state.fired else checked


def _worker_reason(outcome: Any, limit: float) -> str:
    if outcome.kind == "timeout":
        return time_limit_reason(limit)
    if outcome.kind == "died":
        return "worker process died without a result (killed or out of memory)"
    return f"executor error: {type(outcome.value).__name__}: {outcome.value}"


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
    artifacts: bool = True,
    time_limit_s: float | None = None,
    snapshot_every_s: float | None = DEFAULT_SNAPSHOT_EVERY_S,
) -> list[CellResult]:
    """Run every cell of a task profile for one model and system.

    Finished cells (same config hash, status ok) are read back instead of rerun, including the
    model-independent reference cells another model's run or sweep already finished (they carry
    model :data:`~eqbench.tasks.base.REFERENCE_MODEL`, shared by every model). ``device`` is
    ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; it is provenance, not part of the cell id.
    Results go to ``results_dir``, by default ``results/<profile>`` (:func:`default_results_dir`).
    Before the first cell runs, the model passes :func:`preflight` or is refused. With
    ``artifacts`` (default) every cell keeps the model it scored and its samples under
    ``<results_dir>/artifacts/`` (:mod:`eqbench.artifacts`), so it can be re-scored without
    retraining (:func:`eqbench.evaluation.evaluate`).

    ``time_limit_s``: a cell running longer becomes a failed cell ("cell exceeded its time limit
    of N s"), as in a sweep. The cells (and the model check before them, limited alike) then run
    in a worker process, replaced after a limit fired in it, so a cell stopped mid-import never
    breaks the next one. Without a terminal (``progress=None``, stderr not a TTY) a line per
    finished cell, and one a minute in between, goes to stderr (:class:`~eqbench.workers.ProgressLines`).

    ``snapshot_every_s``: training saves its state this often (seconds; ``None``: never) under
    ``<results_dir>/cells/<task>/.snapshots/``, so a cell stopped by its limit or killed resumes
    its training when run again, with the numbers an uninterrupted run gives
    (:mod:`eqbench.snapshots`); ``rerun`` starts such a cell afresh.

    Example:
        >>> import eqbench, tempfile
        >>> cells = eqbench.run("test-nll", "gaussian", "dw2", "smoke", results_dir=tempfile.mkdtemp())
        >>> cells[0].status, "equivariant" in cells[0].model_info["capabilities"]
        ('ok', True)
    """
    from eqbench.tasks.common import show_progress

    limit = check_time_limit(time_limit_s)
    snapshot_every_s = check_snapshot_interval(snapshot_every_s)
    device = resolve_device(device)
    plans = plan_cells(task, model, system, profile, seed=seed, overrides=overrides)
    store = CellStore(check_results_dir(default_results_dir(profile) if results_dir is None else results_dir))
    todo = [plan for plan in plans if rerun or not store.is_done(plan.task, plan.cell_id)]
    if todo:
        check_data_for(todo)  # a read-only cache without the data: one line, before any work
        store.remove_orphaned_temps()
    pool = WorkerPool(1) if limit is not None and todo else None
    lines = ProgressLines(f"run {task} {model} {system}", len(todo),
                          enabled=bool(todo) and progress is None and not show_progress(None))
    results = []
    try:
        with lines:
            if pool is None:
                checked, refused = {plan.cell_id: plan for plan in preflight(todo)}, {}
            else:
                checked, refused = _preflight_limited(pool, todo, limit, device)
            for plan in plans:
                if plan.cell_id in refused:
                    result = refused[plan.cell_id]
                else:
                    if plan.cell_id not in checked:
                        cached = store.read(plan.task, plan.cell_id)
                        if cached is not None:
                            results.append(cached)
                            continue
                        checked.update((p.cell_id, p) for p in (preflight([plan]) if pool is None else [plan]))
                    artifacts_dir = store.artifact_dir(plan.task, plan.cell_id) if artifacts else None
                    if rerun:
                        store.remove_snapshots(plan.task, plan.cell_id)
                    snapshot_dir = store.snapshot_dir(plan.task, plan.cell_id)
                    if pool is None:
                        result = run_cell(checked[plan.cell_id], device=device, progress=progress,
                                          artifacts_dir=artifacts_dir, results_root=store.root,
                                          snapshot_dir=snapshot_dir, snapshot_every_s=snapshot_every_s)
                    else:
                        result = _run_cell_limited_in(pool, checked[plan.cell_id], device, limit, progress,
                                                      artifacts_dir, store.root, snapshot_dir, snapshot_every_s)
                store.write(result)
                results.append(result)
                lines.update(result.status == "ok")
    finally:
        if pool is not None:
            pool.close()
    return results


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _preflight_limited(pool: WorkerPool, todo: list[CellPlan], limit: float,
                       device: str) -> tuple[dict[str, CellPlan], dict[str, CellResult]]:
    """:func:`preflight` in ``pool``'s worker under ``limit``: (checked plans, failed results
    for every cell when the check ran past the limit or killed its worker). A model the check
    refuses raises here, as without a limit."""
    if not todo:
        return {}, {}
    outcome = pool.call(_preflight_in_worker, (todo, limit, _torch_threads()))
    if outcome.kind == "ok" and outcome.value is not None:
        return {plan.cell_id: plan for plan in outcome.value}, {}
    if outcome.kind == "error":
        raise outcome.value
    reason = time_limit_reason(limit) if outcome.kind == "ok" else _worker_reason(outcome, limit)
    return {}, {plan.cell_id: failed_result(plan, reason, device) for plan in todo}


def _run_cell_limited_in(pool: WorkerPool, plan: CellPlan, device: str, limit: float, progress: bool | None,
                         artifacts_dir: Path | None, root: Path, snapshot_dir: Path,
                         snapshot_every_s: float | None) -> CellResult:
    outcome = pool.call(_cell_in_worker, (plan, device, limit, progress, str(artifacts_dir) if artifacts_dir else None,
                                          str(root), _torch_threads(), str(snapshot_dir), snapshot_every_s))
    if outcome.kind == "ok":
        return outcome.value
    return failed_result(plan, _worker_reason(outcome, limit), device)


def records_of(results: Sequence[CellResult]) -> list[Record]:
    return [record for result in results for record in result.records]
