"""Worker processes that die with their parent and are never reused after a time limit fired.

:class:`WorkerPool` runs calls in spawned processes, one call at a time per worker, and knows
which call each worker runs. What it guarantees, whatever happens to the process that owns it:

- **No orphans.** A worker dies with its parent however the parent dies (SIGKILL and the OOM
  killer included): on Linux through ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, elsewhere through
  a thread that polls the parent's pid. The multiprocessing resource tracker exits by itself
  once the parent and the workers are gone (it reads a pipe only they hold). Workers ignore
  SIGINT: a terminal's Ctrl-C reaches the parent, which stops them.
- **No poisoned workers.** A call's time limit (:func:`time_limit`, ``SIGALRM``) may fire
  anywhere, in the middle of an import too, and leave the worker's modules half-initialised; a
  worker in which it fired exits after its reply and a fresh one takes its place. A call that
  does not return within its limit plus :data:`HARD_KILL_GRACE_S` (a C extension that does not
  let the alarm through, code that swallows the exception) is killed by the parent.
- **Deaths attributed.** A worker that dies mid-call (out of memory, a segfault) ends only its
  own call (:class:`Outcome` ``died``, saying whether other calls were running beside it);
  the other workers go on.

Also here: :func:`check_time_limit` (what a valid limit is) and :class:`ProgressLines` (life
signs of long work for logs, where no progress bar is drawn). Standard library only.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_ready
from typing import Any

from eqbench.errors import CellTimeout, ConfigError

__all__ = ["HARD_KILL_GRACE_S", "PROGRESS_INTERVAL_S", "Outcome", "ProgressLines", "TimeLimitState", "WorkerPool",
           "check_time_limit", "time_limit", "time_limit_reason", "worker_slot"]

#: Seconds past its time limit after which the parent kills a worker whose call has not returned.
HARD_KILL_GRACE_S = 10.0
#: Seconds between :class:`ProgressLines` lines while nothing finishes.
PROGRESS_INTERVAL_S = 60.0

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


# ---------------------------------------------------------------------------------- time limits
def as_seconds(value: Any) -> float:
    """``value`` (a number or its text, as a command line gives it) as seconds; NaN when it is
    not a number (booleans included), for the callers' one-line errors."""
    try:
        return float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        return math.nan


def check_time_limit(value: Any) -> float | None:
    """``value`` as a time limit in seconds (``None``: no limit), or a one-line
    :class:`~eqbench.errors.ConfigError`: a limit must be a positive, finite number."""
    if value is None:
        return None
    seconds = as_seconds(value)
    if not (math.isfinite(seconds) and seconds > 0):
        shown = value if isinstance(value, str) else repr(value)
        raise ConfigError(f"--time-limit (time_limit_s) must be a positive number of seconds, got {shown}")
    return seconds


def time_limit_reason(seconds: float) -> str:
    """The reason of a cell stopped at its limit, the same wherever it was stopped."""
    return f"cell exceeded its time limit of {seconds:g} s"


@dataclass
class TimeLimitState:
    """What :func:`time_limit` saw: ``fired`` once the alarm went off (the process is then no
    longer trusted: a pool worker retires after its reply)."""

    seconds: float | None = None
    fired: bool = False


_TAINTED = False  # a time limit fired in this process


@contextmanager
def time_limit(seconds: float | None) -> Iterator[TimeLimitState]:
    """Raise :class:`~eqbench.errors.CellTimeout` in this thread after ``seconds``.

    Only where ``SIGALRM`` can reach the code (the main thread, POSIX); elsewhere (dask worker
    threads) a no-op, and the scheduler or SLURM limits the cell instead. Import what the code
    needs *before* entering: the alarm may fire anywhere, and a module whose import it interrupts
    stays broken in this process (in a :class:`WorkerPool` worker, the worker is replaced).
    The exception may also surface just after the block; callers catch it around the ``with``.
    """
    state = TimeLimitState(seconds)
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield state
        return

    def on_alarm(signum: int, frame: Any) -> None:
        global _TAINTED
        state.fired = _TAINTED = True
        raise CellTimeout(time_limit_reason(seconds))

    previous = signal.signal(signal.SIGALRM, on_alarm)
    if _WORKER is not None:
        _WORKER.send(("armed", seconds))  # the parent's backstop: kill at seconds + grace
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------- the workers
class _WorkerSide:
    """A worker's end of its pipe and its slot (which of the pool's ``size`` places it holds)."""

    def __init__(self, conn: Any, slot: int):
        self.conn, self.slot = conn, slot
        self.lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self.lock:
            self.conn.send(message)


_WORKER: _WorkerSide | None = None


def worker_slot() -> int | None:
    """In a :class:`WorkerPool` worker, its place ``0 .. size-1`` (kept by its replacements:
    one GPU per place); ``None`` elsewhere."""
    return _WORKER.slot if _WORKER is not None else None


def _die_with_parent(parent_pid: int, pdeathsig: bool) -> None:
    armed = False
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="eqbench-parent-watchdog",
                         daemon=True).start()


def _watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent_pid:  # re-parented: the parent is gone
            os._exit(1)


def _worker_main(conn: Any, parent_pid: int, slot: int, pdeathsig: bool) -> None:
    """A worker's loop: ``(fn, item)`` in, ``("done", kind, value, tainted)`` out, until ``None``."""
    global _WORKER
    _die_with_parent(parent_pid, pdeathsig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER = _WorkerSide(conn, slot)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        fn, item = message
        try:
            reply = ("done", "ok", fn(item), _TAINTED)
        except BaseException as exc:  # noqa: BLE001  (reported to the parent, which decides)
            reply = ("done", "error", exc, _TAINTED)
        try:
            _WORKER.send(reply)
        except Exception as exc:  # noqa: BLE001  (an unpicklable result or exception)
            _WORKER.send(("done", "error", RuntimeError(f"the worker could not send its result back: "
                                                        f"{type(exc).__name__}: {exc}"), _TAINTED))
        if _TAINTED:
            return  # a time limit fired in here: imports may be half done; the parent starts a fresh worker


@dataclass
class Outcome:
    """How one call ended: ``ok`` (``value`` is its return value), ``error`` (``value`` is the
    exception it raised, or the one that kept it from being sent), ``died`` (its worker died
    without a reply; ``value`` is the exit code, negative for a signal; ``alone``: no other call
    was running then), ``timeout`` (killed by the parent past ``value`` seconds plus the grace)."""

    item: Any
    kind: str
    value: Any = None
    alone: bool = True


@dataclass
class _Worker:
    slot: int
    process: Any
    conn: Any
    item: Any = None
    busy: bool = False
    deadline: float | None = None
    limit: float | None = None


def _kill_all(workers: list[_Worker | None]) -> None:
    for worker in workers:
        if worker is not None and worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)


class WorkerPool:
    """Up to ``size`` spawned worker processes, started on demand and reused between calls
    (a worker keeps its imports and caches) except after a time limit fired in it.

    Use as a context manager or call :meth:`close`; abandoning :meth:`imap_unordered` midway
    (an exception, Ctrl-C) kills the workers that were running its calls.
    """

    def __init__(self, size: int = 1, *, pdeathsig: bool = True):
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {size}")
        self.size = size
        self.pdeathsig = pdeathsig
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * size
        # At interpreter exit, before multiprocessing joins its children: kill what is left (a
        # clean-up cut short by a second Ctrl-C must not leave the exit waiting on a busy worker).
        multiprocessing.util.Finalize(self, _kill_all, args=(self._workers,), exitpriority=10)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(kill=exc[0] is not None)

    # ------------------------------------------------------------------------------- workers
    def _start(self, slot: int) -> _Worker:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(child_end, os.getpid(), slot, self.pdeathsig),
                                        name=f"eqbench-worker-{slot}")
        process.start()
        child_end.close()
        worker = _Worker(slot, process, parent_end)
        self._workers[slot] = worker
        return worker

    def _retire(self, worker: _Worker, *, kill: bool) -> None:
        """Stop a worker (ask an idle one to leave; kill a busy one) and reap it."""
        self._workers[worker.slot] = None
        process = worker.process
        if not kill and process.is_alive():
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
            process.join(timeout=5)
        if process.is_alive():
            process.terminate()
            process.join(timeout=2)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
        worker.conn.close()

    def close(self, *, kill: bool = False) -> None:
        """Stop every worker: idle ones leave, busy ones (or all, with ``kill``) are killed."""
        for worker in list(self._workers):
            if worker is not None:
                self._retire(worker, kill=kill or worker.busy)

    # --------------------------------------------------------------------------------- calls
    def call(self, fn: Callable[[Any], Any], item: Any) -> Outcome:
        """One call in a worker; its :class:`Outcome`."""
        return list(self.imap_unordered(fn, [item]))[0]

    def imap_unordered(self, fn: Callable[[Any], Any], items: Iterable[Any], *,
                       on_dispatch: Callable[[Any], None] | None = None) -> Iterator[Outcome]:
        """``fn(item)`` for every item in the workers, at most ``size`` at a time; an
        :class:`Outcome` per item in completion order. ``fn`` must be picklable by reference
        (a module-level function); ``on_dispatch(item)`` runs in this process as a call starts."""
        queue = deque(items)
        finished = False
        try:
            while queue or self._busy():
                while queue and len(self._busy()) < self.size:
                    item = queue.popleft()
                    failure = self._dispatch(fn, item, on_dispatch)
                    if failure is not None:
                        yield failure
                busy = self._busy()
                if not busy:
                    continue
                deadlines = [w.deadline for w in busy if w.deadline is not None]
                timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                ready = set(wait_ready([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout))
                for worker in busy:
                    outcome = self._collect(worker, ready, alone=len(busy) == 1)
                    if outcome is not None:
                        yield outcome
            finished = True
        finally:
            if not finished:  # Ctrl-C, SIGTERM, or the consumer stopped: no call of ours runs on
                for worker in self._busy():
                    self._retire(worker, kill=True)

    def _busy(self) -> list[_Worker]:
        return [w for w in self._workers if w is not None and w.busy]

    def _dispatch(self, fn: Callable[[Any], Any], item: Any,
                  on_dispatch: Callable[[Any], None] | None) -> Outcome | None:
        idle = [k for k, w in enumerate(self._workers) if w is not None and not w.busy]
        slot = idle[0] if idle else self._workers.index(None)  # a warm worker first
        for attempt in range(2):
            worker = self._workers[slot]
            if worker is None or not worker.process.is_alive():
                if worker is not None:
                    self._retire(worker, kill=True)
                worker = self._start(slot)
            if on_dispatch is not None and attempt == 0:
                on_dispatch(item)
            try:
                worker.conn.send((fn, item))
            except (BrokenPipeError, ConnectionResetError, EOFError):  # died while idle: once more, fresh
                self._retire(worker, kill=True)
                continue
            except Exception as exc:  # noqa: BLE001  (the item does not pickle)
                return Outcome(item, "error", exc)
            worker.item, worker.busy, worker.deadline, worker.limit = item, True, None, None
            return None
        return Outcome(item, "died", None)

    def _collect(self, worker: _Worker, ready: set[Any], *, alone: bool) -> Outcome | None:
        """What a busy worker has to say: messages, death, or a passed deadline."""
        if worker.conn in ready or worker.process.sentinel in ready:
            while True:
                try:
                    if not worker.conn.poll():
                        break
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    break
                except Exception as exc:  # noqa: BLE001  (a reply that does not unpickle here)
                    return self._end(worker, Outcome(worker.item, "error", exc), retire=True)
                if message[0] == "armed":
                    worker.limit = float(message[1])
                    worker.deadline = time.monotonic() + worker.limit + HARD_KILL_GRACE_S
                    continue
                _, kind, value, tainted = message
                return self._end(worker, Outcome(worker.item, kind, value), retire=tainted)
            if not worker.process.is_alive():
                worker.process.join(timeout=1)
                return self._end(worker, Outcome(worker.item, "died", worker.process.exitcode, alone=alone),
                                 retire=True)
        if worker.deadline is not None and time.monotonic() >= worker.deadline:
            return self._end(worker, Outcome(worker.item, "timeout", worker.limit), retire=True, kill=True)
        return None

    def _end(self, worker: _Worker, outcome: Outcome, *, retire: bool, kill: bool = False) -> Outcome:
        worker.busy, worker.item, worker.deadline = False, None, None
        if retire:
            self._retire(worker, kill=kill)
        return outcome


# ------------------------------------------------------------------------------------ progress
def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLines:
    """Life signs of long work where no progress bar is drawn (stderr not a terminal: logs, batch
    jobs): a line ``LABEL: k/n cells done, m failed, elapsed H:MM:SS`` on stderr as each cell
    finishes, and the same line every ``interval`` seconds while none does.

    A no-op unless ``enabled``; use as a context manager (it starts a daemon thread)."""

    def __init__(self, label: str, total: int, *, enabled: bool = True, interval: float | None = None):
        self.label, self.total, self.enabled = label, total, enabled
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.done = self.failed = 0
        self._start = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProgressLines:
        if self.enabled:
            self._thread = threading.Thread(target=self._beat, name="eqbench-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def line(self) -> str:
        return (f"{self.label}: {self.done}/{self.total} cells done, {self.failed} failed, "
                f"elapsed {_hms(time.monotonic() - self._start)}")

    def _print(self) -> None:
        with self._lock:
            self._last = time.monotonic()
            print(self.line(), file=sys.stderr, flush=True)

    def update(self, ok: bool) -> None:
        """One more cell finished (``ok`` or failed)."""
        self.done += 1
        self.failed += not ok
        if self.enabled:
            self._print()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.05, self.interval - (time.monotonic() - self._last))):
            if time.monotonic() - self._last >= self.interval:
                self._print()
