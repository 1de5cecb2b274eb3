"""Geometry of particle configurations: CoM removal, pair vectors, random symmetry operations.

Configurations are tensors ``[..., n_particles, n_dims]`` (SPEC §1). Everything the benchmark
stores or scores is centre-of-mass free; the CoM-free subspace U has dimension
``(n_particles - 1) * n_dims`` (paper A.3).
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "remove_com",
    "com_free_basis",
    "pair_indices",
    "pair_vectors",
    "pairwise_distances",
    "random_rotations",
    "random_reflections",
    "random_orthogonal",
    "random_permutations",
    "apply_permutation",
]


def remove_com(x: torch.Tensor) -> torch.Tensor:
    """Project onto the CoM-free subspace U (paper A.3): subtract the particle mean."""
    return x - x.mean(dim=-2, keepdim=True)


def com_free_basis(n_particles: int, n_dims: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal basis ``B`` ``[N·D, (N-1)·D]`` of the CoM-free subspace U (paper A.3).

    Why: a density on U is a density in ``(N - 1) D`` coordinates, so a log-determinant "on U"
    (SPEC §1) is the one of ``Bᵀ J B``, and a flow written for flat vectors acts on
    ``y = Bᵀ vec(x)`` (:mod:`eqbench.flows.flat`). ``B`` is an isometry from R^{(N-1)D} onto U,
    so ``|y| = |x|`` for CoM-free ``x`` and densities carry over without a Jacobian factor.

    The particle part is the Helmert basis, in closed form: column ``k`` (k = 1 … N-1) is
    ``(1, …, 1, -k, 0, …, 0) / sqrt(k (k + 1))`` with ``k`` ones. Unlike an eigendecomposition
    of the centring matrix (whose degenerate eigenspace any LAPACK build may rotate), it is the
    same on every machine, so flat coordinates, and weights trained on them, mean one thing.
    ``vec`` is the row-major flattening ``x.reshape(-1, N * D)``; ``B = H ⊗ I_D``.

    Example:
        >>> b = com_free_basis(4, 2)
        >>> tuple(b.shape)
        (8, 6)
        >>> bool(torch.allclose(b.T @ b, torch.eye(6, dtype=b.dtype)))
        True
        >>> x = remove_com(torch.randn(3, 4, 2, dtype=torch.float64))
        >>> y = x.reshape(3, 8) @ b                      # flat CoM-free coordinates
        >>> bool(torch.allclose((y @ b.T).reshape(3, 4, 2), x))
        True
    """
    if n_particles < 2 or n_dims < 1:
        raise ValueError(f"a CoM-free subspace needs n_particles >= 2 and n_dims >= 1, "
                         f"got {n_particles} and {n_dims}")
    k = torch.arange(1, n_particles, dtype=torch.float64)  # column k has k ones, then -k
    rows = torch.arange(n_particles, dtype=torch.float64).unsqueeze(1)
    helmert = torch.where(rows < k, 1.0, torch.where(rows == k, -k, 0.0)) / torch.sqrt(k * (k + 1))
    return torch.kron(helmert, torch.eye(n_dims, dtype=torch.float64)).to(dtype)


@functools.lru_cache(maxsize=64)
def _pair_indices_cpu(n_particles: int) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = torch.triu_indices(n_particles, n_particles, offset=1)
    return i, j


def pair_indices(n_particles: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors ``(i, j)`` of the unordered pairs ``i < j`` in a fixed order."""
    i, j = _pair_indices_cpu(n_particles)
    return i.to(device), j.to(device)


def pair_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectors ``r_ij = x_i - x_j`` over unordered pairs ``i < j``.

    Returns ``(r, i, j)`` with ``r`` of shape ``[..., n_pairs, n_dims]``.
    """
    i, j = pair_indices(x.shape[-2], x.device)
    # index_select is several times faster than advanced indexing on CPU for this gather.
    return x.index_select(-2, i) - x.index_select(-2, j), i, j


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Distances ``d_ij`` over unordered pairs ``i < j``: shape ``[..., n_pairs]``."""
    r, _, _ = pair_vectors(x)
    return torch.linalg.vector_norm(r, dim=-1)


def random_rotations(
    n: int, n_dims: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Haar-random proper rotations (det +1), shape ``[n, n_dims, n_dims]``.

    QR of a Gaussian matrix with the sign fix of Mezzadri (2007) gives a Haar-random orthogonal
    matrix; flipping one column where the determinant is -1 makes it a rotation.
    """
    a = torch.randn(n, n_dims, n_dims, generator=generator, dtype=dtype)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    det = torch.linalg.det(q)
    q[..., :, 0] = q[..., :, 0] * det.sign().unsqueeze(-1)
    return q


def random_reflections(
    n: int, n_dims: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Random improper orthogonal matrices (det -1): a rotation composed with a mirror."""
    q = random_rotations(n, n_dims, generator=generator, dtype=dtype)
    q[..., :, 0] = -q[..., :, 0]
    return q


def random_orthogonal(
    n: int, n_dims: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Haar-random elements of O(D): rotations and reflections with equal probability."""
    q = random_rotations(n, n_dims, generator=generator, dtype=dtype)
    flip = torch.rand(n, generator=generator) < 0.5
    q[flip, :, 0] = -q[flip, :, 0]
    return q


def random_permutations(n: int, n_particles: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` independent random permutations of the particle indices, shape ``[n, n_particles]``."""
    return torch.argsort(torch.rand(n, n_particles, generator=generator), dim=-1)


def apply_permutation(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Permute particles of each configuration: ``x[b, perm[b]]`` for ``x`` of shape ``[B, N, D]``."""
    return torch.gather(x, -2, perm.to(x.device).unsqueeze(-1).expand_as(x))
