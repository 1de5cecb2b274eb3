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

- :func:`gradient_descent`: the alternative of the authors' code for §7.5 (en_flows
  ``deprecated/eqnode/minima.py``): plain fixed small steps until the gradient norm is below a
  tolerance; :func:`minimize_with` selects either by name (:data:`MINIMIZERS`).
- :func:`sorted_distance_signature`, :func:`distinct_minima`: the third step. By default two minima are
  equated when their sorted pairwise-distance vectors lie within ``eps`` (Euclidean norm), and
  equality is made transitive by single linkage (connected components of the "within ``eps``"
  graph). Copies of one minimum (rotated, reflected, permuted, translated) have identical
  signatures up to the minimiser's tolerance, so they always end in one component; a component
  may also swallow different minima whose signatures happen to be close. The number of
  components is therefore a lower bound on the number of distinct minima, as paper §7.5 says of
  its count, and it does not depend on the order of the samples. The authors' code instead
  measures the L1 norm and lets each configuration join the first representative within ``eps``
  (``norm = "l1"``, ``rule = "first-representative"``).
- :func:`census_of_minima`: all of it for a sample set: non-finite samples dropped and counted,
  minimisation, unconverged runs and saddles dropped and counted (SPEC §5), clustering of the
  rest into a :class:`MinimaCensus` that counts distinct minima per energy bin, at other
  thresholds (``with_eps``) and against a reference set (:func:`novel_minima`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from eqbench.geometry import pairwise_distances, remove_com
from eqbench.systems.base import ParticleSystem

__all__ = [
    "MinimaCensus",
    "MinimizationResult",
    "census_of_minima",
    "CLUSTER_NORMS",
    "CLUSTER_RULES",
    "MINIMIZERS",
    "distinct_minima",
    "gradient_descent",
    "hessian",
    "hessians",
    "is_minimum",
    "minimize",
    "minimize_with",
    "novel_minima",
    "projected_hessian_eigenvalues",
    "sorted_distance_signature",
    "sorted_signature_distance",
    "zero_mode_basis",
]

#: Minimisers :func:`census_of_minima` can use: eqbench's L-BFGS (:func:`minimize`) or the plain
#: fixed-step gradient descent of the authors' code (:func:`gradient_descent`).
MINIMIZERS: tuple[str, ...] = ("lbfgs", "gradient-descent")
#: Norms on the difference of sorted pair-distance vectors: eqbench's Euclidean (``"l2"``) or the
#: authors' code's sum of absolute differences (``"l1"``).
CLUSTER_NORMS: tuple[str, ...] = ("l2", "l1")
#: Rules that turn "within eps" into clusters (:func:`distinct_minima`): eqbench's connected
#: components (``"single-linkage"``) or the authors' code's greedy ``"first-representative"``.
CLUSTER_RULES: tuple[str, ...] = ("single-linkage", "first-representative")
_NORM_P = {"l2": 2.0, "l1": 1.0}


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


def _start(system: ParticleSystem, x: torch.Tensor, name: str
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat CoM-free starting positions ``[B, N·D]`` with their energies and gradients; refuses a
    batch of the wrong shape or with a non-finite starting energy (``name``: the minimiser)."""
    system.check_shape(x)
    if x.ndim != 3:
        raise ValueError(
            f"{name} expects a batch of shape [B, {system.n_particles}, {system.n_dims}], got {list(x.shape)}"
        )
    pos = remove_com(x.detach()).reshape(x.shape[0], system.dim).clone()
    with torch.no_grad():
        energy, grad = _energy_and_gradient(system, pos)
    if not torch.isfinite(energy).all():
        raise ValueError(f"{name}: non-finite energy at some starting configurations")
    return pos, energy, grad


def _result(system: ParticleSystem, pos: torch.Tensor, energy: torch.Tensor, grad: torch.Tensor,
            steps: torch.Tensor, gtol: float) -> MinimizationResult:
    """The end positions re-centred, with convergence judged by ``|∇u| < gtol``."""
    gnorm = grad.norm(dim=-1)
    out = remove_com(pos.reshape(pos.shape[0], system.n_particles, system.n_dims))
    return MinimizationResult(x=out, energy=energy, grad_norm=gnorm, converged=gnorm < gtol, steps=steps, gtol=gtol)


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
    if max_steps < 0 or gtol <= 0 or memory < 1 or max_displacement <= 0:
        raise ValueError(
            "minimize needs max_steps >= 0, gtol > 0, memory >= 1, max_displacement > 0"
        )
    pos, energy, grad = _start(system, x, "minimize")
    batch, n_coord = pos.shape
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
    return _result(system, pos, energy, grad, steps, gtol)


def gradient_descent(
    system: ParticleSystem,
    x: torch.Tensor,
    *,
    step: float = 1e-3,
    gtol: float = 1e-6,
    max_steps: int = 100_000,
    max_displacement: float = 0.01,
) -> MinimizationResult:
    """Plain fixed-step gradient descent ``x <- x - step ∇u(x)`` from each configuration ``[B, N, D]``.

    The minimiser of the authors' code for paper §7.5 (en_flows ``deprecated/eqnode/minima.py``,
    ``optimize``: step 1e-3, up to 1e5 steps, no momentum, no line search). With small steps the
    path follows the steepest-descent flow, so it ends in the basin of attraction of the start,
    which a quasi-Newton step of a particle diameter need not do. Two differences to that code,
    both needed for samples of an untrained generator: each configuration stops on its own once
    ``|∇u| < gtol`` (Euclidean norm over all N·D coordinates, the convention of :func:`minimize`;
    the authors stop the whole batch when the largest squared norm is below their threshold),
    and a step that would move a particle further than ``max_displacement`` is shortened to that
    length (overlapping Lennard-Jones starts have gradients of 1e12, which a fixed step would
    turn into an explosion; near a minimum the cap is never reached). A row whose energy
    becomes non-finite stops and stays unconverged; ``steps`` counts the steps taken.
    """
    if max_steps < 0 or not gtol > 0 or not step > 0 or not max_displacement > 0:
        raise ValueError("gradient_descent needs max_steps >= 0, gtol > 0, step > 0, max_displacement > 0")
    pos, energy, grad = _start(system, x, "gradient_descent")
    steps = torch.zeros(pos.shape[0], dtype=torch.long, device=x.device)
    idx = (grad.norm(dim=-1) >= gtol).nonzero().squeeze(-1)
    p_c, g_c = pos[idx], grad[idx]
    with torch.no_grad():
        for _ in range(max_steps):
            if idx.numel() == 0:
                break
            d = -step * g_c
            move = d.reshape(-1, system.n_particles, system.n_dims).norm(dim=-1).amax(-1)
            d = d * torch.clamp(max_displacement / move, max=1.0).unsqueeze(-1)
            trial = p_c + d
            e_t, g_t = _energy_and_gradient(system, trial)
            finite = torch.isfinite(e_t) & torch.isfinite(g_t).all(-1)
            steps[idx[finite]] += 1
            p_c = torch.where(finite.unsqueeze(-1), trial, p_c)
            g_c = torch.where(finite.unsqueeze(-1), g_t, g_c)
            pos[idx], grad[idx] = p_c, g_c
            energy[idx[finite]] = e_t[finite]
            keep = finite & (g_c.norm(dim=-1) >= gtol)
            idx, p_c, g_c = idx[keep], p_c[keep], g_c[keep]
    return _result(system, pos, energy, grad, steps, gtol)


def minimize_with(
    system: ParticleSystem,
    x: torch.Tensor,
    *,
    minimizer: str = "lbfgs",
    gtol: float = 1e-6,
    max_steps: int = 10_000,
    max_displacement: float = 0.3,
    gd_step: float = 1e-3,
) -> MinimizationResult:
    """Minimise with the named method (:data:`MINIMIZERS`): ``"lbfgs"`` is :func:`minimize` with
    its per-particle step cap ``max_displacement``; ``"gradient-descent"`` is
    :func:`gradient_descent` with step ``gd_step`` (its displacement cap stays at its default)."""
    if minimizer == "lbfgs":
        return minimize(system, x, gtol=gtol, max_steps=max_steps, max_displacement=max_displacement)
    if minimizer == "gradient-descent":
        return gradient_descent(system, x, step=gd_step, gtol=gtol, max_steps=max_steps)
    raise ValueError(f"unknown minimizer {minimizer!r}; valid: {', '.join(MINIMIZERS)}")


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


# -- distinct minima (paper §7.5, SPEC §5) ---------------------------------------------------


def _cdist(a: torch.Tensor, b: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Distances (``p = 2`` Euclidean, ``p = 1`` sum of absolute differences) computed from
    differences, not from ``|a|² + |b|² - 2 a·b``: the matrix-product shortcut loses ~1e-7
    absolute accuracy on LJ-13 signatures (|a|² ~ 10³), which is the order of the spread between
    copies of one minimum."""
    return torch.cdist(a, b, p=p, compute_mode="donot_use_mm_for_euclid_dist")


def _sets_within(a: torch.Tensor, b: torch.Tensor, eps: float, chunk_size: int, p: float = 2.0) -> bool:
    """True when some row of ``a`` lies within ``eps`` of some row of ``b``."""
    for start in range(0, a.shape[0], chunk_size):
        if bool((_cdist(a[start:start + chunk_size], b, p) < eps).any()):
            return True
    return False


def _first_representative(sig: torch.Tensor, eps: float, p: float, chunk_size: int) -> torch.Tensor:
    """Labels of the greedy rule of the authors' code (en_flows ``count_states``): in sample
    order, each row joins the first (oldest) representative within ``eps``, else becomes a new
    representative. Labels are representatives in order of creation."""
    n_rows = sig.shape[0]
    labels = torch.empty(n_rows, dtype=torch.long)
    reps = sig.new_zeros(0, sig.shape[1])
    for start in range(0, n_rows, chunk_size):
        block = sig[start:start + chunk_size]
        assigned = torch.full((block.shape[0],), -1, dtype=torch.long)
        if reps.shape[0]:
            within = _cdist(block, reps, p) < eps
            hit = within.any(dim=1)
            assigned[hit] = within[hit].to(torch.uint8).argmax(dim=1)  # first True
        rest = (assigned < 0).nonzero().squeeze(-1)
        if rest.numel():
            # Rows of this block left over can only join representatives created within the block,
            # which are themselves rows of ``rest``: process them in order.
            d_rest = _cdist(block[rest], block[rest], p)
            new: list[int] = []  # positions in ``rest`` of the new representatives
            for j in range(rest.numel()):
                joined = next((k for k, r in enumerate(new) if bool(d_rest[j, r] < eps)), None)
                if joined is None:
                    assigned[rest[j]] = reps.shape[0] + len(new)
                    new.append(j)
                else:
                    assigned[rest[j]] = reps.shape[0] + joined
            reps = torch.cat([reps, block[rest[torch.tensor(new, dtype=torch.long)]]])
        labels[start:start + block.shape[0]] = assigned
    return labels


def distinct_minima(
    signatures: torch.Tensor,
    eps: float,
    *,
    norm: str = "l2",
    rule: str = "single-linkage",
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Cluster label ``[M]`` of each signature ``[M, F]``.

    ``norm`` (:data:`CLUSTER_NORMS`) measures two rows apart (Euclidean, or L1 as in the
    authors' code); ``rule`` (:data:`CLUSTER_RULES`) is either eqbench's ``"single-linkage"``,
    described below, or the authors' ``"first-representative"`` (each row, in sample order,
    joins the first representative within ``eps``, else becomes one; order-dependent, and a
    row within ``eps`` of two representatives joins the older one).

    Single linkage: connected components of the graph that joins two rows whose distance is
    below ``eps``.

    Labels run over ``0 .. K-1`` in order of each component's first row, so ``K = labels.max() + 1``
    distinct minima. Why single linkage: copies of one minimum differ only by minimiser noise,
    far below ``eps``, so they are always joined, and the count can only err towards fewer
    minima, never more: a lower bound, as in paper §7.5; a greedy "first representative within
    eps" rule would depend on the order of the samples and could split one minimum in two.

    Exact and fast for the usual case of many repeats of few minima: a leader pass assigns each
    row to an earlier leader within ``eps`` (or makes it a leader), then leaders are merged
    (union-find) when any of their members lie within ``eps`` of each other. Only leader pairs
    closer than ``3 eps`` can qualify (triangle inequality), so the member check runs rarely.
    """
    if signatures.ndim != 2:
        raise ValueError(f"distinct_minima expects signatures [M, F], got {list(signatures.shape)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if norm not in CLUSTER_NORMS:
        raise ValueError(f"unknown cluster norm {norm!r}; valid: {', '.join(CLUSTER_NORMS)}")
    if rule not in CLUSTER_RULES:
        raise ValueError(f"unknown cluster rule {rule!r}; valid: {', '.join(CLUSTER_RULES)}")
    p = _NORM_P[norm]
    sig = signatures.detach().to(device="cpu", dtype=torch.float64)
    n_rows = sig.shape[0]
    if n_rows == 0:
        return torch.zeros(0, dtype=torch.long)
    if not bool(torch.isfinite(sig).all()):
        raise ValueError("distinct_minima: non-finite signature")
    if rule == "first-representative":
        return _first_representative(sig, eps, p, chunk_size)

    leader_of = torch.empty(n_rows, dtype=torch.long)
    leader_rows: list[int] = []
    leader_sig = sig.new_zeros(0, sig.shape[1])
    for start in range(0, n_rows, chunk_size):
        block = sig[start:start + chunk_size]
        assigned = torch.full((block.shape[0],), -1, dtype=torch.long)
        if leader_rows:
            d_min, nearest = _cdist(block, leader_sig, p).min(dim=1)
            hit = d_min < eps
            assigned[hit] = nearest[hit]
        rest = (assigned < 0).nonzero().squeeze(-1)
        if rest.numel():
            d_rest = _cdist(block[rest], block[rest], p)
            free = torch.ones(rest.numel(), dtype=torch.bool)
            new: list[int] = []
            for j in range(rest.numel()):
                if not free[j]:
                    continue
                close = (d_rest[j] < eps) & free  # includes j itself
                assigned[rest[close]] = len(leader_rows) + len(new)
                free &= ~close
                new.append(j)
            new_rows = rest[torch.tensor(new, dtype=torch.long)]
            leader_rows.extend((start + new_rows).tolist())
            leader_sig = torch.cat([leader_sig, block[new_rows]])
        leader_of[start:start + block.shape[0]] = assigned

    n_leaders = len(leader_rows)
    parent = list(range(n_leaders))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for start in range(0, n_leaders, chunk_size):
        near = _cdist(leader_sig[start:start + chunk_size], leader_sig, p) < 3.0 * eps
        for a, b in near.nonzero().tolist():
            a += start
            if a >= b:
                continue
            root_a, root_b = find(a), find(b)
            if root_a == root_b:
                continue
            if _sets_within(sig[leader_of == a], sig[leader_of == b], eps, chunk_size, p):
                # The smaller leader index (the earlier first row) becomes the root, so that
                # labels below follow first appearance.
                parent[max(root_a, root_b)] = min(root_a, root_b)

    roots = torch.tensor([find(a) for a in range(n_leaders)], dtype=torch.long)
    _, labels = torch.unique(roots[leader_of], return_inverse=True)
    return labels


def sorted_signature_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖sorted d(a) - sorted d(b)‖`` (Euclidean) for configurations ``[..., N, D]``: the
    quantity :func:`distinct_minima` compares with ``eps``."""
    return (sorted_distance_signature(a) - sorted_distance_signature(b)).norm(dim=-1)


@dataclass(frozen=True)
class MinimaCensus:
    """The local minima reached from a set of configurations, clustered into distinct minima.

    ``x``, ``energy``, ``signature`` and ``labels`` describe the ``M`` kept minima (converged,
    positive definite on the complement of the zero modes); the counters say how many inputs
    were dropped and why (SPEC §5: unconverged minimisations and saddles are counted, not
    clustered). ``labels`` are :func:`distinct_minima` components at threshold ``eps``.
    """

    n_input: int  #: configurations given
    n_nonfinite: int  #: dropped before minimisation: non-finite coordinates or energy
    n_unconverged: int  #: dropped: gradient norm still above ``gtol`` after ``max_steps``
    n_saddles: int  #: dropped: converged to a stationary point that is not a minimum
    eps: float  #: clustering threshold on the sorted-distance signature
    x: torch.Tensor  #: kept minima ``[M, N, D]``, float64, CoM-free
    energy: torch.Tensor  #: ``[M]``
    signature: torch.Tensor  #: sorted pairwise distances ``[M, N(N-1)/2]``
    labels: torch.Tensor  #: component of each kept minimum ``[M]``, ``0 .. K-1``
    norm: str = "l2"  #: signature norm of the clustering (:data:`CLUSTER_NORMS`)
    rule: str = "single-linkage"  #: clustering rule (:data:`CLUSTER_RULES`)

    @property
    def n_minima(self) -> int:
        """Kept minima (with repeats): ``n_input`` minus the three dropped counts."""
        return int(self.energy.shape[0])

    @property
    def n_distinct(self) -> int:
        """Number of distinct minima ``K`` (a lower bound, see :func:`distinct_minima`)."""
        return int(self.labels.max()) + 1 if self.labels.numel() else 0

    def representatives(self) -> torch.Tensor:
        """Row index of the lowest-energy member of each distinct minimum ``[K]``, sorted by
        energy (lowest first). A component's energy is that of its representative."""
        k, m = self.n_distinct, self.n_minima
        if k == 0:
            return torch.zeros(0, dtype=torch.long)
        order = torch.argsort(self.energy, stable=True)
        first = torch.full((k,), m, dtype=torch.long)
        first.scatter_reduce_(0, self.labels[order], torch.arange(m), reduce="amin")
        reps = order[first]
        return reps[torch.argsort(self.energy[reps], stable=True)]

    def distinct_energies(self) -> torch.Tensor:
        """Energies of the distinct minima ``[K]``, ascending."""
        return self.energy[self.representatives()]

    def count_in(self, low: float, high: float) -> int:
        """Distinct minima with ``low <= u < high`` (by the representative's energy)."""
        e = self.distinct_energies()
        return int(((e >= low) & (e < high)).sum())

    def counts(self, bins: Sequence[tuple[float, float]]) -> list[int]:
        """:meth:`count_in` for each ``(low, high)`` bin."""
        return [self.count_in(low, high) for low, high in bins]

    def with_eps(self, eps: float) -> MinimaCensus:
        """The same minima clustered at another threshold (SPEC §5: counts at ε/2 and 2ε)."""
        return replace(self, eps=float(eps),
                       labels=distinct_minima(self.signature, eps, norm=self.norm, rule=self.rule))

    def closest_distinct_separation(self) -> float:
        """Smallest signature distance between the representatives of two distinct minima
        (``inf`` with fewer than two): how far this ``eps`` is from merging minima. Members of a
        component lie within minimiser noise of its representative, so this is the closest
        approach of two components up to that noise, at a cost of K² instead of M²."""
        if self.n_distinct < 2:
            return math.inf
        reps = self.signature[self.representatives()]
        d = _cdist(reps, reps, _NORM_P[self.norm])
        d.fill_diagonal_(math.inf)
        return float(d.min())


def novel_minima(census: MinimaCensus, reference: MinimaCensus) -> torch.Tensor:
    """Which distinct minima of ``census`` the ``reference`` set never reached: bool ``[K]``
    aligned with ``census.representatives()``.

    Both sets are clustered together at ``census.eps`` with ``census``'s norm and rule (for
    ``"first-representative"``, the census's rows first); a minimum is novel when its joint
    component holds no reference member. Paper §7.5 asks whether a generator discovers states
    "which have not been observed in the training data set"; this is that count.
    """
    reps = census.representatives()
    if reps.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    m = census.n_minima
    joint = distinct_minima(torch.cat([census.signature, reference.signature]), census.eps,
                            norm=census.norm, rule=census.rule)
    seen = torch.zeros(int(joint.max()) + 1, dtype=torch.bool)
    seen[joint[m:]] = True
    return ~seen[joint[:m][reps]]


def census_of_minima(
    system: ParticleSystem,
    x: torch.Tensor,
    *,
    eps: float,
    gtol: float = 1e-6,
    max_steps: int = 10_000,
    eigenvalue_tol: float = 1e-6,
    chunk_size: int = 5000,
    progress: bool = False,
    desc: str = "minimise",
    minimizer: str = "lbfgs",
    max_displacement: float = 0.3,
    gd_step: float = 1e-3,
    norm: str = "l2",
    rule: str = "single-linkage",
) -> MinimaCensus:
    """Minimise every configuration of ``x`` ``[B, N, D]`` and cluster the minima (paper §7.5).

    Steps (SPEC §5): rows with non-finite coordinates or energy are dropped and counted (a
    generator may emit them; the minimiser cannot start there); the rest are minimised in
    float64 with ``minimizer`` (:func:`minimize_with`: L-BFGS with step cap ``max_displacement``,
    or gradient descent with step ``gd_step``) in chunks of ``chunk_size`` (bounded memory for 10⁵ LJ-13
    samples); unconverged runs and converged saddles (:func:`is_minimum` with
    ``eigenvalue_tol``: a non-positive Hessian eigenvalue off the zero modes) are dropped and
    counted; the minima left are clustered with :func:`distinct_minima` at ``eps`` with ``norm``
    and ``rule``.
    """
    system.check_shape(x)
    if x.ndim != 3:
        raise ValueError(
            f"census_of_minima expects [B, {system.n_particles}, {system.n_dims}], got {list(x.shape)}"
        )
    x = x.detach().to(device="cpu", dtype=torch.float64)
    finite = torch.isfinite(x).all(dim=-1).all(dim=-1)
    if bool(finite.any()):
        with torch.no_grad():
            energy = system.energy(x[finite])
        finite[finite.clone()] = torch.isfinite(energy)
    starts = x[finite]
    kept_x, kept_e = [], []
    n_unconverged = n_saddles = 0
    chunks = range(0, starts.shape[0], chunk_size)
    for start in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        result = minimize_with(system, starts[start:start + chunk_size], minimizer=minimizer, gtol=gtol,
                               max_steps=max_steps, max_displacement=max_displacement, gd_step=gd_step)
        n_unconverged += result.n_unconverged
        xc, ec = result.x[result.converged], result.energy[result.converged]
        minimum = is_minimum(system, xc, tol=eigenvalue_tol) if xc.shape[0] else torch.zeros(0, dtype=torch.bool)
        n_saddles += int((~minimum).sum())
        kept_x.append(xc[minimum])
        kept_e.append(ec[minimum])
    kept = torch.cat(kept_x) if kept_x else x.new_zeros(0, *system.event_shape)
    energy = torch.cat(kept_e) if kept_e else x.new_zeros(0)
    signature = sorted_distance_signature(kept)
    return MinimaCensus(
        n_input=int(x.shape[0]),
        n_nonfinite=int((~finite).sum()),
        n_unconverged=n_unconverged,
        n_saddles=n_saddles,
        eps=float(eps),
        x=kept,
        energy=energy,
        signature=signature,
        labels=distinct_minima(signature, eps, norm=norm, rule=rule),
        norm=norm,
        rule=rule,
    )
