"""G-residual flow: an E(n)- and permutation-equivariant invertible residual network for particles.

References: Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen, "Invertible residual networks"
(ICML 2019); Chen, Behrmann, Duvenaud, Jacobsen, "Residual flows for invertible generative
modeling" (NeurIPS 2019); Bose, Brubaker, Kobyzev, "Equivariant finite normalizing flows"
(G-residual flows; seed 002); Köhler, Klein, Noé, "Equivariant flows" (ICML 2020) for the pair
field ``Σ_j φ(d_ij) r_ij`` the kernel flow integrates.

**The map.** The flow is a stack of ``L`` blocks ``F(y) = y + g(y)`` from data to latent,
``z = F_L ∘ … ∘ F_1(x)``, each with the pair field

    g(x)_i = Σ_{j≠i} h(x_i - x_j),    h(r) = ρ(|r|) r / |r|,    ρ(d) = s · (f(d) - f(-d)) / 2,

where ``f: R → R`` is an MLP on the scaled distance ``d / ℓ`` (``ℓ`` = ``distance_scale``) with
LipSwish activations (Chen et al. 2019: ``x·sigmoid(x)/1.1``, smooth, ``|σ'| ≤ 1``), weights
spectrally normalised to ``W̃ = W / max(1, ‖W‖₂)`` (the exact largest singular value, so the
bound below is a proof, not a power-iteration estimate) and no bias on the scalar output layer
(it would cancel in ``f(d) - f(-d)``). The first layer's biases start at ``-w_k μ_k / ℓ`` with
the ``μ_k`` spread over the system's ``pair_distance_range``: the hidden units are soft ramps
placed over the typical pair distances, a smooth distance embedding whose Lipschitz constant is
exactly ``1/ℓ``.

*Symmetry.* ``g`` depends on relative vectors only (translation invariant), ``h`` commutes with
every orthogonal ``Q`` (``h(Qr) = Q h(r)``: rotations and reflections) and the sum runs over all
other particles (permutation equivariant). ``ρ`` is odd, so ``h(-r) = -h(r)`` and
``Σ_i g_i = 0``: the centre of mass is preserved and U, the CoM-free subspace, is invariant.
So every block, its inverse and the flow are G-equivariant for G = S_N × E(n), and with the
isotropic CoM-free prior the density is G-invariant (Köhler et al. §5).
Smoothness: ``ρ`` is odd and smooth, so ``ρ(d)/d`` is an even smooth function of ``d``, hence a
smooth function of ``|r|²``, and ``h`` is smooth at ``r = 0`` too: the log-determinant and its
gradients are well defined everywhere. (Numerically, ``f(d) - f(-d)`` cancels for tiny ``d``:
the field stays accurate to rounding, its Jacobian to ``eps/d`` — ~1e-10 at ``d = 1e-6`` in
float64, far below any physical pair distance; an exact coincidence ``d = 0`` gives ``h = 0``.)

**Lipschitz bound (derivation).** Let ``Δ: R^{N×D} → R^{P×D}`` take ``x`` to its pair
differences ``(x_i - x_j)_{i<j}``. Because ``h`` is odd, ``g = Δᵀ H(Δ x)`` with ``H`` applying ``h``
to every pair. Hence ``Lip(g) ≤ ‖Δ‖² Lip(h)``, and ``ΔᵀΔ = (N I - 1 1ᵀ) ⊗ I_D`` is the Laplacian
of the complete graph, whose eigenvalues are ``N`` on U and ``0`` on the CoM: ``‖Δ‖² = N``. (The
factor is not the naive ``2(N-1)`` of summing ``N-1`` neighbours twice, and it is attained: a
constant ``φ = ρ(d)/d = φ₀`` gives ``g = N φ₀ x`` on U.) The Jacobian of ``h`` is symmetric,

    ∂h/∂r = (ρ(d)/d) (I - r̂ r̂ᵀ) + ρ'(d) r̂ r̂ᵀ,

with eigenvalues ``ρ'(d)`` (radial) and ``ρ(d)/d`` (tangential); ``ρ(0) = 0`` and the mean value
theorem give ``|ρ(d)/d| ≤ Lip(ρ)``, so ``Lip(h) ≤ Lip(ρ)``. For ``ρ``:
``Lip(f) ≤ (1/ℓ) Π_l ‖W̃_l‖₂`` (1-Lipschitz activations) and ``Lip(ρ) ≤ s Lip(f)`` (the odd part
``(f(d) - f(-d))/2`` is no steeper than ``f``). With
``s = c ℓ / N`` (``c`` = ``lipschitz_coefficient``):

    Lip(g) ≤ N · (c ℓ / N) · (1/ℓ) · Π_l ‖W̃_l‖₂ = c · Π_l min(1, ‖W_l‖₂) ≤ c < 1,

in the Euclidean norm on U (the CoM direction is in the kernel of ``∂g``). This is the
sufficient condition of Behrmann et al. for ``F = id + g`` to be invertible, with ``F⁻¹`` the
limit of the Banach fixed-point iteration, and ``I + ∂g`` is symmetric with eigenvalues in
``[1 - c, 1 + c]``: positive definite, so ``log|det|`` is a Cholesky log-determinant.
(``g = ∇Φ`` with ``Φ = Σ_{i<j} R(d_ij)``, ``R' = ρ``: each block is a gradient map, like a
discretised step of the Köhler et al. gradient flows.) :meth:`PairResidualBlock.lipschitz_bound`
returns the bound per block; the tests measure the largest singular value of ``∂g`` on U at
random, clustered and spread-out configurations and check it lies below.

**Directions.** Data → latent (:meth:`GResidualFlow.inverse`, used by ``log_prob`` and maximum
likelihood training) is explicit: density estimation, the paper's main task, then needs one pass
and ordinary backpropagation, and the exact log-determinant is evaluated at the data. Latent →
data (:meth:`GResidualFlow.forward`, used by ``sample``) inverts each block by the fixed-point
iteration ``x_{k+1} = z - g(x_k)`` from ``x_0 = z``, stopped when the a-posteriori Banach bound
``L/(1-L) · |x_{k+1} - x_k| ≤ inverse_tol`` (``L`` the block's Lipschitz bound, Euclidean norm
per configuration) guarantees ``|x_{k+1} - x*| ≤ inverse_tol``; default 1e-10 in float64, 1e-4
in float32 (rounding floor), chosen from the dtype at call time. A block that does not reach it
within ``max_iterations`` (default 1000; ``log(1e-11)/log(0.9) ≈ 240`` suffice for the
worst-case contraction 0.9) raises :class:`FixedPointError`. Measured iterations per block
(:attr:`GResidualFlow.fixed_point_iterations`, sampling 64): 2-3 at initialisation; after 150
DW-4 training iterations 6-13 (float32, 1e-4) and 12-26 (float64, 1e-10); after 60 LJ-13
iterations 4-6 and 9-13. Gradients through the inverse
(reverse-KL training) use implicit differentiation (as in deep equilibrium models): the output
is ``z - g(x*)`` and its gradient hook solves the adjoint ``w = v - ∂gᵀ w`` by the same
contraction, so ``∂L/∂z = (I + ∂g)⁻ᵀ v`` exactly (first order only).

**Log-determinants.** ``log|det(I + ∂g)|`` on U is computed exactly in closed form: with
``C = E · Hel`` (``E`` the pair incidence matrix, ``Hel`` the Helmert basis of
:func:`eqbench.geometry.com_free_basis`), ``∂g`` restricted to U is
``Σ_p (c_p c_pᵀ) ⊗ [φ_p I + (ρ'_p - φ_p) r̂_p r̂_pᵀ]`` — a ``(N-1)D × (N-1)D`` matrix (6 for DW-4,
36 for LJ-13) assembled from ``ρ`` and ``ρ'`` (forward-mode through the scalar MLP) without any
autograd Jacobian, then Cholesky. The tests check it against the brute-force autograd Jacobian
restricted with ``com_free_basis``. ``log_prob`` and ``sample`` are always exact.

**Power-series estimator** (``log_prob(x, logdet="power-series")``; Chen et al. 2019):
``log det(I + J) = Σ_{k≥1} (-1)^{k+1} tr(J^k)/k``, truncated at ``n = n_exact + N`` terms with
``N ~ Geometric(p)`` on {1, 2, …} (``power_series_terms`` = n_exact = 2, ``power_series_p`` = 0.5
as in the authors' code), term ``k > n_exact`` reweighted by ``1/P(N ≥ k - n_exact) =
(1-p)^{-(k - n_exact - 1)}`` (Russian roulette, unbiased), each trace by one Rademacher probe
``v`` on all N·D coordinates (``E[vᵀ J^k v] = tr J^k``, and since ``J`` maps into U and kills the
CoM direction, the full-space trace is the trace on U). Its variance is finite only when the
spectral radius ``λ`` of ``J`` obeys ``λ² < 1 - p`` (term ``k`` has second moment
``∝ (λ²/(1-p))^k``), i.e. ``λ < 0.71`` for p = 0.5: a reason to keep it out of scoring.

**Training choice** (``train_logdet``, default ``"exact"``). Measured on one thread (float32,
batch 64, default 8 blocks / hidden [32, 32]; best of 3 runs of 8 iterations of
:func:`eqbench.train.fit`), a maximum-likelihood iteration with the exact closed-form
log-determinant took 0.45x (DW-4) / 0.32x (LJ-13) the time of one with the power series (its
``n_exact + N`` vector-Jacobian products with ``create_graph``, then their backward), and that
was before the log-determinant moved to the full ``N·D`` Jacobian scattered from the pair blocks
(:meth:`PairResidualBlock.field_and_full_jacobian`), which made LJ-55 scoring 2x faster again. On
LJ-55 the power series was 2.3x slower per iteration (float64, before that move). The closed
form is cheaper *and* exact, so it is the default; ``"power-series"`` is there for systems so
large that the ``N·D``-sized Cholesky dominates, and records name it through
:attr:`GResidualFlow.training_estimator`.

**What the bound costs.** The bound must hold for the collective mode (uniform scaling, where
all ``N`` pair terms add up), so each pair term gets only ``c/N``: the term through which one
pair distance ``d_ij`` acts on its own relative coordinate contributes at most ``2ρ'(d_ij) ≤
2c/N`` to the Jacobian (0.45 on DW-4, 0.14 on LJ-13 at c = 0.9), however the other pairs are
arranged. Reshaping the pair-distance distribution (DW-4's two wells) therefore takes many
blocks. Measured on DW-4 (1,000 training samples, the paper's AdamW lr 5e-3, batch 64): test NLL
12.0 after 150 iterations (11.7 after 500, and with 16 blocks after 300), where the kernel flow
reaches 8.7 after 150. Our reading: residual flows of particle systems need depth growing with
N; that, not the cost of an iteration, is their price here.

**Relation to G-coupling flows.** Bose et al. build G-equivariant finite flows three ways:
G-residual flows (this file: an equivariant ``g`` with ``Lip(g) < 1``; universal for
G-equivariant diffeomorphisms in their sense, with a closed-form forward, an iterative inverse
and a log-determinant that needs either a Jacobian or a stochastic series), G-coupling flows and
G-inverse-autoregressive flows, which split the variables into two parts and transform one with
a G-equivariant conditioner of the other, so that both directions and the triangular
log-determinant are closed-form. For particle coordinates no split is compatible with both
symmetries (splitting the particles breaks permutations, splitting the Cartesian components
breaks rotations); the SE(3)-equivariant augmented
coupling flow of Midgley et al. (2023) is a G-coupling flow on an *augmented* space (the
coupling alternates between the particles and auxiliary Gaussian particles of the same shape),
which makes the model's density on the data an importance-weighted marginal. The G-residual flow needs
no augmentation: its density on U is exact, at the price of a fixed-point inverse.

Default architecture: 8 blocks, pair MLP hidden [32, 32] (``1 → 32 → 32 → 1``), the same on every
system because the network maps one distance to one number (the N·D-based widths of
:mod:`eqbench.flows.defaults` size networks on flat coordinates, which this one never sees):
``8 · (32 + 32 + 32·32 + 32 + 32) = 9,216`` parameters on DW-4, LJ-13 and any other system.
Hidden [64, 64] (34,816 parameters) reached the same DW-4 test NLL after 150 iterations (12.05
vs 11.95) at 1.7x the training time, so the cheaper one is the default.
``distance_scale`` defaults to ``(hi - lo)/8`` of ``pair_distance_range`` (1.0 on DW-4, 0.214
on LJ-13), the resolution of the embedding; the Lipschitz bound does not depend on it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from eqbench.capabilities import model_builder
from eqbench.errors import ConfigError
from eqbench.flows.base import Flow
from eqbench.flows.cnf import parse_dtype
from eqbench.flows.settings import Setting, check_settings, choice, dtype_setting, integer, number, widths
from eqbench.geometry import com_free_basis, pair_indices, remove_com
from eqbench.systems.base import SYMMETRIES, ParticleSystem

__all__ = ["LOGDET_ESTIMATORS", "SETTINGS", "FixedPointError", "GResidualFlow", "PairResidualBlock", "build",
           "default_distance_scale", "validate"]

#: Values of ``train_logdet`` and of ``log_prob(..., logdet=...)``.
LOGDET_ESTIMATORS = ("exact", "power-series")
#: Default fixed-point tolerance by dtype (module docstring; float32 stops at its rounding floor).
DEFAULT_INVERSE_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
#: Relative tolerance of the adjoint solve in the implicit gradient, by dtype.
_ADJOINT_RTOL = {torch.float64: 1e-11, torch.float32: 1e-5}
#: LipSwish normaliser (Chen et al. 2019): max of d/dx[x sigmoid(x)] is 1.0998.
_LIPSWISH_DIV = 1.1


class FixedPointError(RuntimeError):
    """The fixed-point inverse of a block did not reach its tolerance within ``max_iterations``."""


def _lipswish(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LipSwish ``a·sigmoid(a)/1.1`` and its derivative (both needed for the exact Jacobian)."""
    sig = torch.sigmoid(a)
    return a * sig / _LIPSWISH_DIV, (sig + a * sig * (1.0 - sig)) / _LIPSWISH_DIV


def _spectral_norm(weight: torch.Tensor) -> torch.Tensor:
    """Exact largest singular value (a vector norm for a single row or column)."""
    if 1 in weight.shape:
        return torch.linalg.vector_norm(weight)
    return torch.linalg.matrix_norm(weight, ord=2)


class _Params:
    """Normalised weights of one block for one flow call (computed once, used by every iteration)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], bound: torch.Tensor):
        self.weights, self.biases, self.bound = weights, biases, bound

    def detached(self) -> _Params:
        return _Params([w.detach() for w in self.weights],
                       [None if b is None else b.detach() for b in self.biases], self.bound.detach())


class PairResidualBlock(nn.Module):
    """One block ``y ↦ y + g(y)`` with ``g_i = Σ_j ρ(d_ij) r̂_ij`` and ``Lip(g) ≤ c`` (module docstring)."""

    def __init__(self, n_particles: int, n_dims: int, hidden: Sequence[int], *, coefficient: float,
                 distance_scale: float, distance_range: tuple[float, float], dtype: torch.dtype):
        super().__init__()
        if not 0.0 < coefficient < 1.0:
            raise ConfigError(f"g-resflow lipschitz_coefficient must lie in (0, 1); got {coefficient!r}")
        self.n_particles, self.n_dims = n_particles, n_dims
        self.coefficient = float(coefficient)
        self.distance_scale = float(distance_scale)
        #: ``s = c ℓ / N``: makes ``Lip(g) ≤ c Π min(1, ‖W_l‖)``.
        self.scale = self.coefficient * self.distance_scale / n_particles
        sizes = (1, *hidden, 1)
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out, bias=k < len(sizes) - 2, dtype=dtype)
            for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)))
        first = self.layers[0]
        with torch.no_grad():  # ramps placed over the typical pair distances (smooth embedding)
            width = first.out_features
            first.weight.copy_(torch.randn(width, 1, dtype=dtype) / math.sqrt(width))
            lo, hi = distance_range
            centres = lo + (hi - lo) * torch.rand(width, dtype=dtype)
            first.bias.copy_(-first.weight[:, 0] * centres / self.distance_scale)
        i, j = pair_indices(n_particles)
        incidence = torch.zeros(i.numel(), n_particles, dtype=torch.float64)
        incidence[torch.arange(i.numel()), i] = 1.0
        incidence[torch.arange(i.numel()), j] = -1.0
        helmert = com_free_basis(n_particles, 1)  # [N, N-1]
        self.register_buffer("incidence", incidence.to(dtype), persistent=False)  # E, [P, N]
        self.register_buffer("pair_basis", (incidence @ helmert).to(dtype), persistent=False)  # C, [P, N-1]

    # ------------------------------------------------------------------ parameters
    def normalised(self) -> _Params:
        """Spectrally normalised weights ``W / max(1, ‖W‖₂)`` and the block's Lipschitz bound."""
        weights, biases = [], []
        bound = torch.ones((), dtype=self.layers[0].weight.dtype, device=self.layers[0].weight.device)
        for layer in self.layers:
            sigma = _spectral_norm(layer.weight)
            weights.append(layer.weight / sigma.clamp_min(1.0))
            biases.append(layer.bias)
            bound = bound * sigma.clamp_max(1.0)
        return _Params(weights, biases, self.coefficient * bound)

    def lipschitz_bound(self) -> float:
        """The proven bound ``c Π_l min(1, ‖W_l‖₂)`` on ``Lip(g)`` (Euclidean norm on U)."""
        with torch.no_grad():
            return float(self.normalised().bound)

    # ------------------------------------------------------------------ the field
    def radial(self, d: torch.Tensor, params: _Params, derivative: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ρ(d) = s (f(d) - f(-d))/2`` and, if asked, ``ρ'(d)`` by forward mode through the MLP."""
        inv = 1.0 / self.distance_scale
        u = torch.stack((d, -d)).unsqueeze(-1) * inv  # [2, ..., 1]
        du = None
        if derivative:  # d u / d d: +1/ℓ for f(d), -1/ℓ for f(-d)
            du = torch.tensor([inv, -inv], dtype=d.dtype, device=d.device).view(2, *([1] * d.ndim), 1)
        h, dh = u, du
        last = len(self.layers) - 1
        for k, (w, b) in enumerate(zip(params.weights, params.biases, strict=True)):
            if k == 0:  # one input: a broadcast product, not a K = 1 matrix product (slow on CPU)
                a, da = torch.addcmul(b, h, w[:, 0]), None if dh is None else dh * w[:, 0]
            else:
                a = h @ w.T if b is None else torch.addmm(b, h.reshape(-1, h.shape[-1]), w.T).view(*h.shape[:-1], -1)
                da = None if dh is None else dh @ w.T
            if k == last:
                h, dh = a, da
                break
            h, slope = _lipswish(a)
            dh = None if da is None else da * slope
        rho = 0.5 * self.scale * (h[0, ..., 0] - h[1, ..., 0])
        drho = None if dh is None else 0.5 * self.scale * (dh[0, ..., 0] - dh[1, ..., 0])
        return rho, drho

    def _pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.einsum("pn,bnd->bpd", self.incidence, x)  # r_p = x_i - x_j, [B, P, D]
        return r, torch.linalg.vector_norm(r, dim=-1)

    def _scatter(self, f: torch.Tensor) -> torch.Tensor:
        return torch.einsum("pn,bpd->bnd", self.incidence, f)  # g_i = Σ_j f_ij (f odd)

    def field(self, x: torch.Tensor, params: _Params) -> torch.Tensor:
        """``g(x)``, shape ``[B, N, D]``; CoM-free by construction."""
        r, d = self._pairs(x)
        rho, _ = self.radial(d, params)
        # ρ(0) = 0 exactly, so a coincident pair (probability zero) contributes 0, its true value.
        phi = rho / d.clamp_min(torch.finfo(d.dtype).tiny)
        return self._scatter(phi.unsqueeze(-1) * r)

    def _field_and_pair_terms(self, x: torch.Tensor, params: _Params
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``g(x)`` and, per pair, ``φ = ρ/d``, ``ρ'`` and ``r̂``: what both Jacobian forms assemble."""
        r, d = self._pairs(x)
        rho, drho = self.radial(d, params, derivative=True)
        d_safe = d.clamp_min(torch.finfo(d.dtype).tiny)
        phi = rho / d_safe
        return self._scatter(phi.unsqueeze(-1) * r), phi, drho, r / d_safe.unsqueeze(-1)

    def field_and_jacobian(self, x: torch.Tensor, params: _Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(x)`` and ``∂g`` restricted to U in the :func:`com_free_basis` coordinates,
        ``[B, (N-1)D, (N-1)D]``: ``Σ_p (c_p c_pᵀ) ⊗ [φ_p I + (ρ'_p - φ_p) r̂_p r̂_pᵀ]``."""
        g, phi, drho, rhat = self._field_and_pair_terms(x, params)
        batch, n_dims, m = x.shape[0], self.n_dims, self.n_particles - 1
        c = self.pair_basis
        particle = torch.einsum("pa,bp,pc->bac", c, phi, c)  # [B, N-1, N-1]
        eye = torch.eye(n_dims, dtype=x.dtype, device=x.device)
        jac = (particle[:, :, None, :, None] * eye[None, None, :, None, :]).reshape(batch, m * n_dims, m * n_dims)
        v = (c[None, :, :, None] * rhat[:, :, None, :]).reshape(batch, -1, m * n_dims)  # c_p ⊗ r̂_p
        jac = jac + torch.einsum("bpm,bp,bpn->bmn", v, drho - phi, v)
        return g, jac

    def field_and_full_jacobian(self, x: torch.Tensor, params: _Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(x)`` and ``∂g`` in all ``N·D`` coordinates, ``[B, N·D, N·D]`` (particle-major).

        Pair ``p = (i, j)`` adds its ``D × D`` block ``M_p = φ_p I + (ρ'_p - φ_p) r̂_p r̂_pᵀ`` at
        ``(i, i)`` and ``(j, j)`` and ``-M_p`` at ``(i, j)`` and ``(j, i)``: an ``O(P D²)``
        scatter, where the ``U``-coordinate form of :meth:`field_and_jacobian` costs
        ``O(P (N D)²)`` (its pair sum over outer products of ``c_p ⊗ r̂_p``; 4x slower on LJ-55).
        """
        g, phi, drho, rhat = self._field_and_pair_terms(x, params)
        n, n_dims = self.n_particles, self.n_dims
        eye = torch.eye(n_dims, dtype=x.dtype, device=x.device)
        blocks = (phi[..., None, None] * eye + (drho - phi)[..., None, None] * rhat[..., :, None] * rhat[..., None, :])
        i, j = pair_indices(n, x.device)
        target = torch.cat((i * n + i, j * n + j, i * n + j, j * n + i))
        jac = x.new_zeros(x.shape[0], n * n, n_dims, n_dims).index_add(
            1, target, torch.cat((blocks, blocks, -blocks, -blocks), dim=1))
        jac = jac.view(-1, n, n, n_dims, n_dims).transpose(2, 3).reshape(-1, n * n_dims, n * n_dims)
        return g, jac

    def field_and_logdet(self, x: torch.Tensor, params: _Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(x)`` and the exact ``log det(I + ∂g)`` on U (Cholesky: ``I + ∂g`` is SPD).

        Computed in all ``N·D`` coordinates (:meth:`field_and_full_jacobian`): ``∂g`` is symmetric
        and kills the CoM directions, so U is invariant and ``I + ∂g`` is the identity on its
        complement: ``det(I + ∂g)`` over ``R^{N·D}`` equals the determinant on U.
        """
        g, jac = self.field_and_full_jacobian(x, params)
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        chol, info = torch.linalg.cholesky_ex(eye + jac)
        if bool((info > 0).any()) and bool(torch.isfinite(jac).all()):
            raise RuntimeError("g-resflow: I + ∂g is not positive definite, so the Lipschitz bound was violated")
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return g, logdet

    def power_series_logdet(self, x: torch.Tensor, params: _Params, *, n_exact: int, p: float,
                            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(x)`` and the unbiased Russian-roulette estimate of ``log det(I + ∂g)`` (module docstring)."""
        create_graph = torch.is_grad_enabled()
        source = generator.device if generator is not None else x.device
        uniform = float(torch.rand((), generator=generator, device=source, dtype=torch.float64))
        extra = 1 + int(math.floor(math.log(max(uniform, 1e-300)) / math.log1p(-p)))  # Geometric(p) ≥ 1
        probe = (torch.randint(0, 2, x.shape, generator=generator, device=source) * 2 - 1).to(x)
        with torch.enable_grad():
            y = x if x.requires_grad else x.detach().requires_grad_(True)
            gy = self.field(y, params)
            w, estimate = probe, x.new_zeros(x.shape[0])
            for k in range(1, n_exact + extra + 1):
                (w,) = torch.autograd.grad(gy, y, w, create_graph=create_graph, retain_graph=True)
                survival = 1.0 if k <= n_exact else (1.0 - p) ** (k - n_exact - 1)  # P(N ≥ k - n_exact)
                estimate = estimate + ((-1) ** (k + 1) / (k * survival)) * (w * probe).sum(dim=(-2, -1))
        if not create_graph:
            return gy.detach(), estimate.detach()
        return gy, estimate

    def invert(self, z: torch.Tensor, params: _Params, *, tol: float, max_iterations: int
               ) -> tuple[torch.Tensor, int]:
        """``x`` with ``x + g(x) = z`` (to ``tol``), and the number of iterations used.

        With gradients enabled the result is differentiable in ``z`` and the parameters by implicit
        differentiation (module docstring)."""
        lip = float(params.bound.detach())
        factor = lip / (1.0 - lip)
        frozen = params.detached()
        with torch.no_grad():
            target = z.detach()
            x = target
            for iteration in range(1, max_iterations + 1):
                x_new = target - self.field(x, frozen)
                step = float(torch.linalg.vector_norm((x_new - x).flatten(1), dim=1).max())
                x = x_new
                if factor * step <= tol:
                    break
            else:
                raise FixedPointError(f"g-resflow: fixed-point inverse did not reach {tol:g} in {max_iterations} "
                                      f"iterations (last error bound {factor * step:.3g}); raise max_iterations "
                                      "or inverse_tol")
        if not torch.is_grad_enabled():
            return x, iteration
        out = z - self.field(x, params)  # = x to tol; carries ∂/∂z = I and ∂/∂θ = -∂g/∂θ at x*
        if not out.requires_grad:
            return out.detach(), iteration
        anchor = x.detach().requires_grad_(True)
        with torch.enable_grad():
            g_anchor = self.field(anchor, frozen)
        rtol = _ADJOINT_RTOL.get(x.dtype, 1e-5)

        def adjoint(v: torch.Tensor) -> torch.Tensor:
            """``w = (I + ∂g)⁻ᵀ v`` by the contraction ``w ← v - ∂gᵀ w``."""
            w = v
            scale = float(torch.linalg.vector_norm(v.flatten(1), dim=1).max())
            for _ in range(max_iterations):
                (jw,) = torch.autograd.grad(g_anchor, anchor, w, retain_graph=True)
                w_new = v - jw
                step = float(torch.linalg.vector_norm((w_new - w).flatten(1), dim=1).max())
                w = w_new
                if factor * step <= rtol * scale:
                    return w
            raise FixedPointError(f"g-resflow: adjoint of the fixed-point inverse did not converge in "
                                  f"{max_iterations} iterations")

        out.register_hook(adjoint)
        return out, iteration


class GResidualFlow(Flow):
    """G-residual flow on the CoM-free subspace: see the module docstring."""

    symmetries = SYMMETRIES

    def __init__(self, system: ParticleSystem, blocks: int = 8, hidden: Sequence[int] = (32, 32), *,
                 lipschitz_coefficient: float = 0.9, distance_scale: float | None = None,
                 train_logdet: str = "exact", power_series_terms: int = 2, power_series_p: float = 0.5,
                 inverse_tol: float | None = None, max_iterations: int = 1000, dtype: torch.dtype = torch.float32):
        super().__init__(system)
        if train_logdet not in LOGDET_ESTIMATORS:
            raise ConfigError(f"g-resflow train_logdet must be one of {', '.join(LOGDET_ESTIMATORS)}; "
                              f"got {train_logdet!r}")
        self.hidden = tuple(int(h) for h in hidden)
        self.lipschitz_coefficient = float(lipschitz_coefficient)
        self.distance_scale = float(distance_scale if distance_scale is not None else default_distance_scale(system))
        self.train_logdet = train_logdet
        self.power_series_terms = int(power_series_terms)
        self.power_series_p = float(power_series_p)
        self.inverse_tol = inverse_tol
        self.max_iterations = int(max_iterations)
        lo, hi = (float(v) for v in system.pair_distance_range)
        self.blocks = nn.ModuleList(
            PairResidualBlock(system.n_particles, system.n_dims, self.hidden, coefficient=self.lipschitz_coefficient,
                              distance_scale=self.distance_scale, distance_range=(lo, hi), dtype=dtype)
            for _ in range(blocks))
        #: Fixed-point iterations each block needed in the last :meth:`forward` (latent → data order).
        self.fixed_point_iterations: list[int] = []

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[-2:] != (self.n_particles, self.n_dims):
            raise ValueError(f"g-resflow expects configurations [batch, {self.n_particles}, {self.n_dims}], "
                             f"got {list(x.shape)}")

    def tolerance(self, dtype: torch.dtype) -> float:
        """The fixed-point tolerance used for ``dtype`` (``inverse_tol`` or the dtype's default)."""
        return float(self.inverse_tol) if self.inverse_tol is not None else DEFAULT_INVERSE_TOL.get(dtype, 1e-4)

    def lipschitz_bounds(self) -> list[float]:
        """The proven bound on ``Lip(g)`` of each block (each ``≤ lipschitz_coefficient``)."""
        return [block.lipschitz_bound() for block in self.blocks]

    def inverse(self, x: torch.Tensor, *, logdet: str = "exact", generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data → latent, explicit: ``(z, log|det ∂z/∂x|)`` on U; ``logdet="power-series"`` gives the
        unbiased stochastic estimate instead of the exact value (module docstring)."""
        self._check(x)
        if logdet not in LOGDET_ESTIMATORS:
            raise ConfigError(f"g-resflow logdet must be one of {', '.join(LOGDET_ESTIMATORS)}; got {logdet!r}")
        y = remove_com(x)
        total = y.new_zeros(y.shape[0])
        for block in self.blocks:
            params = block.normalised()
            if logdet == "exact":
                g, ld = block.field_and_logdet(y, params)
            else:
                g, ld = block.power_series_logdet(y, params, n_exact=self.power_series_terms,
                                                  p=self.power_series_p, generator=generator)
            y = y + g
            total = total + ld
        return y, total

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent → data by fixed-point inversion of each block: ``(x, log|det ∂x/∂z|)`` on U, exact."""
        self._check(z)
        y = remove_com(z)
        total = y.new_zeros(y.shape[0])
        tol = self.tolerance(y.dtype)
        iterations = []
        for block in reversed(self.blocks):
            params = block.normalised()
            y, n_iter = block.invert(y, params, tol=tol, max_iterations=self.max_iterations)
            iterations.append(n_iter)
            _, ld = block.field_and_logdet(y, params)
            total = total - ld
        self.fixed_point_iterations = iterations
        return y, total

    def log_prob(self, x: torch.Tensor, *, logdet: str = "exact", generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """``log q(x)``: exact unless ``logdet="power-series"`` is named (then an unbiased estimate)."""
        z, ld = self.inverse(x, logdet=logdet, generator=generator)
        return self.prior.log_prob(z) + ld

    @property
    def training_estimator(self) -> dict[str, Any]:
        """``{}`` (exact, the default) or ``{"logdet": "power-series"}``."""
        return {} if self.train_logdet == "exact" else {"logdet": self.train_logdet}

    def extra_repr(self) -> str:
        return (f"system={self.system_name}, blocks={len(self.blocks)}, hidden={list(self.hidden)}, "
                f"lipschitz_coefficient={self.lipschitz_coefficient}, distance_scale={self.distance_scale:.4g}, "
                f"train_logdet={self.train_logdet}")


def default_distance_scale(system: ParticleSystem) -> float:
    """``(hi - lo)/8`` of the system's ``pair_distance_range``: the embedding's resolution
    (1.0 on DW-4, 0.214 on LJ-13; module docstring)."""
    lo, hi = (float(v) for v in system.pair_distance_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ConfigError(f"system {system.name}: pair_distance_range must be finite with 0 <= lo < hi, "
                          f"got ({lo}, {hi})")
    return (hi - lo) / 8.0


def _open_unit(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and 0.0 < value < 1.0)


#: The settings of ``g-resflow`` (:mod:`eqbench.flows.settings`).
SETTINGS = {
    "blocks": integer(1),
    "hidden": widths(),
    "lipschitz_coefficient": Setting(_open_unit, "a number in the open interval (0, 1), e.g. 0.9"),
    "distance_scale": number(above=0.0),
    "train_logdet": choice(*LOGDET_ESTIMATORS),
    "power_series_terms": integer(0),
    "power_series_p": Setting(_open_unit, "a number in the open interval (0, 1), e.g. 0.5"),
    "inverse_tol": number(above=0.0),
    "max_iterations": integer(1),
    "dtype": dtype_setting(),
}

_DEFAULTS: dict[str, Any] = {"blocks": 8, "hidden": [32, 32], "lipschitz_coefficient": 0.9, "train_logdet": "exact",
                             "power_series_terms": 2, "power_series_p": 0.5, "max_iterations": 1000,
                             "dtype": "float32"}


def validate(system: ParticleSystem, config: Mapping[str, Any]) -> None:
    """Check ``g-resflow`` settings without building anything (planning calls this)."""
    check_settings(config, "g-resflow", SETTINGS)


@model_builder(capabilities=["trainable", "exact-density", "equivariant"], validate=validate,
               description="G-residual flow: equivariant invertible residual blocks with a proven "
                           "Lipschitz bound, exact log-density")
def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> GResidualFlow:
    """Registry builder for ``g-resflow`` (Bose et al.; Behrmann et al. 2019; Chen et al. 2019).

    Settings (defaults): ``blocks`` (8), ``hidden`` ([32, 32], the pair MLP 1 → … → 1),
    ``lipschitz_coefficient`` (0.9, in (0, 1)), ``distance_scale`` (``(hi - lo)/8`` of
    ``pair_distance_range``), ``train_logdet`` (``"exact"`` | ``"power-series"``),
    ``power_series_terms`` (2, terms always computed), ``power_series_p`` (0.5, geometric
    roulette), ``inverse_tol`` (1e-10 in float64, 1e-4 in float32), ``max_iterations`` (1000),
    ``dtype`` (``"float32"`` | ``"float64"``).

    Example:
        >>> import eqbench, torch
        >>> flow = build(eqbench.get_system("dw4"), {"dtype": "float64"})
        >>> flow.n_parameters, max(flow.lipschitz_bounds()) <= 0.9
        (9216, True)
        >>> x, log_q = flow.sample(3, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.allclose(flow.log_prob(x), log_q, atol=1e-8))
        True
    """
    validate(system, config or {})
    settings = {**_DEFAULTS, **dict(config or {})}
    dtype = parse_dtype(settings["dtype"], "g-resflow")
    return GResidualFlow(system, settings["blocks"], settings["hidden"],
                         lipschitz_coefficient=float(settings["lipschitz_coefficient"]),
                         distance_scale=settings.get("distance_scale"), train_logdet=settings["train_logdet"],
                         power_series_terms=settings["power_series_terms"],
                         power_series_p=float(settings["power_series_p"]), inverse_tol=settings.get("inverse_tol"),
                         max_iterations=settings["max_iterations"], dtype=dtype)
