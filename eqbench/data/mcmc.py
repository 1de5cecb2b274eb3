"""Vectorised Metropolis Monte Carlo for reference data (paper C.4, SPEC §3).

Many independent chains advance in lockstep as one batched tensor: a step costs one batched
energy evaluation, which is what makes 10,000 decorrelated LJ-13 samples affordable on two
cores. Proposals are isotropic Gaussian moves of all coordinates followed by CoM removal, i.e.
a symmetric Gaussian proposal on the CoM-free subspace U, so the plain Metropolis rule samples
``exp(-u)`` restricted to U.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from eqbench.atomic import atomic_write_bytes
from eqbench.geometry import pairwise_distances, remove_com
from eqbench.systems.base import ParticleSystem

__all__ = ["MetropolisRun", "run_metropolis"]


@dataclass
class MetropolisRun:
    """Output of :func:`run_metropolis`.

    ``samples`` is ``[samples_per_chain, n_chains, N, D]`` (step-major: row ``k`` holds every
    chain's ``k``-th stored state); ``energies`` matches its first two axes. ``trace`` holds the
    energy of the first ``trace_chains`` chains every ``trace_every`` production steps, for the
    autocorrelation time (``distance_trace``: their mean pair distance); ``burn_in_means`` the
    mean energy over chains every 100 burn-in steps.
    """

    samples: np.ndarray
    energies: np.ndarray
    trace: np.ndarray
    distance_trace: np.ndarray
    burn_in_means: np.ndarray
    acceptance: float
    wall_s: float
    trace_every: int = 1


def _metropolis_step(
    system: ParticleSystem,
    x: torch.Tensor,
    u: torch.Tensor,
    step_size: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Gaussian noise drawn in float32 (4x cheaper) is still a symmetric proposal; states and
    # energies stay float64.
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.dtype)
    proposal = remove_com(x + step_size * noise)
    u_proposal = system.energy(proposal)
    log_uniform = torch.rand(u.shape, generator=generator, dtype=u.dtype).log()
    # NaN or +inf proposal energies compare False and are rejected.
    accept = log_uniform < (u - u_proposal)
    x = torch.where(accept[:, None, None], proposal, x)
    u = torch.where(accept, u_proposal, u)
    return x, u, accept


def run_metropolis(
    system: ParticleSystem,
    *,
    n_chains: int,
    samples_per_chain: int,
    burn_in: int,
    stride: int,
    step_size: float,
    seed: int,
    trace_chains: int = 128,
    trace_every: int = 1,
    progress: bool | None = None,
    description: str = "MCMC",
    checkpoint: Path | None = None,
    checkpoint_every: int = 50_000,
) -> MetropolisRun:
    """Run ``n_chains`` Metropolis chains: ``burn_in`` discarded steps, then store every ``stride``-th.

    Deterministic given ``seed`` (one ``torch.Generator`` drives starts, proposals and
    acceptance draws). ``progress=None`` shows a progress bar only on a terminal. A
    ``trace_every`` above 1 thins the autocorrelation traces: long productions (LJ-13: 100,000
    steps) would otherwise hold hundreds of MB of trace, and a trace sampled well inside the
    autocorrelation time loses nothing (the time in steps is ``trace_every`` times the time in
    trace samples; for times shorter than ``trace_every`` it is overestimated, never under).

    ``checkpoint``: a file that holds the whole state (chains, energies, generator, stored
    samples and traces) every ``checkpoint_every`` steps, written atomically. A run started with
    an existing checkpoint of the same run (same system, settings and seed) resumes from it and
    ends with the same bits as an uninterrupted run: an LJ-55 split takes tens of minutes, and a
    killed generation should not start over. The caller removes the file when it no longer
    needs it; a checkpoint of other settings is refused, never silently reused.

    Example:
        >>> from eqbench.components import get_system
        >>> run = run_metropolis(get_system("dw2"), n_chains=4, samples_per_chain=3, burn_in=10,
        ...                      stride=5, step_size=0.5, seed=0)
        >>> run.samples.shape, 0.0 <= run.acceptance <= 1.0
        ((3, 4, 2, 2), True)
    """
    for label, value in (("n_chains", n_chains), ("samples_per_chain", samples_per_chain), ("stride", stride),
                         ("trace_every", trace_every), ("checkpoint_every", checkpoint_every)):
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    if burn_in < 0:
        raise ValueError(f"burn_in must be >= 0, got {burn_in}")
    recipe = json.dumps({"system": repr(system), "n_chains": n_chains, "samples_per_chain": samples_per_chain,
                         "burn_in": burn_in, "stride": stride, "step_size": step_size, "seed": seed,
                         "trace_chains": trace_chains, "trace_every": trace_every}, sort_keys=True)
    generator = torch.Generator().manual_seed(seed)
    x = system.initial_configurations(n_chains, generator)
    u = system.energy(x)
    trace_chains = min(trace_chains, n_chains)
    n_production = samples_per_chain * stride
    total = burn_in + n_production
    samples = np.empty((samples_per_chain, n_chains, *system.event_shape))
    energies = np.empty((samples_per_chain, n_chains))
    n_trace = n_production // trace_every
    trace_t = torch.empty(n_trace, trace_chains, dtype=u.dtype)
    distance_t = torch.empty(n_trace, trace_chains, dtype=u.dtype)
    burn_in_means: list[float] = []
    accepted = torch.zeros((), dtype=torch.int64)
    done, elapsed = 0, 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        state = _load_checkpoint(Path(checkpoint), recipe)
        done, elapsed = int(state["done"]), float(state["elapsed"])
        x, u = torch.from_numpy(state["x"]), torch.from_numpy(state["u"])
        generator.set_state(torch.from_numpy(state["generator"]))
        samples, energies = state["samples"], state["energies"]
        trace_t, distance_t = torch.from_numpy(state["trace"]), torch.from_numpy(state["distance_trace"])
        burn_in_means = list(state["burn_in_means"])
        accepted = torch.tensor(int(state["accepted"]))
        warnings.warn(f"{description}: resuming from its checkpoint at step {done:,} of {total:,} ({checkpoint})",
                      stacklevel=2)
    show = sys.stderr.isatty() if progress is None else progress
    start = time.perf_counter()
    with torch.no_grad(), tqdm(total=total, initial=done, desc=description, disable=not show,
                               unit="step", mininterval=0.5) as bar:
        for t in range(done, total):
            x, u, accept = _metropolis_step(system, x, u, step_size, generator)
            if t < burn_in:
                if t % 100 == 0:
                    burn_in_means.append(float(u.mean()))
            else:
                step = t - burn_in
                accepted += accept.sum()
                if (step + 1) % trace_every == 0:
                    k = (step + 1) // trace_every - 1
                    trace_t[k] = u[:trace_chains]
                    distance_t[k] = pairwise_distances(x[:trace_chains]).mean(dim=-1)
                if (step + 1) % stride == 0:
                    k = (step + 1) // stride - 1
                    samples[k] = x.numpy()
                    energies[k] = u.numpy()
            if t % 256 == 255:
                bar.update(t + 1 - bar.n)
            if checkpoint is not None and (t + 1) % checkpoint_every == 0 and t + 1 < total:
                _save_checkpoint(Path(checkpoint), recipe, done=t + 1, elapsed=elapsed + time.perf_counter() - start,
                                 x=x, u=u, generator=generator, samples=samples, energies=energies, trace=trace_t,
                                 distance_trace=distance_t, burn_in_means=burn_in_means, accepted=accepted)
        bar.update(total - bar.n)
    wall = elapsed + time.perf_counter() - start
    acceptance = float(accepted) / (n_production * n_chains)
    if not math.isfinite(float(u.sum())):
        raise FloatingPointError(f"{system.name}: non-finite energies at the end of MCMC")
    return MetropolisRun(samples, energies, trace_t.numpy(), distance_t.numpy(), np.asarray(burn_in_means),
                         acceptance, wall, trace_every)


def _save_checkpoint(path: Path, recipe: str, *, done: int, elapsed: float, x: torch.Tensor, u: torch.Tensor,
                     generator: torch.Generator, samples: np.ndarray, energies: np.ndarray, trace: torch.Tensor,
                     distance_trace: torch.Tensor, burn_in_means: list[float], accepted: torch.Tensor) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, recipe=np.array(recipe), done=np.array(done), elapsed=np.array(elapsed), x=x.numpy(),
             u=u.numpy(), generator=generator.get_state().numpy(), samples=samples, energies=energies,
             trace=trace.numpy(), distance_trace=distance_trace.numpy(),
             burn_in_means=np.asarray(burn_in_means, dtype=np.float64), accepted=np.array(int(accepted)))
    atomic_write_bytes(path, buffer.getvalue())


def _load_checkpoint(path: Path, recipe: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            state = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"MCMC checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
    if str(state.get("recipe")) != recipe:
        raise ValueError(f"MCMC checkpoint {path} belongs to another run (system, settings or seed differ); "
                         "delete it to start over")
    return state
