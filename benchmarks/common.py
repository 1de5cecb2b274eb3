"""Shared set-up of the asv suites (not a suite itself: asv finds no benchmarks here).

Every suite calls :func:`fix_environment` in ``setup``: torch runs on ``EQBENCH_BENCH_THREADS``
threads (default 1, so numbers from machines with different core counts stay comparable) and
glibc keeps large blocks in the heap (:func:`eqbench.timing.stable_malloc`, the in-process
equivalent of ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``; ``make bench`` exports
those too, so they hold from interpreter start). Without it, benchmarks on large tensors run
2-4x slower and erratically.

``EQBENCH_BENCH_SMOKE=1`` (set by ``make bench-check``) shrinks the expensive parameters
(particle counts, sample counts) so that running every benchmark once in CI stays within a few
minutes; the code paths are the same.
"""

from __future__ import annotations

import os
import statistics
import timeit
from collections.abc import Callable

import torch

SMOKE = os.environ.get("EQBENCH_BENCH_SMOKE", "") not in ("", "0")


def fix_environment() -> None:
    from eqbench.timing import stable_malloc

    torch.set_num_threads(int(os.environ.get("EQBENCH_BENCH_THREADS") or 1))
    stable_malloc()


def calibrated_number(timer: timeit.Timer, min_run_s: float) -> int:
    """Smallest power of two of calls that takes at least ``min_run_s``."""
    number = 1
    while timer.timeit(number) < min_run_s:
        number *= 2
    return number


def median_time_ratio(
    numerator: Callable[[], object],
    denominator: Callable[[], object],
    repeat: int = 7,
    min_run_s: float = 0.02,
) -> float:
    """Median over ``repeat`` rounds of (time per call of ``numerator``) / (same of ``denominator``).

    The two are timed back to back within each round, so load from other processes that comes
    and goes between rounds affects both sides of a ratio alike instead of skewing one of them.
    """
    numerator()
    denominator()  # warm-up: first calls pay one-time allocations
    timers = (timeit.Timer(numerator), timeit.Timer(denominator))
    numbers = [calibrated_number(timer, min_run_s) for timer in timers]
    ratios = []
    for _ in range(repeat):
        top, bottom = (timer.timeit(number) / number for timer, number in zip(timers, numbers))
        ratios.append(top / bottom)
    return statistics.median(ratios)
