"""Pure functions that check a sample set: autocorrelation, errors, duplicates, overlap.

These are what make reference data trustworthy (SPEC §3): a sample set is accepted only when
its configurational temperature is 1 within 3 %, its stored samples are further apart than the
energy autocorrelation time, and it holds no repeated rows.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "autocorrelation_function",
    "integrated_autocorrelation_time",
    "BatchMeans",
    "batch_means",
    "drift_z",
    "row_hashes",
    "count_duplicate_rows",
    "count_overlapping_rows",
    "sha256_file",
]


def autocorrelation_function(trace: np.ndarray) -> np.ndarray:
    """Normalised autocorrelation of a ``[T, chains]`` trace, averaged over chains (via FFT).

    Each chain is centred on its own mean; averaging the autocovariances before normalising is
    the estimator recommended for many short chains (Sokal 1997; Goodman & Weare 2010).
    """
    trace = np.asarray(trace, dtype=np.float64)
    if trace.ndim == 1:
        trace = trace[:, None]
    n = trace.shape[0]
    centred = trace - trace.mean(axis=0, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(centred, n=size, axis=0)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=0)[:n].mean(axis=1)
    if acov[0] <= 0:
        return np.ones(1)
    return acov / acov[0]


def integrated_autocorrelation_time(trace: np.ndarray, window_factor: float = 5.0) -> float:
    """Integrated autocorrelation time ``τ = 1 + 2 Σ_t ρ(t)`` with Sokal's automatic window.

    The sum is cut at the smallest window ``M`` with ``M >= window_factor * τ(M)``, which keeps
    the noise of the tail out of the estimate. Units: steps of the trace.
    """
    rho = autocorrelation_function(trace)
    if rho.size == 1:
        return 1.0
    taus = 2.0 * np.cumsum(rho) - 1.0
    windows = np.arange(taus.size)
    ok = windows >= window_factor * taus
    m = int(np.argmax(ok)) if ok.any() else taus.size - 1
    return float(taus[m])


@dataclass(frozen=True)
class BatchMeans:
    """A mean and its batch-means standard error, with what the batches were.

    ``method`` is a sentence for the diagnostics file, so a reader knows which error was quoted
    (one batch per chain, or ``batches_per_chain`` contiguous batches along each chain).
    """

    mean: float
    stderr: float
    n_batches: int
    batch_length: int
    method: str


def batch_means(values: np.ndarray, batches_per_chain: int = 1) -> BatchMeans:
    """Mean of ``[samples_per_chain, chains]`` values and its standard error by batch means.

    Each chain is cut into ``batches_per_chain`` contiguous batches of equal length (a remainder
    at the end of each chain is left out of both the mean and the error); the error is the
    standard deviation of the batch means over ``sqrt(n_batches)``. With the default, one batch
    per chain, the batches are independent whatever the correlation inside a chain, so the error
    is honest for correlated samples; a formula that assumes independent rows (``std / sqrt(n)``)
    underestimates it by ``sqrt(τ)`` whenever rows are correlated. Batches along a chain are
    only independent if they are much longer than the autocorrelation time: use more than one
    per chain only for few, long chains. A 1-D input is one chain.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"values must be [samples_per_chain, chains], got shape {values.shape}")
    if batches_per_chain < 1:
        raise ValueError(f"batches_per_chain must be >= 1, got {batches_per_chain}")
    steps, chains = values.shape
    length = steps // batches_per_chain
    if length < 1:
        raise ValueError(f"{steps} samples per chain cannot make {batches_per_chain} batches")
    used = values[: length * batches_per_chain]
    means = used.reshape(batches_per_chain, length, chains).mean(axis=1).ravel()
    n_batches = means.size
    stderr = float(means.std(ddof=1) / math.sqrt(n_batches)) if n_batches > 1 else float("nan")
    if batches_per_chain == 1:
        method = f"batch means, one batch per chain ({chains} independent chains x {length} samples)"
    else:
        method = (f"batch means along chains ({chains} chains x {batches_per_chain} contiguous batches "
                  f"of {length} samples)")
    return BatchMeans(float(used.mean()), stderr, int(n_batches), int(length), method)


def drift_z(values: np.ndarray) -> float:
    """Second-half minus first-half mean of ``[samples_per_chain, chains]`` values, in standard errors.

    The difference is taken per chain and its error by batch means over chains, so correlated
    samples inside a chain do not inflate the score. A burn-in shorter than the slowest
    relaxation shows as a drift; ``nan`` when chains hold fewer than two samples.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    half = values.shape[0] // 2
    if half < 1 or values.shape[1] < 2:
        return float("nan")
    difference = values[-half:].mean(axis=0) - values[:half].mean(axis=0)
    stderr = difference.std(ddof=1) / math.sqrt(difference.size)
    return float(difference.mean() / stderr) if stderr > 0 else float("nan")


def row_hashes(x: np.ndarray) -> list[bytes]:
    """A digest per row of the flattened configurations (exact byte equality)."""
    flat = np.ascontiguousarray(np.asarray(x).reshape(len(x), -1))
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def count_duplicate_rows(x: np.ndarray) -> int:
    """Rows equal to an earlier row (a Metropolis chain that did not move repeats its state)."""
    hashes = row_hashes(x)
    return len(hashes) - len(set(hashes))


def count_overlapping_rows(a: np.ndarray, b: np.ndarray) -> int:
    """Rows of ``b`` that occur exactly in ``a`` (train/test leakage)."""
    seen = set(row_hashes(a))
    return sum(h in seen for h in row_hashes(b))


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
