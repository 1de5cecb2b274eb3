"""Wall-clock measurements of models: training iterations, sampling, velocity and divergence.

Shared by ``python -m eqbench timing``, the asv suites in ``benchmarks/`` and the timing task
(paper B.1, Table 2). Every figure is a median over repeats after a warm-up. Timings are only
comparable within one run on one machine: compare ratios between models, as the paper's
Table 2 (GTX 1080 Ti) must be compared.

glibc returns large freed blocks to the operating system immediately (mmap threshold
128 KiB, adaptive), so evaluations on big tensors pay for page faults on every allocation and
run 2-4x slower and erratically. :func:`stable_malloc` raises the mmap and trim thresholds
through ``mallopt`` (the same effect as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
in the environment) so timings measure arithmetic, not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from eqbench.flows.base import Flow
from eqbench.systems.base import ParticleSystem

__all__ = ["stable_malloc", "median_seconds", "ModelTiming", "time_model", "time_velocity_divergence"]

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


def median_seconds(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class ModelTiming:
    """Seconds per operation for one model on one system (batch 64 unless stated)."""

    model: str
    system: str
    n_parameters: int
    train_iteration_s: float
    sample_batch_s: float
    sample_many_s: float | None
    n_samples: int
    note: str = ""


def time_velocity_divergence(flow: Flow, x: torch.Tensor, method: str | None, *, repeats: int = 5) -> float:
    """Seconds for one velocity evaluation (``method=None``) or velocity + divergence by ``method``."""
    t = torch.tensor(0.5, dtype=x.dtype)
    flow.eval()

    def call():
        if method is None:
            if getattr(flow, "velocity_needs_grad", False):
                return flow.velocity(t, x)
            with torch.no_grad():
                return flow.velocity(t, x)
        with torch.no_grad():
            return flow.divergence(t, x, method)

    return median_seconds(call, repeats=repeats)


def _sample_with_weights(flow: Flow, system: ParticleSystem, n: int, batch: int) -> None:
    done = 0
    with torch.no_grad():
        while done < n:
            size = min(batch, n - done)
            x, log_q = flow.sample(size)
            _ = -system.energy(x) - log_q  # exact log importance weights
            done += size


def time_model(
    model: str,
    system: ParticleSystem,
    *,
    data: torch.Tensor,
    batch: int = 64,
    n_samples: int = 10_000,
    sample_batch: int = 1000,
    repeats: int = 5,
    budget_s: float = 120.0,
    config: dict | None = None,
) -> ModelTiming:
    """Time one training iteration (DTO, the model's training divergence) and sampling with exact weights.

    Sampling ``n_samples`` is measured only when the 64-sample timing predicts it fits in
    ``budget_s``; otherwise ``sample_many_s`` is None and ``note`` says why.
    """
    from eqbench.api import build_model

    torch.manual_seed(0)
    flow = build_model(model, system, config or {})
    optimizer = torch.optim.AdamW(flow.parameters(), lr=5e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)

    def train_step():
        flow.train()
        idx = torch.randint(len(data), (batch,), generator=generator)
        loss = -flow.log_prob(data[idx]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_s = median_seconds(train_step, repeats=repeats)
    flow.eval()
    sample_s = median_seconds(lambda: _sample_with_weights(flow, system, batch, batch), repeats=repeats)
    predicted = sample_s * n_samples / batch
    many, note = None, ""
    if predicted <= budget_s:
        start = time.perf_counter()
        _sample_with_weights(flow, system, n_samples, sample_batch)
        many = time.perf_counter() - start
    else:
        note = f"{n_samples} samples not timed: batch-{batch} timing predicts {predicted:.0f} s > budget {budget_s:.0f} s"
    return ModelTiming(model, system.name, flow.n_parameters, train_s, sample_s, many, n_samples, note)
