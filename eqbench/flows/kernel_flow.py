"""The equivariant kernel flow (paper §5 eq. (1), A.4, C.1; SPEC §4 "Kernel flow details").

A continuous normalizing flow whose velocity is a sum of pair terms along the pair vectors,

    v_i(x, t) = Σ_{j≠i} φ(d_ij, t) r_ij,        r_ij = x_i - x_j,  d_ij = |r_ij|,

so it is equivariant under permutations, rotations and reflections, invariant under
translations, and keeps the centre of mass fixed (Σ_i v_i = 0 because φ is symmetric in i, j).
The coupling ``φ`` mixes normalised radial basis functions of the distance and of the time:

    K_k(d) = g_k(d) / Σ_m g_m(d),    g_k(d) = exp(-(d - μ_k)² / γ_k²)      (50 kernels)
    R_l(t) = h_l(t) / Σ_m h_m(t),    h_l(t) = exp(-(t - ν_l)² / β_l²)       (10 kernels)
    φ(d, t) = Σ_l R_l(t) [Σ_k (K_k(d) + c_k²) W_lk + b_l]          (offset = "paper-code")
    φ(d, t) = Σ_l R_l(t) [Σ_k W_lk K_k(d) + b_l] + Σ_k c_k K_k(d)  (offset = "radial")

Both are ``φ = Σ_k K_k(d) w_k(t)`` (Σ_k K_k = 1) with ``w_k(t) = Σ_l R_l(t) (W_lk + b'_l) + c'_k``:
``b'_l = b_l + Σ_k c_k² W_lk``, ``c' = 0`` for the authors' offset, ``b' = b``, ``c' = c`` for the
radial one. Centres are fixed buffers; the bandwidths are stored as logs, trainable by default.
Parameters: W (10 x 50), 50 log-bandwidths γ, 10 log-bandwidths β, 50 offsets c, 10 biases b:
620 (560 with ``bandwidths = "fixed"``, where the log-bandwidths are buffers).

**Text, code and defaults** (paper C.1; SPEC §4 records the authors' code, en_flows
``dw4_experiment/models.py`` and eqnode ``KernelDynamics``). Each difference is a setting; the
default follows the paper's text where it is explicit and the authors' code where it is silent:

- ``bandwidths``: ``"trainable"`` (default) or ``"fixed"``. C.1 says the kernel flow's
  bandwidths "were optimized during the training process" for DW-4 and LJ-13 (and counts 620
  trainable parameters), as does the code. (C.2 says the *gradient flows'* RBF bandwidths "were
  not optimized".) ``"fixed"`` is offered to measure what training them buys.
- ``time_bandwidths`` (Lennard-Jones only): ``"paper-code"`` (default) is the code's
  ``(0.3 + 0.5 (ν - 0.5)²) / √10`` (0.095-0.134); ``"eqbench"`` is eqbench's former
  ``0.15 + 0.6 (ν - 0.5)²`` (0.15-0.30). The text gives only the shape ("narrower bandwidths
  around t = 0.5"), which both have, so the code decides. DW systems: 0.3 under both (text, code).
- ``offset``: ``"paper-code"`` (default) is the code's ``(K + c²) W``, constant in d (the 50
  "per-distance-kernel" parameters only shift each time kernel's bias by Σ_k c_k² W_lk; starting
  from small c their gradient is small, 2 c_k Σ_l R_l W_lk). ``"radial"`` is eqbench's former
  time-independent radial term ``Σ_k c_k K_k(d)``. The text is silent beyond the count 620.
- Distance centres and bandwidths: the code's placement (:mod:`eqbench.flows.defaults`); the
  text's "[0, 16] concentrated around rm = 1" does not describe it (17 of 50 centres lie below
  0.5 rm, 4 in [0.8, 1.3] rm) and gives no numbers, so the code decides.

Closed-form divergence (paper, equation after (1); A.4 eq. (21)). The Jacobian block of particle
i with respect to itself is Σ_{j≠i} [φ'(d_ij) r_ij r_ijᵀ / d_ij + φ(d_ij) I], whose trace is
Σ_{j≠i} [φ'(d_ij) d_ij + D φ(d_ij)]; summed over i, each unordered pair counts twice:

    div v = 2 Σ_{i<j} [φ'(d_ij) d_ij + D φ(d_ij)].

``φ'`` differentiates the normalisation of K too (softmax/quotient rule): with
``a_k = ∂ log g_k/∂d = -2 (d - μ_k)/γ_k²``, ``K_k' = K_k (a_k - Σ_m K_m a_m)`` and
``φ' = Σ_k K_k a_k w_k - φ Σ_k K_k a_k``. K is computed as a softmax over k of the logits
``-(d - μ_k)²/γ_k²`` (shifted by their maximum), so it stays finite and exact for distances far
outside the kernel range, where every g_k underflows and a literal ratio g/Σg would be 0/0.
Because v is translation invariant, ``tr ∂v/∂x`` on R^{N·D} equals the trace on the CoM-free
subspace U (the CoM direction is in the Jacobian's null space), which is the log-density rate.

Implementation notes (timings measured on the project's 2-core CPU box, float32, batch 64):

- Everything runs over the unordered pairs i < j only (d_ij = d_ji, φ shared; v_i += φ r_ij,
  v_j -= φ r_ij). Pair tensors are pair-major ``[P, B, D]``: gathering/scattering whole ``[B, D]``
  rows along dim 0 is 3-10x faster than indexing dim 1 of ``[B, N, D]`` (13 vs 44 us at N = 13,
  1.1 vs 13 ms at N = 128). Kernel tensors are kernel-major ``[K, B·P]``, so every contraction
  is a short-and-wide GEMM, which MKL runs 2-6x faster than the tall-and-skinny transpose.
- The logits are one GEMM: ``-g (d - μ)² = [-g, 2gμ, -gμ²] · [d², d, 1]`` (g = 1/γ²). Since
  ``φ = K · w(t)`` with ``w(t) = R(t)(W + b 1ᵀ) + c`` (one 50-vector per time, not per pair),
  φ and everything the divergence needs come from one more GEMM with the rows
  ``[w, 2gμ w, 2g w, 2gμ, 2g, 1]``: ``φ' = Σ K a w - φ Σ K a`` with ``a_k = 2gμ_k - 2g_k d``,
  and the ``1`` row is the softmax normaliser (K is never normalised elementwise). w is centred
  first (φ' does not change when a constant is added to w), which keeps the cancellation in φ'
  small. The divergence therefore costs ~5-10% on top of the velocity.
- Softmax entries below ``exp(-60)`` of the pair's largest one are raised to it before the
  exponential. That changes φ by less than 1e-24 relative (below float64 resolution), but the
  CPU ``exp`` takes a slow path when its result is subnormal or zero (measured 12x for
  underflow to 0, 57x for subnormal results in float32), and most of the 50 kernels are that
  far from any given distance. Gradients treat the floor as the identity, so the closed-form
  divergence is the derivative of the computed velocity to rounding.
- With gradients enabled, velocity + divergence is one autograd node (:class:`_PairField`) with
  a hand-written backward (first order; double backward raises), which is ~2x faster than
  letting autograd record ~30 small operations per evaluation. :meth:`KernelFlow.velocity` with
  gradients uses ordinary, twice-differentiable operations, so brute-force and Hutchinson
  divergences work (and check the closed form independently).
- Parameter-derived constants (1/γ², the logit coefficients, W + b and their products with the
  kernel constants) are computed once per ODE solve (:meth:`KernelFlow.integrate`), not once
  per evaluation; each evaluation adds only ``R(t)`` and one small GEMV.
- Works for any batch size and any number of particles (the divergence-cost task scales N with
  the same kernels); the time t must be a scalar, as in every CNF solve.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from eqbench.capabilities import model_builder
from eqbench.errors import ConfigError
from eqbench.flows.cnf import CNF, SolverConfig, cnf_settings, parse_dtype, pop_cnf_options, reject_unknown
from eqbench.flows.settings import Setting, check_settings, choice, dtype_setting, integer, number
from eqbench.flows.defaults import TIME_BANDWIDTH_RULES, distance_kernel_placement, time_kernel_placement
from eqbench.geometry import pair_indices
from eqbench.systems.base import SYMMETRIES, ParticleSystem

__all__ = ["BANDWIDTH_MODES", "KERNEL_FLOW_OPTIONS", "OFFSETS", "SETTINGS", "KernelFlow", "build", "default_kernels",
           "validate"]

#: Settings of ``build`` besides the common CNF ones.
KERNEL_FLOW_OPTIONS = ("n_distance_kernels", "n_time_kernels", "init_scale", "dtype", "bandwidths",
                       "time_bandwidths", "offset")
#: ``bandwidths``: whether the kernel bandwidths are trained (paper C.1) or kept at their start.
BANDWIDTH_MODES = ("trainable", "fixed")
#: ``offset``: how the 50 per-distance-kernel parameters c enter φ (module docstring).
OFFSETS = ("paper-code", "radial")

#: Softmax entries are floored at exp(-_LOG_FLOOR) times the pair's largest entry (module docstring).
_LOG_FLOOR = 60.0


def default_kernels(system: ParticleSystem, n_distance_kernels: int = 50, n_time_kernels: int = 10,
                    time_bandwidths: str = "paper-code") -> dict[str, torch.Tensor]:
    """Kernel centres and initial bandwidths (float64) for ``system``, from its kind and lengths
    (paper C.1, SPEC §4; the rules are in :mod:`eqbench.flows.defaults`).

    - double well (DW-2 / DW-4, and any ``dw<N>``): distance centres equispaced over the pair
      distances ``[0, 2 d0] = [0, 8]``, γ = 0.5; time bandwidths β = 0.3.
    - Lennard-Jones (LJ-13, and any ``lj<N>``): distance centres
      ``rm · sort((linspace(0, 16) - 1.5)² / 32)`` (densest near 0: 17 of 50 centres lie below
      0.5 rm and only 4 in [0.8, 1.3] rm around the LJ minimum; sparser towards ~6.6 rm),
      γ = rm (0.3 + 3 (μ/rm - 1.5)² / 64). Time bandwidths by ``time_bandwidths``: the authors'
      code ``(0.3 + 0.5 (ν - 0.5)²) / √10`` (``"paper-code"``, default) or eqbench's former
      ``0.15 + 0.6 (ν - 0.5)²`` (``"eqbench"``); the paper only says narrower near t = 0.5.
    - harmonic and ``other``: as the double well, over the system's ``pair_distance_range``
      with γ = (hi - lo) / 16.

    Time centres are ``linspace(0, 1)`` for every system.
    """
    if n_distance_kernels < 2 or n_time_kernels < 2:
        raise ConfigError(
            f"kernel-flow needs at least 2 distance and 2 time kernels, got {n_distance_kernels} and {n_time_kernels}"
        )
    distance_centres, distance_bandwidths = distance_kernel_placement(system, n_distance_kernels)
    time_centres, time_widths = time_kernel_placement(system, n_time_kernels, time_bandwidths)
    return {
        "distance_centres": distance_centres,
        "distance_bandwidths": distance_bandwidths,
        "time_centres": time_centres,
        "time_bandwidths": time_widths,
    }


# ---------------------------------------------------------------------------------------------
# Pair geometry and the kernel block, shared by the plain and the fused evaluation.


@functools.lru_cache(maxsize=32)
def _pair_index(n_particles: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(i, j, cat(i, j))`` over the unordered pairs i < j (the order of :func:`pair_indices`)."""
    i, j = pair_indices(n_particles, device)
    return i, j, torch.cat((i, j))


def _gather_pairs(y: torch.Tensor, ij: torch.Tensor) -> torch.Tensor:
    """``y_i - y_j`` for every pair: ``[B, N, D] -> [P, B, D]`` (pair-major).

    Pair-major: gathering and scattering whole ``[B, D]`` rows along dim 0 is 3-10x faster on
    CPU than indexing dim 1 of ``[B, N, D]`` (measured: 13 vs 44 us at N = 13, 1.1 vs 13 ms at
    N = 128, batch 64).
    """
    both = y.transpose(0, 1).contiguous().index_select(0, ij)
    n_pairs = both.shape[0] // 2
    return both[:n_pairs] - both[n_pairs:]


def _scatter_pairs(f: torch.Tensor, i: torch.Tensor, j: torch.Tensor, n_particles: int) -> torch.Tensor:
    """``out_i = Σ_{j>i} f_ij - Σ_{j<i} f_ji`` for pair terms ``f`` ``[P, B, D]``; returns ``[B, N, D]``."""
    out = f.new_zeros(n_particles, *f.shape[1:])
    out.index_add_(0, i, f)
    out.index_add_(0, j, f, alpha=-1)
    return out.transpose(0, 1).contiguous()


def _pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(r, d, i, j, ij)``: pair vectors ``[P, B, D]``, distances ``[P, B]`` and pair indices."""
    i, j, ij = _pair_index(x.shape[-2], str(x.device))
    r = _gather_pairs(x, ij)
    return r, torch.linalg.vector_norm(r, dim=-1), i, j, ij


def _features(d_flat: torch.Tensor) -> torch.Tensor:
    """``[d², d, 1]``, shape ``[3, BP]``: the logits are ``coef @ features`` (one GEMM)."""
    return torch.stack((d_flat * d_flat, d_flat, torch.ones_like(d_flat)))


class _FlooredLogits(torch.autograd.Function):
    """Logits minus their per-column maximum, floored at ``-_LOG_FLOOR``; gradient: identity.

    Shifting by the maximum does not change the softmax; the floor changes it by less than
    ``K · exp(-60)`` and is treated as the identity by the gradient (module docstring). The
    backward is the identity, so this is differentiable any number of times.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor) -> torch.Tensor:
        shifted = s - s.amax(dim=0, keepdim=True)
        return shifted.clamp_(min=-_LOG_FLOOR)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


# ---------------------------------------------------------------------------------------------
# Fused velocity + closed-form divergence: forward without autograd, hand-written backward.


def _unpack(packed: torch.Tensor, n_kernels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``packed = [rows.flatten(), w_mean]`` -> ``(rows [5, K], w_mean)``."""
    return packed[: 5 * n_kernels].view(5, n_kernels), packed[5 * n_kernels]


def _fused_forward(x: torch.Tensor, coef: torch.Tensor, packed: torch.Tensor, with_div: bool):
    """Velocity (and divergence) in one pass; returns them and what the backward needs.

    ``coef`` is ``[K, 3]`` (logits ``coef @ [d², d, 1]``); ``packed`` holds the rows ``[5, K]``
    ``[w_c, 2gμ w_c, 2g w_c, 2gμ, 2g]`` (``w_c = w - w_mean``) and then ``w_mean``. A row of
    ones is appended here: its contraction is the softmax normaliser.
    """
    N, D = x.shape[-2:]
    rows, w_mean = _unpack(packed, coef.shape[0])
    r, d, i, j, _ = _pairs(x)
    d_flat = d.reshape(-1)
    features = _features(d_flat)
    e = torch.mm(coef, features)  # logits, [K, BP]
    e.sub_(e.amax(dim=0, keepdim=True)).clamp_(min=-_LOG_FLOOR).exp_()  # unnormalised K
    lhs = torch.cat((rows if with_div else rows[:1], torch.ones_like(rows[:1])))
    m = torch.mm(lhs, e)  # contractions; last row: Σ_k e_k
    z = m[-1]
    a = m[:-1] / z  # normalised contractions Σ_k K_k rows[:, k], [5 or 1, BP]
    phi = (a[0] + w_mean).view(d.shape)
    v = _scatter_pairs(phi.unsqueeze(-1) * r, i, j, N)
    if not with_div:
        return v, None, None
    # φ' = Σ_k K_k a_k (w_c,k - φ_c) with a_k = 2gμ_k - 2g_k d:  u = a[1:3] - φ_c a[3:5], φ' = u0 - d u1
    u = torch.addcmul(a[1:3], a[3:5], a[0], value=-1.0)
    dphi = torch.addcmul(u[0], d_flat, u[1], value=-1.0).view(d.shape)
    div = torch.addcmul(phi, dphi, d, value=1.0 / D).sum(0).mul_(2.0 * D)  # 2 Σ_pairs (φ' d + D φ)
    return v, div, (r, d, features, e, lhs, z, a, phi, u[1], dphi)


class _PairField(torch.autograd.Function):
    """``(x, coef, packed) -> (v, div v)`` as one autograd node (first-order backward)."""

    @staticmethod
    def forward(ctx, x, coef, packed):
        v, div, saved = _fused_forward(x, coef, packed, with_div=True)
        ctx.save_for_backward(x, coef, *saved)
        return v, div

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v, grad_div):
        x, coef, r, d, features, e, lhs, z, a, phi, u1, dphi = ctx.saved_tensors
        B, N, D = x.shape
        i, j, ij = _pair_index(N, str(x.device))
        d_flat = d.reshape(-1)
        # div = 2 Σ_p (φ' d + D φ)
        if grad_div is None:
            grad_div = x.new_zeros(B)
        gdiv2 = 2.0 * grad_div  # [B], broadcasts against [P, B]
        g_dphi = (gdiv2 * d).view(-1)
        g_d = (gdiv2 * dphi).view(-1)
        # v_i = Σ_j φ_ij r_ij (pairs i < j, scattered to both particles)
        if grad_v is not None:
            gf = _gather_pairs(grad_v, ij)  # [P, B, D]
            g_phi = torch.add(torch.linalg.vecdot(gf, r), gdiv2, alpha=D).view(-1)
            gr = phi.unsqueeze(-1) * gf
        else:
            g_phi = (D * gdiv2).expand_as(d).reshape(-1)
            gr = torch.zeros_like(r)
        # φ' = u0 - d u1,  u = a[1:3] - φ_c a[3:5],  φ_c = a0,  φ = φ_c + w_mean
        g_d = torch.addcmul(g_d, g_dphi, u1, value=-1.0)
        g_u1 = -g_dphi * d_flat
        phi_c = a[0]
        g_a = torch.stack((
            g_phi - g_dphi * a[3] - g_u1 * a[4],
            g_dphi,
            g_u1,
            -g_dphi * phi_c,
            -g_u1 * phi_c,
        ))  # [5, BP]
        # a = m[:5] / z,  z = m[5]  ->  g_m = [g_a / z ; -Σ_r g_a_r a_r / z]
        g_m5 = g_a / z
        g_m = torch.cat((g_m5, -(g_m5 * a).sum(0, keepdim=True)))
        # m = rows @ e,  e = exp(s - max s) (the floor acts as the identity),  s = coef @ features.
        # (Measured: this order of GEMMs beats reassociations that avoid forming g_s.)
        g_rows = torch.mm(g_m5, e.t())  # [5, K] (the appended ones row is constant)
        g_s = torch.mm(lhs.t(), g_m).mul_(e)  # [K, BP]
        g_coef = torch.mm(g_s, features.t())  # [K, 3]
        g_feat = torch.mm(coef[:, :2].t(), g_s)  # [2, BP]: d/d(d²), d/d(d)
        g_d = g_d + torch.addcmul(g_feat[1], d_flat, g_feat[0], value=2.0)
        gr = torch.addcmul(gr, (g_d / d_flat).view(d.shape).unsqueeze(-1), r)
        g_x = _scatter_pairs(gr, i, j, N)
        return g_x, g_coef, torch.cat((g_rows.view(-1), g_phi.sum().view(1)))


# ---------------------------------------------------------------------------------------------


class KernelFlow(CNF):
    """Equivariant kernel flow (paper §5): see the module docstring."""

    has_closed_form_divergence = True
    symmetries = SYMMETRIES

    def __init__(
        self,
        system: ParticleSystem,
        *,
        distance_centres: torch.Tensor,
        distance_bandwidths: torch.Tensor,
        time_centres: torch.Tensor,
        time_bandwidths: torch.Tensor,
        init_scale: float = 1e-3,
        dtype: torch.dtype | None = None,
        bandwidths: str = "trainable",
        offset: str = "paper-code",
        solver: SolverConfig | None = None,
        train_divergence: str = "exact",
        eval_divergence: str = "exact",
    ):
        super().__init__(system, solver=solver, train_divergence=train_divergence, eval_divergence=eval_divergence)
        dtype = dtype or torch.get_default_dtype()
        n_k, n_l = distance_centres.numel(), time_centres.numel()
        if distance_bandwidths.shape != distance_centres.shape or time_bandwidths.shape != time_centres.shape:
            raise ConfigError("kernel-flow: each kernel needs exactly one centre and one bandwidth")
        if not (distance_bandwidths > 0).all() or not (time_bandwidths > 0).all():
            raise ConfigError("kernel-flow: bandwidths must be positive")
        self.register_buffer("distance_centres", distance_centres.to(dtype).clone())
        self.register_buffer("time_centres", time_centres.to(dtype).clone())
        if bandwidths not in BANDWIDTH_MODES:
            raise ConfigError(f"kernel-flow: bandwidths must be one of {', '.join(BANDWIDTH_MODES)}; got {bandwidths!r}")
        if offset not in OFFSETS:
            raise ConfigError(f"kernel-flow: offset must be one of {', '.join(OFFSETS)}; got {offset!r}")
        self.bandwidths = bandwidths
        self.offset = offset
        log_widths = {"log_distance_bandwidths": distance_bandwidths.to(dtype).log(),
                      "log_time_bandwidths": time_bandwidths.to(dtype).log()}
        for name, value in log_widths.items():
            # Fixed bandwidths are buffers: in the state_dict under the same names, never trained.
            if bandwidths == "trainable":
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value.clone())
        # Near-identity start: φ ≈ 0, so v is small. Not exactly zero: with W = b = c = 0 every
        # gradient of the bandwidths vanishes (K and R are normalised, so φ would not depend on
        # them), and with W = c = 0 alone the distance bandwidths still get none. Small random
        # values from torch's global RNG give every parameter a nonzero gradient from the start.
        # Scale 1e-3: a constant part φ̄ of φ is a uniform dilation at rate N φ̄, so on LJ-13 a
        # scale of 1e-2 already starts with |log det| ~ 5 nats; 1e-3 gives ~0.5 (Adam's steps do
        # not depend on the gradient scale, so the small start does not slow training).
        self.weight = nn.Parameter(init_scale * torch.randn(n_l, n_k, dtype=dtype))  # W, [L, K]
        self.time_bias = nn.Parameter(init_scale * torch.randn(n_l, dtype=dtype))  # b, [L]
        self.distance_bias = nn.Parameter(init_scale * torch.randn(n_k, dtype=dtype))  # c, [K]
        #: Parameter-derived constants, set for the duration of one ODE solve (:meth:`integrate`).
        self._solve_constants: tuple[torch.Tensor, ...] | None = None

    @property
    def n_distance_kernels(self) -> int:
        return self.distance_centres.numel()

    @property
    def n_time_kernels(self) -> int:
        return self.time_centres.numel()

    # ------------------------------------------------------------------ kernels
    def time_kernels(self, t: torch.Tensor) -> torch.Tensor:
        """``R(t)``: the normalised time RBFs, shape ``[L]`` for scalar ``t``."""
        inv_b2 = torch.exp(-2.0 * self.log_time_bandwidths)
        return torch.softmax(-(t - self.time_centres).square() * inv_b2, dim=-1)

    def distance_kernels(self, d: torch.Tensor) -> torch.Tensor:
        """``K(d)``: the normalised distance RBFs, shape ``[..., K]`` (for inspection and tests)."""
        g = torch.exp(-2.0 * self.log_distance_bandwidths)
        return torch.softmax(-(d.unsqueeze(-1) - self.distance_centres).square() * g, dim=-1)

    def _biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b', c')`` with ``w(t) = R(t) (W + b' 1ᵀ) + c'`` (module docstring): the authors'
        offset folds ``Σ_k c_k² W_lk`` into the time biases; the radial one adds ``c``."""
        if self.offset == "paper-code":
            return self.time_bias + self.weight @ self.distance_bias.square(), torch.zeros_like(self.distance_bias)
        return self.time_bias, self.distance_bias

    def kernel_weights(self, t: torch.Tensor | float) -> torch.Tensor:
        """``w(t)`` with ``φ(d, t) = K(d) · w(t)``: ``R(t) (W + b' 1ᵀ) + c'``, shape ``[K]``."""
        t = self._scalar_time(torch.as_tensor(t, dtype=self.weight.dtype, device=self.weight.device))
        time_bias, distance_bias = self._biases()
        return self.time_kernels(t) @ (self.weight + time_bias.unsqueeze(-1)) + distance_bias

    def coupling(self, d: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``φ(d, t)`` for distances of any shape (reference implementation, for tests and plots)."""
        return self.distance_kernels(d) @ self.kernel_weights(t)

    # ------------------------------------------------------------------ per-solve constants
    def _compute_constants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Parameter-derived tensors every evaluation needs: ``(coef, A, bias, -1/β²)``.

        ``coef = [-g, 2gμ, -gμ²]`` (``[K, 3]``, g = 1/γ²) gives the logits; ``R(t) A + bias``
        (``A`` is ``[L, 5K + 1]``) gives, in one small GEMV, the contraction rows
        ``[w_c, 2gμ w_c, 2g w_c, 2gμ, 2g]`` (flattened) followed by ``mean_k w``, where
        ``w_c = w - mean_k w``.
        """
        mu = self.distance_centres
        g = torch.exp(-2.0 * self.log_distance_bandwidths)
        gm = g * mu
        coef = torch.stack((-g, 2.0 * gm, -gm * mu), dim=1)
        time_bias, c = self._biases()
        wb = self.weight + time_bias.unsqueeze(-1)  # [L, K]
        wb_mean = wb.mean(-1, keepdim=True)
        wb_c = wb - wb_mean
        c_mean = c.mean(-1, keepdim=True)
        c_c = c - c_mean
        two_g, two_gm = 2.0 * g, 2.0 * gm
        zeros = wb_c.new_zeros(wb_c.shape[0], 2 * g.shape[0])
        a = torch.cat((wb_c, wb_c * two_gm, wb_c * two_g, zeros, wb_mean), dim=1)
        bias = torch.cat((c_c, c_c * two_gm, c_c * two_g, two_gm, two_g, c_mean))
        return coef, a, bias, -torch.exp(-2.0 * self.log_time_bandwidths)

    def _field_inputs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coef, packed)`` for one evaluation: ``packed = [rows(t).flatten(), mean_k w(t)]``."""
        coef, a, bias, neg_inv_b2 = self._solve_constants or self._compute_constants()
        r_t = torch.softmax((self._scalar_time(t) - self.time_centres).square().mul(neg_inv_b2), dim=-1)
        return coef, torch.addmv(bias, a.t(), r_t)

    def integrate(self, x0: torch.Tensor, t0: float, t1: float, method: str | None = None):
        """As :meth:`CNF.integrate`, computing the parameter-derived constants once per solve.

        Safe for OTD too: the adjoint's backward solve runs after this returns, without the cache,
        so it differentiates fresh constants.
        """
        if self._solve_constants is not None:  # nested solve: keep the outer cache
            return super().integrate(x0, t0, t1, method)
        self._solve_constants = self._compute_constants()
        try:
            return super().integrate(x0, t0, t1, method)
        finally:
            self._solve_constants = None

    @staticmethod
    def _scalar_time(t: torch.Tensor) -> torch.Tensor:
        if t.numel() != 1:
            raise ValueError(f"kernel-flow evaluates one time at a time; got t of shape {list(t.shape)}")
        return t.reshape(())

    def _check_x(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[-2] < 2:
            raise ValueError(f"kernel-flow expects configurations [batch, n_particles >= 2, n_dims], got {list(x.shape)}")

    # ------------------------------------------------------------------ the field
    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``v_i = Σ_j φ(d_ij, t) r_ij`` for ``x`` of shape ``[B, N, D]`` (any N)."""
        self._check_x(x)
        coef, packed = self._field_inputs(torch.as_tensor(t, dtype=x.dtype, device=x.device))
        if not torch.is_grad_enabled():
            return _fused_forward(x, coef, packed, with_div=False)[0]
        # Plain autograd ops: twice differentiable (brute-force / Hutchinson divergence in training).
        rows, w_mean = _unpack(packed, coef.shape[0])
        r, d, i, j, _ = _pairs(x)
        logits = torch.mm(coef, _features(d.reshape(-1)))
        k = torch.softmax(_FlooredLogits.apply(logits), dim=0)  # [K, BP]
        phi = (rows[0] @ k + w_mean).view(d.shape)
        return _scatter_pairs(phi.unsqueeze(-1) * r, i, j, x.shape[-2])

    def velocity_and_divergence(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v, div v)`` with the exact closed-form divergence, in one vectorised pass."""
        self._check_x(x)
        coef, packed = self._field_inputs(torch.as_tensor(t, dtype=x.dtype, device=x.device))
        if torch.is_grad_enabled():
            return _PairField.apply(x, coef, packed)
        v, div, _ = _fused_forward(x, coef, packed, with_div=True)
        return v, div

    def extra_repr(self) -> str:
        return (
            f"system={self.system_name}, distance_kernels={self.n_distance_kernels}, "
            f"time_kernels={self.n_time_kernels}, bandwidths={self.bandwidths}, offset={self.offset}, "
            f"solver={self.solver}"
        )


#: The settings of ``kernel-flow`` (:mod:`eqbench.flows.settings`): the CNF ones and its own.
SETTINGS = {
    **cnf_settings(closed_form=True),
    "n_distance_kernels": Setting(integer(2).check, "an integer >= 2 (at least 2 distance and 2 time kernels)"),
    "n_time_kernels": Setting(integer(2).check, "an integer >= 2 (at least 2 distance and 2 time kernels)"),
    "init_scale": number(at_least=0.0),
    "dtype": dtype_setting(),
    "bandwidths": choice(*BANDWIDTH_MODES),
    "time_bandwidths": choice(*TIME_BANDWIDTH_RULES),
    "offset": choice(*OFFSETS),
}


def validate(system: ParticleSystem, config: Mapping[str, Any]) -> None:
    """Check ``kernel-flow`` settings without building anything (planning calls this)."""
    check_settings(config, "kernel-flow", SETTINGS)


@model_builder(capabilities=["cnf", "trainable", "equivariant", "exact-density"], validate=validate)
def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> KernelFlow:
    """Registry builder for ``kernel-flow``.

    ``config`` accepts the common CNF settings (:data:`eqbench.flows.cnf.CNF_OPTIONS`; training
    uses the exact closed-form divergence by default) and ``n_distance_kernels`` (50),
    ``n_time_kernels`` (10), ``init_scale`` (1e-3: standard deviation of the random initial W, b,
    c), ``dtype`` (``float32`` default, or ``float64``), and the text-vs-code choices of the
    module docstring: ``bandwidths`` (``"trainable"``, paper C.1 | ``"fixed"``),
    ``time_bandwidths`` (``"paper-code"`` | ``"eqbench"``, Lennard-Jones only) and ``offset``
    (``"paper-code"`` | ``"radial"``). The defaults give the paper's 620 parameters on every
    system; the kernel placement follows the system's kind and lengths (:func:`default_kernels`),
    so the flow builds for any system.

    Example:
        >>> import eqbench
        >>> flow = build(eqbench.get_system("lj13"), {"bandwidths": "fixed", "offset": "radial"})
        >>> flow.n_parameters, flow.offset
        (560, 'radial')
    """
    validate(system, config or {})
    config = dict(config or {})
    options = pop_cnf_options(config)
    n_distance = config.pop("n_distance_kernels", 50)
    n_time = config.pop("n_time_kernels", 10)
    init_scale = float(config.pop("init_scale", 1e-3))
    dtype = parse_dtype(config.pop("dtype", "float32"), "kernel-flow")
    bandwidths = config.pop("bandwidths", "trainable")
    offset = config.pop("offset", "paper-code")
    time_bandwidths = config.pop("time_bandwidths", "paper-code")
    reject_unknown(config, "kernel-flow", KERNEL_FLOW_OPTIONS)
    kernels = default_kernels(system, n_distance, n_time, time_bandwidths)
    return KernelFlow(system, init_scale=init_scale, dtype=dtype, bandwidths=bandwidths, offset=offset, **kernels,
                      **options)
