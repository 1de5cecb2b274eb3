"""Energy minimisation and minimum checks for the metastable-states task (paper §7.5, SPEC §5).

Paper §7.5 counts the distinct metastable states a sampler reaches: every sample is minimised,
saddle points are discarded, and the remaining minima are clustered by their sorted pairwise
distances. This module provides the first two steps:

- :func:`minimize`: a batched, vectorised L-BFGS with a per-configuration backtracking (Armijo)
  line search. SPEC §5 asks for a *non-momentum* method, so that a minimisation ends in the
  basin its starting point lies in instead of coasting over barriers; L-BFGS builds a
  quasi-Newton model from recent gradient differences and carries no velocity, and each step is
  accepted only if it lowers the energy. Configurations that do not reach the gradient tolerance
  are flagged (``converged == False``), never dropped silently: SPEC §5 says they are counted,
  not clustered.
- :func:`hessian`, :func:`projected_hessian_eigenvalues`, :func:`is_minimum`: a stationary point
  is a minimum when the Hessian is positive definite on the complement of the symmetry zero
  modes (D translations and D(D-1)/2 rotations, SPEC §5); a saddle has a negative eigenvalue.

Clustering into distinct minima is done by the metastable-states task;
:func:`sorted_distance_signature` is the invariant it clusters on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from eqbench.geometry import pairwise_distances, remove_com
from eqbench.systems.base import ParticleSystem

__all__ = [
    "MinimizationResult",
    "hessian",
    "hessians",
    "is_minimum",
    "minimize",
    "projected_hessian_eigenvalues",
    "sorted_distance_signature",
    "zero_mode_basis",
]


@dataclass(frozen=True)
class MinimizationResult:
    """Outcome of :func:`minimize` for a batch of ``B`` configurations.

    ``converged[b]`` is True when ``grad_norm[b] < gtol``; unconverged rows are still returned
    (at their last accepted position) so callers can count them (SPEC §5).
    """

    x: torch.Tensor  #: minimised, CoM-free positions ``[B, N, D]``
    energy: torch.Tensor  #: ``u(x)`` ``[B]``
    grad_norm: torch.Tensor  #: Euclidean norm of ``∇u`` over all N·D coordinates ``[B]``
    converged: torch.Tensor  #: bool ``[B]``: ``grad_norm < gtol``
    steps: torch.Tensor  #: int64 ``[B]``: accepted L-BFGS steps used by each configuration
    gtol: float  #: the tolerance the ``converged`` mask refers to

    @property
    def n_converged(self) -> int:
        return int(self.converged.sum())

    @property
    def n_unconverged(self) -> int:
        return int((~self.converged).sum())


def _energy_and_gradient(
    system: ParticleSystem, flat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy and analytic gradient for flat ``[k, N*D]`` coordinates."""
    x = flat.reshape(-1, system.n_particles, system.n_dims)
    return system.energy(x), system.gradient(x).reshape(flat.shape)


def _lbfgs_direction(
    g: torch.Tensor,
    s: torch.Tensor,
    y: torch.Tensor,
    rho: torch.Tensor,
    gamma: torch.Tensor,
    order: list[int],
) -> torch.Tensor:
    """Two-loop recursion (Nocedal & Wright, Alg. 7.4), vectorised over the batch.

    ``s, y`` are ``[k, m, n]`` ring buffers, ``rho = 1 / (s·y)`` ``[k, m]`` with 0 marking an empty
    or rejected slot (such a slot then contributes nothing), ``order`` lists slots newest first.
    Returns the quasi-Newton direction ``-H g``.
    """
    q = g.clone()
    alpha = torch.zeros_like(rho)
    for i in order:
        a = rho[:, i] * (s[:, i] * q).sum(-1)
        alpha[:, i] = a
        q = q - a.unsqueeze(-1) * y[:, i]
    r = gamma.unsqueeze(-1) * q
    for i in reversed(order):
        b = rho[:, i] * (y[:, i] * r).sum(-1)
        r = r + (alpha[:, i] - b).unsqueeze(-1) * s[:, i]
    return -r


def minimize(
    system: ParticleSystem,
    x: torch.Tensor,
    *,
    max_steps: int = 10_000,
    gtol: float = 1e-6,
    memory: int = 10,
    max_displacement: float = 0.3,
    c1: float = 1e-4,
    max_backtracks: int = 60,
) -> MinimizationResult:
    """Minimise ``u`` from each configuration of ``x`` ``[B, N, D]`` (float64 recommended).

    Batched L-BFGS without momentum (SPEC §5, paper §7.5). Each configuration has its own
    line search: the step starts at 1 along the quasi-Newton direction, capped so that no
    particle moves more than ``max_displacement`` (Lennard-Jones gradients of overlapping
    starts reach 1e12), and is halved until the Armijo condition
    ``u(x + t d) <= u(x) + c1 t ∇u·d`` holds. Close to a minimum, energy differences fall below
    float64 resolution before the gradient reaches ``gtol``; there a step is also accepted when
    the energy has not risen beyond rounding and the directional derivative shows the step did
    not overshoot (the "approximate Wolfe" test of Hager & Zhang, 2005), so the energy may rise
    by at most 1e-12 (1 + |u|) in such a step. A failed line search
    clears the L-BFGS memory (the next step is steepest descent); a failed steepest-descent line
    search stops that configuration, which then stays unconverged.

    A configuration stops once ``|∇u| < gtol`` (Euclidean norm over all N·D coordinates) or
    after ``max_steps`` accepted steps. The gradient of a translation-invariant energy has zero
    mean over particles, so iterates stay centre-of-mass free; the result is re-centred anyway.
    """
    system.check_shape(x)
    if x.ndim != 3:
        raise ValueError(
            f"minimize expects a batch of shape [B, {system.n_particles}, {system.n_dims}], got {list(x.shape)}"
        )
    if max_steps < 0 or gtol <= 0 or memory < 1 or max_displacement <= 0:
        raise ValueError(
            "minimize needs max_steps >= 0, gtol > 0, memory >= 1, max_displacement > 0"
        )
    x = x.detach()
    batch, n_coord = x.shape[0], system.dim
    pos = remove_com(x).reshape(batch, n_coord).clone()
    with torch.no_grad():
        energy, grad = _energy_and_gradient(system, pos)
    if not torch.isfinite(energy).all():
        raise ValueError("minimize: non-finite energy at some starting configurations")
    gnorm = grad.norm(dim=-1)
    steps = torch.zeros(batch, dtype=torch.long, device=x.device)

    # Working state is kept compact (only rows still running); finished rows are written back
    # to ``pos/energy/grad/steps`` once, which avoids a gather and scatter of the L-BFGS memory
    # every step.
    idx = (gnorm >= gtol).nonzero().squeeze(-1)
    p_c, e_c, g_c = pos[idx], energy[idx], grad[idx]
    k = idx.numel()
    s_c = x.new_zeros(k, memory, n_coord)
    y_c = x.new_zeros(k, memory, n_coord)
    rho_c = x.new_zeros(k, memory)  # 1 / (s·y); 0 marks an empty or rejected slot
    gamma_c = x.new_ones(k)  # initial inverse-Hessian scale s·y / y·y of the newest pair
    steps_c = torch.zeros(k, dtype=torch.long, device=x.device)
    slot = 0  # ring-buffer pointer shared by all rows: each running row stores (or rejects) one pair per step
    # Approximate-Wolfe slack: energies are resolved only to about this relative precision.
    rounding = 1e-12

    with torch.no_grad():
        for _ in range(max_steps):
            if k == 0:
                break
            order = [(slot - 1 - i) % memory for i in range(memory)]
            d = _lbfgs_direction(g_c, s_c, y_c, rho_c, gamma_c, order)
            gd = (g_c * d).sum(-1)
            # Guard against a non-descent quasi-Newton direction (possible after rejected pairs).
            bad = ~(gd < 0)
            if bad.any():
                d[bad] = -g_c[bad]
                gd = torch.where(bad, -(g_c * g_c).sum(-1), gd)
                rho_c[bad] = 0.0
                gamma_c[bad] = 1.0
            move = d.reshape(k, system.n_particles, system.n_dims).norm(dim=-1).amax(-1)
            t = torch.clamp(max_displacement / move, max=1.0)

            new_p, new_e, new_g = p_c.clone(), e_c.clone(), g_c.clone()
            accepted = torch.zeros(k, dtype=torch.bool, device=x.device)
            pi = torch.arange(k, device=x.device)
            for _ in range(max_backtracks):
                trial = p_c[pi] + t[pi].unsqueeze(-1) * d[pi]
                e_t, g_t = _energy_and_gradient(system, trial)
                armijo = e_t <= e_c[pi] + c1 * t[pi] * gd[pi]
                slack = rounding * (1.0 + e_c[pi].abs())
                approx_wolfe = (e_t <= e_c[pi] + slack) & ((g_t * d[pi]).sum(-1) <= -0.8 * gd[pi])
                ok = (armijo | approx_wolfe) & torch.isfinite(e_t)
                oi = pi[ok]
                new_p[oi], new_e[oi], new_g[oi] = trial[ok], e_t[ok], g_t[ok]
                accepted[oi] = True
                pi = pi[~ok]
                if pi.numel() == 0:
                    break
                t[pi] *= 0.5

            # Curvature pairs of the accepted steps (a rejected pair leaves an empty slot).
            s_new = new_p - p_c
            y_new = new_g - g_c
            sy = (s_new * y_new).sum(-1)
            yy = (y_new * y_new).sum(-1)
            good = accepted & (sy > 1e-12 * yy.sqrt() * s_new.norm(dim=-1))
            safe_sy = torch.where(good, sy, torch.ones_like(sy))
            safe_yy = torch.where(good, yy, torch.ones_like(yy))
            s_c[:, slot] = s_new
            y_c[:, slot] = y_new
            rho_c[:, slot] = torch.where(good, 1.0 / safe_sy, torch.zeros_like(sy))
            gamma_c = torch.where(good, safe_sy / safe_yy, gamma_c)
            slot = (slot + 1) % memory

            # A failed line search clears the memory; if it was already clear (steepest
            # descent failed as well) the row cannot make progress and stops, unconverged.
            failed = ~accepted
            stalled = failed & (rho_c == 0).all(-1)
            if failed.any():
                rho_c[failed] = 0.0
                gamma_c = torch.where(failed, torch.ones_like(gamma_c), gamma_c)
            p_c, e_c, g_c = new_p, new_e, new_g
            steps_c += accepted.long()

            done = (g_c.norm(dim=-1) < gtol) | stalled
            if done.any():
                di = idx[done]
                pos[di], energy[di], grad[di], steps[di] = (
                    p_c[done],
                    e_c[done],
                    g_c[done],
                    steps_c[done],
                )
                keep = ~done
                idx, p_c, e_c, g_c = idx[keep], p_c[keep], e_c[keep], g_c[keep]
                s_c, y_c, rho_c, gamma_c, steps_c = (
                    s_c[keep],
                    y_c[keep],
                    rho_c[keep],
                    gamma_c[keep],
                    steps_c[keep],
                )
                k = idx.numel()

    # Rows still running after max_steps keep their last (lowest-energy) position, unconverged.
    if k:
        pos[idx], energy[idx], grad[idx], steps[idx] = p_c, e_c, g_c, steps_c
    gnorm = grad.norm(dim=-1)
    out = remove_com(pos.reshape(batch, system.n_particles, system.n_dims))
    return MinimizationResult(
        x=out, energy=energy, grad_norm=gnorm, converged=gnorm < gtol, steps=steps, gtol=gtol
    )


def _energy_of_flat(system: ParticleSystem) -> Callable[[torch.Tensor], torch.Tensor]:
    shape = (system.n_particles, system.n_dims)
    return lambda flat: system.energy(flat.reshape(shape))


def hessian(system: ParticleSystem, x: torch.Tensor) -> torch.Tensor:
    """Hessian ``∂²u/∂x∂x`` ``[N*D, N*D]`` of one configuration ``[N, D]`` by autograd.

    Autograd on the flat Cartesian coordinates, independent of the systems' analytic
    derivatives, so the minimum check does not rely on the code it helps to test.
    """
    system.check_shape(x)
    if x.ndim != 2:
        raise ValueError(
            f"hessian expects one configuration [{system.n_particles}, {system.n_dims}], got {list(x.shape)}"
        )
    flat = x.detach().reshape(-1)
    return torch.autograd.functional.hessian(_energy_of_flat(system), flat)


def hessians(system: ParticleSystem, x: torch.Tensor) -> torch.Tensor:
    """Hessians ``[B, N*D, N*D]`` of a batch ``[B, N, D]`` by autograd.

    Configurations do not interact, so the gradient of the summed energy holds every row's
    gradient; one backward pass per coordinate (N·D passes, independent of B) then gives all
    Hessian rows at once. Much faster than a per-configuration loop or ``vmap`` for the
    thousands of minima of §7.5.
    """
    system.check_shape(x)
    if x.ndim != 3:
        raise ValueError(
            f"hessians expects [B, {system.n_particles}, {system.n_dims}], got {list(x.shape)}"
        )
    batch, n_coord = x.shape[0], system.dim
    with torch.enable_grad():
        flat = x.detach().reshape(batch, n_coord).clone().requires_grad_(True)
        energy = system.energy(flat.reshape(x.shape)).sum()
        (grad,) = torch.autograd.grad(energy, flat, create_graph=True)
        rows = []
        for c in range(n_coord):
            (row,) = torch.autograd.grad(grad[:, c].sum(), flat, retain_graph=c < n_coord - 1)
            rows.append(row)
    return torch.stack(rows, dim=1).detach()


def _zero_modes(system: ParticleSystem, x: torch.Tensor) -> torch.Tensor:
    """Unnormalised symmetry zero modes ``[B, N*D, K]`` for configurations ``[B, N, D]``."""
    batch, dim = x.shape[0], system.n_dims
    centred = (x - x.mean(dim=-2, keepdim=True)).detach()
    modes: list[torch.Tensor] = []
    if "translation" in system.symmetries:
        for a in range(dim):
            v = torch.zeros_like(centred)
            v[..., a] = 1.0
            modes.append(v.reshape(batch, -1))
    if "rotation" in system.symmetries:
        for a in range(dim):
            for b in range(a + 1, dim):
                v = torch.zeros_like(centred)
                v[..., a] = -centred[..., b]
                v[..., b] = centred[..., a]
                modes.append(v.reshape(batch, -1))
    if not modes:
        return centred.new_zeros(batch, system.dim, 0)
    return torch.stack(modes, dim=-1)


def _orthonormalise(modes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors ``[B, n, K]`` and the numerical rank ``[B]`` of each mode set."""
    u, sv, _ = torch.linalg.svd(modes, full_matrices=False)
    scale = torch.clamp(sv.amax(dim=-1, keepdim=True), min=1.0) if sv.shape[-1] else sv
    rank = (sv > 1e-8 * scale).sum(-1)
    return u, rank


def zero_mode_basis(system: ParticleSystem, x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``[N*D, k]`` of the symmetry zero modes at one configuration ``[N, D]``.

    A translation-invariant energy is flat along the D uniform shifts; a rotation-invariant one
    along the D(D-1)/2 infinitesimal rotations ``δx_i = A (x_i - x̄)`` (A antisymmetric) about the
    centroid (SPEC §5). For LJ-13 the CoM oscillator ``½ Σ |x_i - x̄|²`` is invariant under both,
    so the same modes are zero modes there. Which modes are projected follows
    ``system.symmetries``. Rotation modes vanish for degenerate geometries (e.g. rotations about
    the axis of a collinear 3-D configuration): the SVD keeps only independent directions, so
    ``k`` can be smaller than ``D + D(D-1)/2``.
    """
    system.check_shape(x)
    u, rank = _orthonormalise(_zero_modes(system, x.reshape(1, *system.event_shape)))
    return u[0, :, : int(rank[0])]


def _projected_eigenvalues_batch(
    system: ParticleSystem, x: torch.Tensor, h: torch.Tensor
) -> list[torch.Tensor]:
    """Per-row ascending eigenvalues of ``h`` on the complement of the zero modes of ``x``.

    The complement is spanned by the eigenvectors of the projector ``I - Q Qᵀ`` with eigenvalue
    1, so the zero modes are removed exactly rather than shifted. Rows are grouped by the number
    of zero modes (it differs only for degenerate geometries) and each group is batched.
    """
    u, rank = _orthonormalise(_zero_modes(system, x))
    n_coord = h.shape[-1]
    eye = torch.eye(n_coord, dtype=h.dtype, device=h.device)
    h_sym = 0.5 * (h + h.transpose(-1, -2))
    out: list[torch.Tensor | None] = [None] * x.shape[0]
    for r in torch.unique(rank).tolist():
        rows = (rank == r).nonzero().squeeze(-1)
        q = u[rows, :, :r]
        projector = eye - q @ q.transpose(-1, -2)
        _, vecs = torch.linalg.eigh(projector)
        comp = vecs[..., r:]  # eigenvalue-1 eigenvectors: an orthonormal basis of the complement
        evals = torch.linalg.eigvalsh(comp.transpose(-1, -2) @ h_sym[rows] @ comp)
        for j, row in enumerate(rows.tolist()):
            out[row] = evals[j]
    return out  # type: ignore[return-value]


def projected_hessian_eigenvalues(
    system: ParticleSystem, x: torch.Tensor, h: torch.Tensor | None = None
) -> torch.Tensor:
    """Ascending Hessian eigenvalues on the complement of the zero modes, ``[N*D - k]``, for one
    configuration ``[N, D]`` (``h``: its Hessian, computed by :func:`hessian` when omitted)."""
    system.check_shape(x)
    if x.ndim != 2:
        raise ValueError(
            f"expects one configuration [{system.n_particles}, {system.n_dims}], got {list(x.shape)}"
        )
    if h is None:
        h = hessian(system, x)
    return _projected_eigenvalues_batch(system, x.unsqueeze(0), h.unsqueeze(0))[0]


def is_minimum(system: ParticleSystem, x: torch.Tensor, tol: float = 1e-6) -> bool | torch.Tensor:
    """True where every non-zero-mode Hessian eigenvalue exceeds ``tol`` (SPEC §5, paper §7.5).

    Meant for converged stationary points: a saddle has a negative projected eigenvalue, a
    degenerate (non-strict) stationary point one near zero; both are rejected. ``x`` is one
    configuration ``[N, D]`` (returns a bool) or a batch ``[B, N, D]`` (returns a bool tensor).
    """
    system.check_shape(x)
    if x.ndim == 2:
        return bool(projected_hessian_eigenvalues(system, x).min() > tol)
    if x.ndim != 3:
        raise ValueError(f"is_minimum expects [N, D] or [B, N, D], got {list(x.shape)}")
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    evals = _projected_eigenvalues_batch(system, x, hessians(system, x))
    return torch.tensor([bool(e.min() > tol) for e in evals], dtype=torch.bool)


def sorted_distance_signature(x: torch.Tensor) -> torch.Tensor:
    """Sorted pairwise distances ``[..., N(N-1)/2]``: invariant to rotation, reflection,
    translation and permutation; the key on which §7.5 equates minima."""
    return torch.sort(pairwise_distances(x), dim=-1).values
