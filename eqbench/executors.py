"""Where cells run: a local process pool (default), a dask cluster, or SLURM through submitit.

Every executor runs the same function, :func:`execute_cell`, in a worker: it fixes the worker's
torch thread budget and device, runs the cell (:func:`eqbench.runner.run_cell`, which turns any
exception or NaN into a failed result with its reason), and writes the result atomically to the
store *in the worker*. A sweep killed at any moment therefore keeps every finished cell, and a
rerun finishes exactly the missing ones (the store is keyed by the cell's config hash).

Failures the cell itself cannot record are recorded by the parent:

- a worker that dies (out of memory, SIGKILL) leaves a claim file ``.running/<cell_id>`` and no
  result; the parent writes the failed result "worker died" and carries on with a fresh pool;
- a cell past its time limit is interrupted in the worker by ``SIGALRM`` (local executor) or
  killed by SLURM (submitit reports it), and becomes a failed result with that reason.

dask and submitit are optional extras; asking for an executor whose package is missing raises a
:class:`~eqbench.errors.ConfigError` with the install command.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqbench.errors import CellTimeout, ConfigError
from eqbench.records import CellResult, CellStore, now_iso, provenance
from eqbench.planning import CellPlan

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


def _claim_path(store: CellStore, plan: CellPlan) -> Path:
    return store.path(plan.task, plan.cell_id).parent / ".running" / plan.cell_id


def _worker_device(device: str) -> str:
    """``auto`` on a multi-GPU node: one GPU per worker, chosen by the worker's pool index."""
    import torch

    from eqbench.devices import resolve_device

    if device != "auto":
        return resolve_device(device)
    if not torch.cuda.is_available():
        return "cpu"
    identity = multiprocessing.current_process()._identity  # (k,) for the k-th pool worker
    index = (identity[0] - 1) if identity else 0
    return f"cuda:{index % torch.cuda.device_count()}"


def _failed(plan: CellPlan, reason: str, device: str, duration: float = float("nan")) -> CellResult:
    return CellResult(task=plan.task, cell_id=plan.cell_id, config=plan.config, status="failed", reason=reason,
                      started_at=now_iso(), duration_s=duration, provenance=provenance(device))


def execute_cell(job: CellJob) -> CellResult:
    """Run one cell in this process and store its result atomically; returns the result.

    Sets the torch thread budget first (workers must not oversubscribe the cores: two torch
    processes with two threads each on two cores ran 5x slower than one thread each, measured).
    """
    import torch

    from eqbench.runner import run_cell

    torch.set_num_threads(max(1, job.threads))
    store = CellStore(job.results_dir)
    claim = _claim_path(store, job.plan)
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(f"{os.getpid()}\n")
    device = _worker_device(job.device)
    previous = None
    # SIGALRM only reaches the main thread (local pool workers; not dask worker threads, where
    # the scheduler or SLURM enforces limits instead).
    if job.time_limit_s is not None and hasattr(signal, "setitimer") and _in_main_thread():
        def on_alarm(signum, frame):
            raise CellTimeout(f"cell exceeded its time limit of {job.time_limit_s:g} s")
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, job.time_limit_s)
    try:
        result = run_cell(job.plan, device=device, progress=False, results_root=store.root,
                          artifacts_dir=store.artifact_dir(job.plan.task, job.plan.cell_id) if job.artifacts else None)
    finally:
        if previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    store.write(result)
    claim.unlink(missing_ok=True)
    return result


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Executor(ABC):
    """Runs cell jobs somewhere and yields their results as they finish."""

    name: str = ""

    @abstractmethod
    def run(self, jobs: Sequence[CellJob]) -> Iterator[CellResult]:
        """Yield one :class:`CellResult` per job (in completion order); never raises for a cell."""

    def close(self) -> None:
        """Release resources (clusters, pools)."""


class LocalExecutor(Executor):
    """A ``concurrent.futures`` process pool with the ``spawn`` start method.

    Spawned (not forked) workers start clean: no inherited torch thread pools or CUDA contexts.
    A worker death breaks the whole pool: cells that had not started are resubmitted to a fresh
    pool; cells that were running (found by their claim files) are retried one at a time, and a
    cell whose lone worker dies again is recorded as failed ("worker process died").
    """

    name = "local"

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = jobs

    def run(self, jobs: Sequence[CellJob]) -> Iterator[CellResult]:
        pending, solo = list(jobs), []
        while pending or solo:
            # A broken pool takes down every worker, so the culprit among the cells that were
            # running is not known: each of them is retried alone, and a cell whose solo worker
            # dies too is the one that kills workers (out of memory, segfault, SIGKILL).
            alone = not pending
            batch = [solo.pop(0)] if alone else pending
            pending = [] if not alone else pending
            broken_jobs: list[CellJob] = []
            yield from self._run_pool(batch, 1 if alone else self.jobs, broken_jobs)
            if not broken_jobs:
                continue
            again, started = _split_crashed(broken_jobs)
            if alone:
                for job in started:
                    result = _failed(job.plan, "worker process died without a result (killed or out of memory)",
                                     job.device)
                    CellStore(job.results_dir).write(result)
                    _claim_path(CellStore(job.results_dir), job.plan).unlink(missing_ok=True)
                    yield result
                pending.extend(again)
            else:
                pending.extend(again)
                solo.extend(started)

    @staticmethod
    def _run_pool(jobs: list[CellJob], workers: int, broken_jobs: list[CellJob]) -> Iterator[CellResult]:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context)
        futures: dict[Future, CellJob] = {pool.submit(execute_cell, job): job for job in jobs}
        interrupted = False
        try:
            remaining = set(futures)
            while remaining:
                done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for future in done:
                    job = futures[future]
                    try:
                        yield future.result()
                    except BrokenProcessPool:
                        broken_jobs.append(job)
                    except Exception as exc:  # noqa: BLE001  (pickling or pool errors: record, go on)
                        result = _failed(job.plan, f"executor error: {type(exc).__name__}: {exc}", job.device)
                        CellStore(job.results_dir).write(result)
                        yield result
        except BaseException:  # Ctrl-C, or the consumer gave up: stop the workers now, not after their cells
            interrupted = True
            for process in list(getattr(pool, "_processes", {}).values()):  # no public handle on the workers
                process.terminate()
            raise
        finally:
            pool.shutdown(wait=not (broken_jobs or interrupted), cancel_futures=True)


def _split_crashed(jobs: list[CellJob]) -> tuple[list[CellJob], list[CellJob]]:
    """Unfinished jobs of a broken pool: (never started, started and interrupted)."""
    again, started = [], []
    for job in jobs:
        store = CellStore(job.results_dir)
        claimed = _claim_path(store, job.plan).exists()
        if not claimed and store.read(job.plan.task, job.plan.cell_id) is not None:
            continue  # it finished and was stored before the pool broke
        (started if claimed else again).append(job)
    return again, started


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
