"""Equivariant per-particle frames from equivariant vectors ("Cartesian projection").

The SE(3) augmented coupling flow (Midgley et al. NeurIPS 2023, §3.2 "Cartesian projection";
code ``eacf/flow/bijectors/proj_coupling.py:19-50``) expresses each transformed particle in a
local frame: an origin and an orthonormal basis, both built from equivariant vectors that an
EGNN computes from the *conditioning* variables. A transform applied in that frame and mapped
back is equivariant whenever the frame is: for a rotation R, ``frame(R v) = R frame(v)``.

Two constructions (columns of the returned ``[..., D, D]`` matrix are the basis vectors):

- :func:`right_handed_frame` (the authors'), from ``D - 1`` vectors: ``e₁ = v₁/|v₁|``; in 2-D
  ``e₂`` is ``e₁`` turned by +90°; in 3-D ``e₂`` is the normalised rejection of ``v₂`` from
  ``e₁`` and ``e₃ = e₁ × e₂``. The frame always has determinant +1, so it is equivariant under
  rotations (proper, det +1) but **not** under reflections: a mirror M maps ``v`` to ``M v``
  but the frame to ``M F diag(1, …, 1, -1)`` (the last axis is fixed by handedness, not by the
  vectors). A flow built on it is SE(D) × S_N equivariant, not E(D) × S_N.
- :func:`gram_schmidt_frame` (an eqbench option), from ``D`` vectors: plain Gram–Schmidt. Every
  step is O(D)-equivariant, so the frame is equivariant under rotations *and* reflections, at
  the price of one more vector per particle.

Norms are ``sqrt(max(|v|², ε²))`` with ε = 1e-12 (the authors use ``where(|v|² = 0, 1, |v|²)``):
equivariant, smooth away from zero, and finite when an EGNN returns an exactly zero vector.
Degenerate inputs (parallel vectors) give ill-conditioned frames; the authors add a log-barrier
on the angle between the two 3-D vectors to the training loss for LJ-13 (``proj_coupling.py:
164-200``, weight 10 in ``examples/config/lj13.yaml``): :func:`frame_barrier`, used by
``se3-acf``'s ``frame_penalty`` setting (off by default).
"""

from __future__ import annotations

import torch

__all__ = ["FRAMES", "frame_barrier", "frame_vectors", "gram_schmidt_frame", "right_handed_frame"]

#: Names of the frame constructions (the ``frame`` setting of ``se3-acf``).
FRAMES = ("right-handed", "gram-schmidt")
_EPS2 = 1e-24


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.pow(2).sum(-1, keepdim=True).clamp_min(_EPS2).sqrt()


def _reject(v: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    return v - (v * unit).sum(-1, keepdim=True) * unit


def frame_vectors(frame: str, n_dims: int) -> int:
    """How many equivariant vectors a frame needs: ``D - 1`` (right-handed) or ``D`` (Gram–Schmidt)."""
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {', '.join(FRAMES)}; got {frame!r}")
    return n_dims - 1 if frame == "right-handed" else n_dims


#: Below this ``1 - |cos θ|`` the barrier is switched off (the authors' choice: gradients of a
#: barrier at nearly parallel vectors would explode).
BARRIER_FLOOR = 1e-4


def frame_barrier(vectors: torch.Tensor) -> torch.Tensor:
    """``-log(1 - |cos θ|)`` between the first two frame vectors ``[..., k >= 2, D]``, shape ``[...]``.

    The authors' log-barrier that keeps the two vectors of a right-handed 3-D frame from turning
    parallel (where the frame is ill-conditioned): 0 for orthogonal vectors, growing without
    bound as they align, and 0 again where ``1 - |cos θ| < BARRIER_FLOOR`` (switched off there,
    as in their code). Invariant under rotations, reflections and rescaling of either vector.

    Example:
        >>> v = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])  # 45°: -log(1 - 1/√2)
        >>> round(float(frame_barrier(v)), 6)
        1.227947
    """
    if vectors.shape[-2] < 2:
        raise ValueError(f"frame_barrier needs two vectors per frame, got {vectors.shape[-2]}")
    v1, v2 = vectors[..., 0, :], vectors[..., 1, :]
    norms = (v1.pow(2).sum(-1).clamp_min(_EPS2) * v2.pow(2).sum(-1).clamp_min(_EPS2)).sqrt()
    gap = 1.0 - ((v1 * v2).sum(-1) / norms).abs()
    return -torch.where(gap < BARRIER_FLOOR, torch.ones_like(gap), gap).log()


def right_handed_frame(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal right-handed frames ``[..., D, D]`` (columns) from ``vectors`` ``[..., D-1, D]``,
    D ∈ {2, 3} (module docstring)."""
    d = vectors.shape[-1]
    e1 = _normalise(vectors[..., 0, :])
    if d == 2:
        e2 = torch.stack((-e1[..., 1], e1[..., 0]), dim=-1)
        return torch.stack((e1, e2), dim=-1)
    if d == 3:
        e2 = _normalise(_reject(vectors[..., 1, :], e1))
        e3 = torch.linalg.cross(e1, e2, dim=-1)
        return torch.stack((e1, e2, e3), dim=-1)
    raise ValueError(f"right-handed frames are defined for 2 or 3 dimensions, got {d}")


def gram_schmidt_frame(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal frames ``[..., D, D]`` (columns) by Gram–Schmidt of ``vectors`` ``[..., D, D]``
    (rows are the input vectors), equivariant under all of O(D)."""
    basis: list[torch.Tensor] = []
    for k in range(vectors.shape[-2]):
        v = vectors[..., k, :]
        for e in basis:
            v = _reject(v, e)
        basis.append(_normalise(v))
    return torch.stack(basis, dim=-1)
