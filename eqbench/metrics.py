"""Pure metric functions on samples, energies and log-densities (SPEC §1; paper §2, §7.1, §7.4).

Every function here takes arrays (numpy arrays, torch tensors or sequences; tensors are detached
and moved to the CPU) and returns floats or float64 numpy arrays. Nothing reads files, trains or
draws plots, so tasks can share one definition of each number and tests can check each against a
case with a known answer.

Conventions (SPEC §1):

- **NLL** is ``-log q(x)`` in nats per configuration (the caller's ``log q`` already includes the
  Gaussian constant of the CoM-free prior).
- **Log importance weights** of samples ``x ~ q`` for the target ``p ∝ exp(-u)`` are
  ``log w = -u(x) - log q(x)``; they are known up to the constant ``log Z``, which cancels in every
  self-normalised quantity below. A weight of zero (``log w = -inf``, e.g. an infinite energy) is
  a valid weight; ``NaN`` and ``+inf`` are not and raise, so callers decide explicitly what to do
  with broken samples instead of having them silently dropped.
- **Which samples count** (:func:`importance_weights`): a sample with ``u = +inf`` (an LJ clash)
  and a finite ``log q`` has weight exactly zero: it stays in every count, because dropping it
  would flatter a flow that produces clashes. Only a sample whose weight is undefined — ``log q``
  NaN or ±inf, energy NaN or ``-inf`` — is left out of the weighted sums, and counted.
- **ESS** is Kish's ``(Σw)² / Σw²`` reported as a fraction of the number of samples: 1 for equal
  weights, ``1/n`` when one weight dominates. Zero weights are part of ``n``; pass ``n_total``
  to make the fraction relative to every sample drawn, undefined ones included.

Bootstrap helpers resample whole samples (rows) with replacement: paper C.7 gives Fig. 3b's error
bars as the standard deviation over 100 reweighted bootstrap resamples, and the same recipe gives
errors of reweighted means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "as_array",
    "nll",
    "log_weights",
    "ImportanceWeights",
    "importance_weights",
    "normalized_weights",
    "ess_fraction",
    "weighted_mean",
    "bootstrap",
    "bootstrap_std",
    "histogram_density",
    "free_energy_profile",
    "radial_free_energy",
    "wasserstein_1d",
    "pair_distances",
    "distance_wasserstein",
    "forward_ess_fraction",
]


def as_array(values: Any) -> np.ndarray:
    """``values`` as a float64 numpy array; torch tensors are detached and copied to the CPU.

    Duck-typed (``detach``) so that importing this module never imports torch.
    """
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def nll(log_q: Any) -> float:
    """Mean negative log-likelihood ``-⟨log q(x)⟩`` in nats per configuration (SPEC §1)."""
    log_q = as_array(log_q)
    if log_q.size == 0:
        raise ValueError("nll of an empty set of log-densities is undefined")
    return float(-log_q.mean())


def log_weights(energy: Any, log_q: Any) -> np.ndarray:
    """Log importance weights ``-u(x) - log q(x)`` of samples ``x ~ q`` (SPEC §1), up to ``log Z``."""
    energy, log_q = as_array(energy), as_array(log_q)
    if energy.shape != log_q.shape:
        raise ValueError(f"energy and log_q must have one value per sample; got shapes {energy.shape} and {log_q.shape}")
    return -energy - log_q


@dataclass(frozen=True)
class ImportanceWeights:
    """Log-weights of a sample set, with what was counted and what was left out.

    ``log_w`` holds one entry per *defined* sample (``defined[i]`` is true), ``-inf`` for the
    zero weights; ``n_total = len(defined)`` counts every sample scored.
    """

    log_w: np.ndarray
    defined: np.ndarray
    n_zero_weight: int
    n_undefined: int

    @property
    def n_total(self) -> int:
        return int(self.defined.size)


def importance_weights(energy: Any, log_q: Any) -> ImportanceWeights:
    """Log importance weights ``-u - log q`` of samples ``x ~ q``, sorted into zero and undefined.

    Why: a sample with infinite energy (``u = +inf``, e.g. two Lennard-Jones particles on top of
    each other) has target density exactly zero, so its importance weight is exactly zero — a
    valid weight that belongs in the ESS denominator and in every count. Removing such samples
    before the ESS (as "non-finite") reports an ESS as if the flow never produced them. A sample
    whose weight cannot be computed — ``log q`` NaN or ±inf (the flow's density is broken there),
    energy NaN, or energy ``-inf`` (an infinite weight) — is *undefined* and left out of
    ``log_w``; it is counted in ``n_undefined`` so the caller can report it and keep it in the
    denominator of the ESS fraction (:func:`ess_fraction` with ``n_total``).
    """
    energy, log_q = as_array(energy), as_array(log_q)
    if energy.shape != log_q.shape or energy.ndim != 1:
        raise ValueError(f"energy and log_q must be 1-D with one value per sample; got {energy.shape} and {log_q.shape}")
    zero = np.isposinf(energy) & np.isfinite(log_q)
    defined = zero | (np.isfinite(energy) & np.isfinite(log_q))
    with np.errstate(invalid="ignore"):
        log_w = -energy[defined] - log_q[defined]
    return ImportanceWeights(log_w=log_w, defined=defined, n_zero_weight=int(zero.sum()),
                             n_undefined=int((~defined).sum()))


def normalized_weights(log_w: Any) -> np.ndarray:
    """Self-normalised weights ``w_i / Σ_j w_j`` from log-weights, computed stably (max shift).

    ``-inf`` gives weight 0; ``NaN`` or ``+inf`` raise ``ValueError`` (an undefined weight cannot be
    normalised), as does a set whose weights are all zero.
    """
    log_w = as_array(log_w)
    if log_w.ndim != 1 or log_w.size == 0:
        raise ValueError(f"log-weights must be a non-empty 1-D array; got shape {log_w.shape}")
    if np.isnan(log_w).any() or np.isposinf(log_w).any():
        raise ValueError("log-weights contain NaN or +inf; remove samples without a finite energy and log q first")
    top = log_w.max()
    if np.isneginf(top):
        raise ValueError("every weight is zero (all log-weights are -inf)")
    w = np.exp(log_w - top)
    return w / w.sum()


def ess_fraction(log_w: Any, n_total: int | None = None) -> float:
    """Kish's effective sample size ``(Σw)² / Σw²`` as a fraction of ``n`` (SPEC §1), in ``[1/n, 1]``.

    ``n`` is the number of log-weights, zero weights (``-inf``) included: a sample with weight
    zero was drawn and is useless, so it lowers the fraction. ``n_total`` (at least the number of
    log-weights) makes the fraction relative to more samples, e.g. every sample drawn when some
    had an undefined weight and were left out (:func:`importance_weights`).
    Invariant to a constant shift of the log-weights, so the unknown ``log Z`` does not matter.
    """
    w = normalized_weights(log_w)
    n = w.size if n_total is None else int(n_total)
    if n < w.size:
        raise ValueError(f"n_total ({n}) cannot be smaller than the number of weights ({w.size})")
    return float(1.0 / (n * np.square(w).sum()))


def weighted_mean(values: Any, log_w: Any | None = None) -> float:
    """Mean of ``values``; with ``log_w`` the self-normalised importance-sampling estimate
    ``Σ w_i f_i / Σ w_i`` of the target expectation (consistent as n → ∞, paper §2).

    A sample of weight zero contributes nothing, whatever its value: the energy of a clash is
    ``+inf`` and its weight 0, and ``0 · inf`` is 0 in the sum (not NaN).
    """
    values = as_array(values)
    if log_w is None:
        return float(values.mean())
    w = normalized_weights(log_w)
    if w.shape != values.shape:
        raise ValueError(f"values and log_w must have one entry per sample; got {values.shape} and {w.shape}")
    keep = w > 0
    return float(np.dot(w[keep], values[keep]))


def bootstrap(
    statistic: Callable[..., Any],
    *arrays: Any,
    n_resamples: int = 100,
    seed: int = 0,
) -> np.ndarray:
    """``statistic(*resampled)`` for ``n_resamples`` bootstrap resamples, stacked on axis 0.

    Each resample draws ``n`` row indices with replacement (``n`` = length of the first axis, the
    same for every array) and applies them to every array jointly, so a sample keeps its weight.
    Reproducible: ``seed`` fixes the indices.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}")
    if not arrays:
        raise ValueError("bootstrap needs at least one array to resample")
    data = [as_array(a) for a in arrays]
    n = len(data[0])
    if n == 0 or any(len(a) != n for a in data):
        raise ValueError(f"bootstrap arrays must be non-empty with equal lengths; got {[len(a) for a in data]}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        out.append(np.asarray(statistic(*(a[idx] for a in data)), dtype=np.float64))
    return np.stack(out)


def bootstrap_std(
    statistic: Callable[..., Any],
    *arrays: Any,
    n_resamples: int = 100,
    seed: int = 0,
) -> np.ndarray | float:
    """Standard deviation over bootstrap resamples (paper C.7's error bars), elementwise.

    Resamples whose statistic is not finite (an empty histogram bin gives ``F = +inf``) are left
    out per element; an element finite in fewer than two resamples gets ``NaN``.
    """
    stats = bootstrap(statistic, *arrays, n_resamples=n_resamples, seed=seed)
    finite = np.isfinite(stats)
    count = finite.sum(axis=0)
    masked = np.where(finite, stats, 0.0)
    mean = masked.sum(axis=0) / np.maximum(count, 1)
    var = np.where(finite, np.square(stats - mean), 0.0).sum(axis=0) / np.maximum(count - 1, 1)
    std = np.where(count >= 2, np.sqrt(var), np.nan)
    return float(std) if std.ndim == 0 else std


def _check_edges(edges: Any) -> np.ndarray:
    edges = as_array(edges)
    if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0):
        raise ValueError("bin edges must be a 1-D increasing array of at least two values")
    return edges


def histogram_density(values: Any, edges: Any, log_w: Any | None = None) -> np.ndarray:
    """Probability density per bin: (weight in the bin) / (total weight × bin width).

    Normalised by the *total* weight, including samples outside ``[edges[0], edges[-1]]``, so mass
    outside the range shows as missing area instead of inflating the bins (a flow sampling high
    energies, paper Fig. 6b, keeps its honest histogram). With ``log_w`` the histogram is reweighted
    to the target density.
    """
    values, edges = as_array(values), _check_edges(edges)
    w = np.full(values.shape, 1.0 / values.size) if log_w is None else normalized_weights(log_w)
    if w.shape != values.shape:
        raise ValueError(f"values and log_w must have one entry per sample; got {values.shape} and {w.shape}")
    mass, _ = np.histogram(values, bins=edges, weights=w)
    return mass / np.diff(edges)


def free_energy_profile(values: Any, edges: Any, log_w: Any | None = None) -> np.ndarray:
    """``F = -log p`` per bin (kT) of a collective variable from (importance-weighted) samples.

    ``p`` is the bin-averaged density of ``values`` *normalised within* ``[edges[0], edges[-1]]``,
    so profiles on the same bins share one reference without fitting an offset (the exact profile
    of :func:`radial_free_energy` is normalised the same way). Empty bins get ``+inf`` (no sample
    there: ``-log 0``), every bin when no sample with non-zero weight lies inside the range. With
    ``log_w`` the samples are reweighted to the target (paper §7.1, Fig. 3b).
    """
    values, edges = as_array(values), _check_edges(edges)
    w = np.ones_like(values) if log_w is None else normalized_weights(log_w)
    if w.shape != values.shape:
        raise ValueError(f"values and log_w must have one entry per sample; got {values.shape} and {w.shape}")
    mass, _ = np.histogram(values, bins=edges, weights=w)
    total = mass.sum()
    if total <= 0:
        return np.full(mass.shape, np.inf)
    with np.errstate(divide="ignore"):
        return -np.log(mass / (total * np.diff(edges)))


def radial_free_energy(
    edges: Any,
    pair_energy: Callable[[np.ndarray], np.ndarray],
    n_dims: int,
    *,
    n_nodes: int = 32,
) -> np.ndarray:
    """Exact bin-averaged ``F(d) = -log p(d)`` of ``d = |r|`` for ``r ∈ R^D`` with density ``∝ exp(-f(|r|))``.

    In polar coordinates the density of ``d`` is ``p(d) ∝ d^(D-1) exp(-f(d))`` (the surface of the
    (D-1)-sphere of radius d); each bin's probability is integrated by Gauss-Legendre quadrature
    with ``n_nodes`` nodes and normalised over the whole range, exactly as
    :func:`free_energy_profile` normalises histograms, so the two are directly comparable.

    Why this is the pair-distance profile of a two-particle system (DW-2, paper Fig. 3b): on the
    CoM-free subspace ``x_1 = -x_2 = r/2`` with ``r = x_1 - x_2``; this linear map from U onto
    ``R^D`` has a constant Jacobian and ``u(x) = f(|r|)``, so ``r`` has density ``∝ exp(-f(|r|))``
    and its length ``d = |x_1 - x_2|`` the density above. (For more than two particles the other
    particles add a d-dependent term and this formula no longer applies.)

    ``pair_energy`` maps an array of distances to energies in kT.
    """
    edges = _check_edges(edges)
    if edges[0] < 0:
        raise ValueError("distances are non-negative: the first bin edge must be >= 0")
    if n_dims < 1:
        raise ValueError(f"n_dims must be a positive integer, got {n_dims}")
    nodes, quad_w = np.polynomial.legendre.leggauss(n_nodes)
    lo, hi = edges[:-1, None], edges[1:, None]
    d = 0.5 * (hi - lo) * nodes[None, :] + 0.5 * (hi + lo)  # [bins, nodes]
    energy = np.asarray(pair_energy(d), dtype=np.float64)
    # log of d^(D-1) exp(-f): shift by the maximum before exponentiating (f can be large).
    with np.errstate(divide="ignore"):
        log_density = (n_dims - 1) * np.log(d) - energy
    shift = log_density.max()
    mass = (np.exp(log_density - shift) * quad_w[None, :]).sum(axis=1) * 0.5 * (hi - lo)[:, 0]
    with np.errstate(divide="ignore"):
        return -np.log(mass / (mass.sum() * np.diff(edges)))


def wasserstein_1d(
    a: Any,
    b: Any,
    p: float = 2.0,
    weights_a: Any | None = None,
    weights_b: Any | None = None,
) -> float:
    """p-Wasserstein distance between two (weighted) 1-D empirical distributions.

    ``W_p^p = ∫_0^1 |F_a^{-1}(t) - F_b^{-1}(t)|^p dt`` with the quantile functions of both step
    distributions, integrated exactly over the merged cumulative-weight breakpoints. For equal,
    unweighted sample sizes this is the mean of ``|sorted(a) - sorted(b)|^p``. Weights are
    non-negative and need not be normalised (pass :func:`normalized_weights` of log-weights for a
    reweighted distribution). Values of weight zero do not enter the quantile function, so they
    may be infinite (a clash's energy). Used for the energy and distance W2 of later work (seed 003).
    """
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    qa, ta = _quantile_steps(a, weights_a, "a")
    qb, tb = _quantile_steps(b, weights_b, "b")
    t = np.union1d(ta, tb)
    dt = np.diff(t, prepend=0.0)
    ia = np.minimum(np.searchsorted(ta, t, side="left"), qa.size - 1)
    ib = np.minimum(np.searchsorted(tb, t, side="left"), qb.size - 1)
    return float(np.dot(dt, np.abs(qa[ia] - qb[ib]) ** p) ** (1.0 / p))


def _quantile_steps(values: Any, weights: Any | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and their cumulative weights (last exactly 1): the quantile step function.

    Values of weight zero are dropped first: they carry no probability mass.
    """
    values = as_array(values).ravel()
    if weights is None:
        w = np.ones_like(values)
    else:
        w = as_array(weights).ravel()
        if w.shape != values.shape or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights of sample {name} must be finite, non-negative, not all zero, one per value")
        values, w = values[w > 0], w[w > 0]
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"sample {name} must be non-empty and finite (where its weight is not zero)")
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(w[order])
    cum /= cum[-1]
    cum[-1] = 1.0
    return values[order], cum


def pair_distances(x: Any) -> np.ndarray:
    """Distances ``|x_i - x_j|`` over unordered pairs ``i < j``: ``[n, N, D]`` → ``[n, N(N-1)/2]``."""
    x = as_array(x)
    if x.ndim != 3 or x.shape[1] < 2:
        raise ValueError(f"configurations must have shape [n, n_particles >= 2, n_dims]; got {x.shape}")
    i, j = np.triu_indices(x.shape[1], k=1)
    return np.linalg.norm(x[:, i] - x[:, j], axis=-1)


def distance_wasserstein(
    x_a: Any,
    x_b: Any,
    p: float = 2.0,
    weights_a: Any | None = None,
    weights_b: Any | None = None,
) -> float:
    """W_p between the interatomic-distance distributions of two configuration sets.

    All pair distances of a set are pooled into one 1-D distribution (each configuration's
    weight spread evenly over its pairs), the usual "interatomic distance W2" of later work.
    """
    d_a, d_b = pair_distances(x_a), pair_distances(x_b)
    return wasserstein_1d(d_a, d_b, p, _per_pair(weights_a, d_a), _per_pair(weights_b, d_b))


def _per_pair(weights: Sequence[float] | Any | None, d: np.ndarray) -> np.ndarray | None:
    if weights is None:
        return None
    w = as_array(weights)
    if w.shape != d.shape[:1]:
        raise ValueError(f"need one weight per configuration ({d.shape[0]}); got shape {w.shape}")
    return np.repeat(w, d.shape[1])


def forward_ess_fraction(log_w: Any) -> float:
    """Forward effective sample size as a fraction, from log-weights of samples of the *target*.

    ``log_w = -u(x) - log q(x)`` evaluated at configurations ``x ~ p`` (an MCMC test set), not at
    flow samples. Definition of Midgley et al. 2023 (SE(3) augmented coupling flows, NeurIPS;
    after their FAB paper, ICLR 2023), as computed by ``calculate_forward_ess`` in their code
    (``eacf/train/max_lik_train_and_eval.py``)::

        ESS_fwd / n = 1 / (mean_i w_i · mean_i 1/w_i) = n² / (Σ_i w_i · Σ_i 1/w_i).

    Why it works: with ``w = Z p/q``, ``mean(1/w) → E_p[q/p] / Z = 1/Z`` estimates the inverse
    normalising constant, and ``mean(w) → Z E_p[p/q]``, so the fraction tends to
    ``1 / E_p[p/q] = 1 / E_q[(p/q)²]``: the same limit as Kish's reverse ESS fraction
    (:func:`ess_fraction`), but estimated from target samples, so it sees modes the flow misses
    (a flow that drops a mode has a huge ``w`` at the test points there), which the reverse ESS
    of flow samples cannot. Invariant to a constant shift of ``log_w`` (``log Z`` cancels); in
    ``(0, 1]`` by Cauchy-Schwarz, 1 exactly when all weights are equal (q ∝ p on the samples).

    For a model of an extended space (an auxiliary variable ``a``, e.g. an augmented flow) pass
    ``log q(x, a) - log π(a|x)`` with one ``a ~ π(a|x)`` per test configuration: the weights are
    then those of the extended target ``p(x) π(a|x)``, as in Midgley et al.'s code.

    A weight of zero or infinity (``log_w = ±inf``: the flow gives a test configuration no
    density, or the target does) makes one of the sums infinite and the fraction 0; ``NaN``
    raises (an undefined weight: leave such configurations out and count them).

    Example:
        >>> forward_ess_fraction([0.3, 0.3, 0.3])
        1.0
        >>> round(forward_ess_fraction([0.0, np.log(4.0)]), 4)  # 4 / ((1 + 4)(1 + 1/4))
        0.64
    """
    log_w = as_array(log_w)
    if log_w.ndim != 1 or log_w.size == 0:
        raise ValueError(f"log-weights must be a non-empty 1-D array; got shape {log_w.shape}")
    if np.isnan(log_w).any():
        raise ValueError("log-weights contain NaN; leave out the configurations whose weight is undefined")
    if np.isinf(log_w).any():
        return 0.0
    n = log_w.size
    shift = log_w.mean()  # centre: both sums are then of order n, neither overflows first
    centred = log_w - shift
    log_sum_w = _logsumexp(centred)
    log_sum_inv = _logsumexp(-centred)
    return float(min(1.0, np.exp(2.0 * np.log(n) - log_sum_w - log_sum_inv)))


def _logsumexp(values: np.ndarray) -> float:
    top = values.max()
    return float(top + np.log(np.exp(values - top).sum()))
