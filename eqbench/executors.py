"""Where cells run: a local process pool (default), a dask cluster, or SLURM through submitit.

Every executor runs the same function, :func:`execute_cell`, in a worker: it fixes the worker's
torch thread budget and device, runs the cell (:func:`eqbench.runner.run_cell`, which turns any
exception or NaN into a failed result with its reason), and writes the result atomically to the
store *in the worker*. A sweep killed at any moment therefore keeps every finished cell, and a
rerun finishes exactly the missing ones (the store is keyed by the cell's config hash).

Failures the cell itself cannot record are recorded by the parent:

- a local worker that dies (out of memory, SIGKILL) ends only its own cell: the parent knows
  which cell it ran (:class:`eqbench.workers.WorkerPool`), retries it alone once the others are
  done (the OOM killer may have picked the wrong process), and records "worker process died" if
  it dies alone too; the other workers go on;
- a cell past its time limit is interrupted in the worker by ``SIGALRM`` (armed after the cell's
  heavy imports; a local worker in which it fired is replaced, never reused), killed by the
  parent if it does not stop within a grace period, or killed by SLURM (submitit reports it),
  and becomes a failed result "cell exceeded its time limit of N s".

Local workers die with the sweep however it dies (SIGKILL included); nothing outlives it. A
running cell has a claim file ``.running/<cell_id>`` beside the cells (``host pid`` of whoever
runs it); claims of processes that no longer exist are removed when a sweep starts
(:func:`remove_stale_claims`), and nothing relies on them to decide what to run.

dask and submitit are optional extras; asking for an executor whose package is missing raises a
:class:`~eqbench.errors.ConfigError` with the install command.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqbench.errors import CellTimeout, ConfigError
from eqbench.records import CellResult, CellStore, now_iso, provenance
from eqbench.planning import CellPlan
from eqbench.snapshots import DEFAULT_SNAPSHOT_EVERY_S
from eqbench.workers import Outcome, WorkerPool, time_limit_reason, worker_slot

__all__ = [
    "EXECUTORS",
    "CellJob",
    "CellTimeout",
    "Executor",
    "LocalExecutor",
    "DaskExecutor",
    "SlurmExecutor",
    "execute_cell",
    "make_executor",
    "remove_stale_claims",
    "run_jobs",
    "SlurmOptions",
]


@dataclass(frozen=True)
class CellJob:
    """Everything a worker needs to run one cell; picklable, no open handles."""

    plan: CellPlan
    results_dir: str
    device: str = "cpu"
    threads: int = 1
    time_limit_s: float | None = None
    #: Keep each cell's model and samples (:mod:`eqbench.artifacts`) beside its record.
    artifacts: bool = True
    #: Seconds between training snapshots (:mod:`eqbench.snapshots`); ``None``: none.
    snapshot_every_s: float | None = DEFAULT_SNAPSHOT_EVERY_S


def _claim_path(store: CellStore, plan: CellPlan) -> Path:
    return store.path(plan.task, plan.cell_id).parent / ".running" / plan.cell_id


def _claim(store: CellStore, plan: CellPlan) -> Path:
    """Mark the cell as running here: ``host pid``, for people and :func:`remove_stale_claims`."""
    claim = _claim_path(store, plan)
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return claim


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_claims(results_dir: str | Path) -> list[Path]:
    """Remove the claim files of cells whose process no longer exists on this host (a sweep that
    was killed); returns them. Claims of other hosts (a shared results directory) are kept."""
    if os.name != "posix":  # no signal-0 liveness test; claims are informative only
        return []
    host, removed = socket.gethostname(), []
    for claim in sorted(CellStore(results_dir).cells_dir.glob("*/.running/*")):
        try:
            words = claim.read_text().split()
        except OSError:
            continue
        owner_host, pid = (words[0], words[1]) if len(words) >= 2 else (host, words[0] if words else "")
        if owner_host == host and (not pid.isdigit() or not _pid_alive(int(pid))):
            claim.unlink(missing_ok=True)
            removed.append(claim)
    return removed


def _worker_device(device: str) -> str:
    """``auto`` on a multi-GPU node: one GPU per worker, chosen by the worker's pool index."""
    import torch

    from eqbench.devices import resolve_device

    if device != "auto":
        return resolve_device(device)
    if not torch.cuda.is_available():
        return "cpu"
    index = worker_slot()  # the worker's place in the local pool, kept by its replacements
    if index is None:
        identity = multiprocessing.current_process()._identity  # (k,) for the k-th worker elsewhere
        index = (identity[0] - 1) if identity else 0
    return f"cuda:{index % torch.cuda.device_count()}"


def _failed(plan: CellPlan, reason: str, device: str, duration: float = float("nan")) -> CellResult:
    return CellResult(task=plan.task, cell_id=plan.cell_id, config=plan.config, status="failed", reason=reason,
                      started_at=now_iso(), duration_s=duration, provenance=provenance(device))


def execute_cell(job: CellJob) -> CellResult:
    """Run one cell in this process and store its result atomically; returns the result.

    Sets the torch thread budget first (workers must not oversubscribe the cores: two torch
    processes with two threads each on two cores ran 5x slower than one thread each, measured).
    The time limit is armed after the cell's imports (:func:`eqbench.runner.run_cell_limited`;
    SIGALRM reaches only a main thread: local and SLURM workers, not dask worker threads, where
    the scheduler limits cells instead).
    """
    store = CellStore(job.results_dir)
    claim = _claim(store, job.plan)
    import torch

    from eqbench.runner import run_cell_limited

    torch.set_num_threads(max(1, job.threads))
    device = _worker_device(job.device)
    result = run_cell_limited(job.plan, device=device, time_limit_s=job.time_limit_s, progress=False,
                              results_root=store.root,
                              artifacts_dir=store.artifact_dir(job.plan.task, job.plan.cell_id) if job.artifacts else None,
                              snapshot_dir=store.snapshot_dir(job.plan.task, job.plan.cell_id),
                              snapshot_every_s=job.snapshot_every_s)
    store.write(result)
    claim.unlink(missing_ok=True)
    return result


class Executor(ABC):
    """Runs cell jobs somewhere and yields their results as they finish."""

    name: str = ""

    @abstractmethod
    def run(self, jobs: Sequence[CellJob]) -> Iterator[CellResult]:
        """Yield one :class:`CellResult` per job (in completion order); never raises for a cell."""

    def close(self) -> None:
        """Release resources (clusters, pools)."""


class LocalExecutor(Executor):
    """Worker processes on this machine (:class:`eqbench.workers.WorkerPool`, ``spawn`` start).

    Spawned (not forked) workers start clean: no inherited torch thread pools or CUDA contexts.
    They die with the sweep's process however it dies, and a worker in which a time limit fired
    is replaced. A worker that dies takes only its own cell with it: a cell whose worker died
    beside other running cells is retried alone after the rest (out of memory, the kernel may
    have killed the wrong process), and a cell whose lone worker dies is recorded as failed
    ("worker process died").
    """

    name = "local"

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = jobs

    def run(self, jobs: Sequence[CellJob]) -> Iterator[CellResult]:
        with WorkerPool(self.jobs) as pool:
            solo: list[CellJob] = []
            for outcome in pool.imap_unordered(execute_cell, jobs, on_dispatch=_claim_job):
                if outcome.kind == "died" and not outcome.alone:
                    solo.append(outcome.item)
                    continue
                yield _local_result(outcome)
            for job in solo:  # alone now: if its worker dies again, this cell is what kills it
                for outcome in pool.imap_unordered(execute_cell, [job], on_dispatch=_claim_job):
                    yield _local_result(outcome)


def _claim_job(job: CellJob) -> None:
    """The parent claims a cell as it hands it out: a cell whose claim is gone was stored whole by its worker."""
    _claim(CellStore(job.results_dir), job.plan)


def _local_result(outcome: Outcome) -> CellResult:
    """The result of a local cell however its worker ended; the parent stores what the worker could not."""
    job: CellJob = outcome.item
    if outcome.kind == "ok":
        return outcome.value
    store = CellStore(job.results_dir)
    claim = _claim_path(store, job.plan)
    if outcome.kind in ("died", "timeout") and not claim.exists():
        stored = store.read(job.plan.task, job.plan.cell_id)
        if stored is not None:  # stored whole just before its worker died
            return stored
    if outcome.kind == "timeout":
        reason = time_limit_reason(outcome.value if outcome.value is not None else job.time_limit_s or 0)
    elif outcome.kind == "died":
        reason = "worker process died without a result (killed or out of memory)"
    else:
        reason = f"executor error: {type(outcome.value).__name__}: {outcome.value}"
    result = _failed(job.plan, reason, job.device)
    store.write(result)
    claim.unlink(missing_ok=True)
    return result


class DaskExecutor(Executor):
    """Cells as dask.distributed tasks: on the scheduler at ``address``, or on a LocalCluster of
    ``jobs`` single-threaded worker processes when no address is given."""

    name = "dask"

    def __init__(self, jobs: int = 1, address: str | None = None):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise ConfigError("the dask executor needs dask.distributed: pip install -c constraints.txt "
                              "'eqbench[dask]'") from None
        self.cluster = None
        if address:
            self.client = Client(address)
        else:
            self.cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)

    def run(self, jobs: Sequence[CellJob]) -> Iterator[CellResult]:
        from dask.distributed import as_completed

        futures = {self.client.submit(execute_cell, job, pure=False, key=f"cell-{job.plan.cell_id}"): job
                   for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                yield future.result()
            except Exception as exc:  # noqa: BLE001  (a lost worker: record and go on)
                result = _failed(job.plan, f"dask task failed: {type(exc).__name__}: {exc}", job.device)
                CellStore(job.results_dir).write(result)
                yield result

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


@dataclass
class SlurmOptions:
    """SLURM settings for submitit (``--partition``, ``--gpus-per-job``, ``--time-limit``, ``--jobs``)."""

    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int = 1
    timeout_min: int = 60
    array_parallelism: int = 16
    cluster: str | None = None  # None: auto-detect; "local" runs jobs as local processes (tests)
    extra: dict[str, Any] = field(default_factory=dict)


class SlurmExecutor(Executor):
    """One SLURM job-array task per cell through submitit; logs under ``RESULTS/slurm/``."""

    name = "slurm"

    def __init__(self, results_dir: str | Path, options: SlurmOptions):
        try:
            import submitit
        except ImportError:
            raise ConfigError("the slurm executor needs submitit: pip install -c constraints.txt "
                              "'eqbench[slurm]'") from None
        self.executor = submitit.AutoExecutor(folder=Path(results_dir) / "slurm" / "%j", cluster=options.cluster)
        params: dict[str, Any] = {"timeout_min": options.timeout_min, "cpus_per_task": options.cpus_per_job,
                                  "slurm_array_parallelism": options.array_parallelism, **options.extra}
        if options.partition:
            params["slurm_partition"] = options.partition
        if options.gpus_per_job:
            params["gpus_per_node"] = options.gpus_per_job
        if self.executor.cluster != "slurm":  # local/debug executors ignore slurm_* settings
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        self.executor.update_parameters(**params)

    def run(self, jobs: Sequence[CellJob]) -> Iterator[CellResult]:
        submitted = self.executor.map_array(execute_cell, list(jobs))
        for job, sub in zip(jobs, submitted):
            try:
                yield sub.result()
            except Exception as exc:  # noqa: BLE001  (timeouts, preemption, node failure)
                reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
                result = _failed(job.plan, f"slurm job {sub.job_id} failed: {reason}", job.device)
                CellStore(job.results_dir).write(result)
                yield result


#: Executor names for ``--executor``.
EXECUTORS: dict[str, str] = {
    "local": "process pool on this machine (default)",
    "dask": "dask.distributed: --address of a scheduler, or a LocalCluster",
    "slurm": "SLURM job arrays through submitit",
}


def make_executor(name: str, *, jobs: int = 1, results_dir: str | Path = "results", address: str | None = None,
                  slurm: SlurmOptions | None = None) -> Executor:
    """An executor by name; unknown names list the valid ones."""
    if name == "local":
        return LocalExecutor(jobs)
    if name == "dask":
        return DaskExecutor(jobs, address)
    if name == "slurm":
        return SlurmExecutor(results_dir, slurm or SlurmOptions(array_parallelism=jobs))
    raise ConfigError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")


def run_jobs(executor: Executor, jobs: Sequence[CellJob], *,
             on_result: Callable[[CellResult], None] | None = None) -> list[CellResult]:
    """Run ``jobs`` on ``executor``, calling ``on_result`` as each finishes; returns all results."""
    results = []
    try:
        for result in executor.run(jobs):
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        executor.close()
    return results
