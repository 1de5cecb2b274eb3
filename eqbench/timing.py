"""Wall-clock measurements of models: training iterations, sampling, velocity and divergence.

Shared by the asv suites in ``benchmarks/`` and the tasks
``timing`` (paper B.1, Table 2) and ``divergence-cost`` (paper §7.1, Fig. 3c). Every figure is
taken after an untimed warm-up call (the first call pays for allocations and lazy
initialisation). Timings are only comparable within one run on one machine: compare ratios
between models, as the paper's Table 2 (GTX 1080 Ti) must be compared.

glibc returns large freed blocks to the operating system immediately (mmap threshold
128 KiB, adaptive), so evaluations on big tensors pay for page faults on every allocation and
run 2-4x slower and erratically. :func:`stable_malloc` raises the mmap and trim thresholds
through ``mallopt`` (the same effect as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
in the environment) so timings measure arithmetic, not the allocator.

On CUDA, kernels run asynchronously: every timed call is bracketed by
:func:`synchronize`, so a figure is the time until the result exists, not until it was queued.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from eqbench.flows.base import Flow
from eqbench.systems.base import ParticleSystem

__all__ = [
    "stable_malloc",
    "synchronize",
    "median_seconds",
    "repeat_seconds",
    "TimingStats",
    "evaluation_call",
    "train_step",
    "sample_step",
    "interleaved_epochs",
    "budget_plan",
]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def stable_malloc(threshold_bytes: int = 1 << 30) -> bool:
    """Keep large blocks in the heap (glibc only); returns whether ``mallopt`` was applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold_bytes)
        )
    except (OSError, AttributeError):
        return False


def synchronize(device: str | torch.device | None) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def repeat_seconds(
    fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, device: str | torch.device | None = None
) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``fn()``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    return statistics.median(repeat_seconds(fn, repeats=repeats, warmup=warmup))


@dataclass(frozen=True)
class TimingStats:
    """Summary of repeated wall times: the median (robust on a shared machine) and the spread.

    ``std`` is the sample standard deviation (the paper's error bars, C.7), 0 for one sample;
    ``p25``/``p75`` the quartiles (linear interpolation).
    """

    n: int
    median: float
    mean: float
    std: float
    p25: float
    p75: float
    minimum: float

    @classmethod
    def of(cls, samples: list[float]) -> TimingStats:
        if not samples:
            raise ValueError("TimingStats needs at least one sample")
        ordered = sorted(samples)

        def quantile(q: float) -> float:
            pos = q * (len(ordered) - 1)
            lo = math.floor(pos)
            hi = min(lo + 1, len(ordered) - 1)
            return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])

        std = statistics.stdev(ordered) if len(ordered) > 1 else 0.0
        return cls(len(ordered), statistics.median(ordered), statistics.fmean(ordered), std,
                   quantile(0.25), quantile(0.75), ordered[0])


def evaluation_call(flow: Flow, x: torch.Tensor, method: str | None, t: float = 0.5) -> Callable[[], torch.Tensor]:
    """A zero-argument call that evaluates the velocity alone (``method=None``) or velocity +
    divergence by ``method`` (``closed-form``, ``brute-force``, ``hutchinson``, ``exact``) at time ``t``.

    Evaluated as in sampling: no graph to the parameters is kept (``torch.no_grad``); autograd
    divergences still differentiate with respect to ``x`` inside :meth:`CNF.divergence`, and the
    gradient flows still build ``v = ∇Φ`` by autograd, which is part of their velocity's cost.
    """
    tt = torch.tensor(t, dtype=x.dtype, device=x.device)
    flow.eval()

    def call() -> torch.Tensor:
        if method is None:
            if getattr(flow, "velocity_needs_grad", False):
                return flow.velocity(tt, x).detach()
            with torch.no_grad():
                return flow.velocity(tt, x)
        with torch.no_grad():
            return flow.divergence(tt, x, method)[1]

    return call


def train_step(
    flow: Flow,
    data: torch.Tensor,
    *,
    batch: int = 64,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> Callable[[], float]:
    """One maximum-likelihood training iteration as a call (paper C.1: AdamW, lr 5e-3, weight
    decay 0.01): draw ``batch`` rows of ``data``, ``-log q`` with the model's *training*
    divergence and solver (DTO RK4 by default), backward, optimiser step. Returns the loss."""
    optimizer = optimizer or torch.optim.AdamW(flow.parameters(), lr=5e-3, weight_decay=0.01)
    generator = generator or torch.Generator().manual_seed(0)

    def step() -> float:
        flow.train()
        idx = torch.randint(len(data), (batch,), generator=generator).to(data.device)
        loss = -flow.training_log_prob(data[idx]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def sample_step(flow: Flow, system: ParticleSystem, *, batch: int = 64) -> Callable[[], torch.Tensor]:
    """One sampling iteration as a call: ``batch`` samples with their exact log importance weights
    ``-u(x) - log q(x)`` (eval mode: the model's exact divergence, brute force where it has no
    closed form, as paper B.1 samples and reweights)."""

    def step() -> torch.Tensor:
        flow.eval()
        with torch.no_grad():
            x, log_q = flow.sample(batch)
            return -system.energy(x) - log_q

    return step


def interleaved_epochs(
    steps: Mapping[str, Callable[[], object]],
    *,
    epochs: int,
    iterations: Mapping[str, int] | int,
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "timing",
) -> dict[str, list[float]]:
    """Seconds per iteration in each epoch, for several steps timed in turns.

    Each epoch times ``iterations`` consecutive calls of every step; the order of the steps is
    reversed every other epoch (A B, B A, ...), so a slow drift of the machine's load (other
    processes, thermal state) hits every step alike and the ratios between them stay fair.
    Returns ``{name: [seconds per iteration, one value per epoch]}``. No warm-up here: warm the
    steps up before (a call each) so the first epoch does not pay for allocations. ``progress``
    shows a bar over the epochs (``desc`` labels it).
    """
    from tqdm.auto import tqdm

    names = list(steps)
    per_step = {name: iterations if isinstance(iterations, int) else iterations[name] for name in names}
    out: dict[str, list[float]] = {name: [] for name in names}
    for epoch in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        for name in names if epoch % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(per_step[name]):
                steps[name]()
            synchronize(device)
            out[name].append((time.perf_counter() - start) / per_step[name])
    return out


def budget_plan(first_call_s: float, epochs: int, iterations: int, budget_s: float,
                min_epochs: int = 2) -> tuple[int, int]:
    """``(epochs, iterations)`` to time within ``budget_s`` given one call's measured seconds.

    The requested plan when it fits; otherwise fewer iterations per epoch first (the spread over
    epochs is what the error bars need), then fewer epochs, never below ``min_epochs`` epochs of
    one iteration: a measurement always happens, and the records say how many were taken.
    """
    if first_call_s <= 0 or first_call_s * epochs * iterations <= budget_s:
        return epochs, iterations
    per_epoch = max(1, int(budget_s / (first_call_s * epochs)))
    if per_epoch > 1 or first_call_s * epochs <= budget_s:
        return epochs, min(iterations, per_epoch)
    return max(min(min_epochs, epochs), min(epochs, int(budget_s / first_call_s))), 1
