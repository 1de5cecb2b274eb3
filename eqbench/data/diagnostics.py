"""Pure functions that check a sample set: autocorrelation, errors, duplicates, overlap.

These are what make reference data trustworthy (SPEC §3): a sample set is accepted only when
its configurational temperature is 1 within 3 %, its stored samples are further apart than the
energy autocorrelation time, and it holds no repeated rows.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

__all__ = [
    "autocorrelation_function",
    "integrated_autocorrelation_time",
    "chain_mean_stderr",
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


def chain_mean_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean of ``[samples_per_chain, chains]`` values and its standard error from chain means.

    Treating each independent chain as one measurement makes the error honest even if the
    samples within a chain are still correlated.
    """
    values = np.asarray(values, dtype=np.float64)
    chain_means = values.mean(axis=0)
    n_chains = chain_means.size
    stderr = float(chain_means.std(ddof=1) / math.sqrt(n_chains)) if n_chains > 1 else float("nan")
    return float(values.mean()), stderr


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
