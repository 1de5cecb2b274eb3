"""SE(3) equivariant augmented coupling flow (``se3-acf``; Midgley, Stimper, Antorán, Mathieu,
Schölkopf & Hernández-Lobato, NeurIPS 2023, "SE(3) Equivariant Augmented Coupling Flows", seed 003).

Coupling flows split the coordinates in two; any split of the particles' Cartesian coordinates
breaks rotation and permutation symmetry. The paper splits along an *augmented* axis instead:
each particle ``x_i ∈ R^D`` gets an auxiliary particle ``a_i ∈ R^D``, and coupling layers
alternately transform all of x given a and all of a given x, each in per-particle frames built
equivariantly from the conditioning set. The flow is exact on ``(x, a)``; the density of x is
the marginal, estimated by importance sampling (:mod:`eqbench.flows.augmented`).

**State and layout.** :meth:`AugmentedCouplingFlow.forward` / :meth:`~AugmentedCouplingFlow.inverse`
act on joint states ``[B, 2N, D]``: rows ``0..N-1`` are x (CoM-free), rows ``N..2N-1`` are a
(particle i's auxiliary particle is row ``N + i``). The space is ``U × R^{N·D}`` (U the CoM-free
subspace, SPEC §1): x has zero CoM, a is unconstrained, so the state has ``(2N - 1) D`` degrees of
freedom, and log-determinants are on that space (orthonormal basis ``B_U ⊕ I``,
:func:`eqbench.geometry.com_free_basis`).

**Densities.** Base ``ρ(z_x, z_a) = N_U(z_x; 0, I) · N(z_a; z_x, σ_b² I_{N·D})``, target
conditional ``π(a | x) = N(a; x, σ² I_{N·D})`` with ``σ_b = σ = 0.1`` (below).
``log q(x, a) = log ρ(f⁻¹(x, a)) + log|det ∂f⁻¹|``; :meth:`~AugmentedCouplingFlow.log_prob_joint`
first moves the pair so that x's CoM is zero (``(x - x̄, a - x̄)``), as the authors do
(``eacf/flow/aug_flow_dist.py:231-234``), so the joint density is invariant under a
simultaneous translation of x and a, and so is π.

**One coupling** (:class:`FrameCoupling`), transforming ``y`` (x or a) given ``c`` (the other):
an EGNN (:class:`eqbench.flows.egnn.EGNN`, invariant input feature 1 per particle) on the
positions ``c`` returns per particle equivariant vectors ``v_i0, v_i1, …`` and invariant scalars
``s_i``. Origin ``o_i = c_i + v_i0``; orthonormal frame ``F_i`` from the remaining vectors
(:mod:`eqbench.flows.frames`); an MLP head maps ``s_i`` to the parameters of D elementwise
transforms. Then

    u_i = F_iᵀ (y_i - o_i),   u'_i = τ_i(u_i) (per component),   y'_i = F_i u'_i + o_i,
    log|det| = Σ_i Σ_d log τ'_id(u_id)              (F_i orthogonal, |det F_i| = 1).

τ is zuko's monotonic rational-quadratic spline (Durkan et al. 2019;
``zuko.transforms.MonotonicRQSTransform``) on ``[-B, B]``, identity outside, or an affine map
(``transform="affine"``). Because ``o_i`` and ``F_i`` are equivariant functions of ``c`` (and ``s_i``
invariant), the coupling commutes with rotations (and, for Gram–Schmidt frames, reflections),
with permutations of the particles (applied to x and a alike) and with joint translations.

**Block** (sampling direction): transform x given a, re-centre, transform a given x. This is
the authors' order: ``build_flow.py:108`` builds ``[a|x (swap=False), x|a (swap=True)]`` per
layer and their chain applies the list last-first in the forward direction
(``distrax_with_extra.py:55-62``).

**Re-centring and its log-determinant.** The x|a coupling moves x's CoM; the authors restore
it (``proj_coupling.py:95-112``): after ``x' = T(x; a)`` both are shifted by ``-m``,
``m = mean_i x'_i``, so the block maps ``(x, a) ↦ (x' - m, a - m)`` on ``U × R^{N·D}`` (their
extra pre-shift by a's CoM changes nothing, by equivariance, and eqbench omits it). Derivation
that the log-determinant on ``U × R^{N·D}`` is still ``Σ log τ'`` over all ``N·D`` coordinates of x:
the unprojected map ``G(x, a) = (T(x; a), a)`` on ``R^{2ND}`` has ``det ∂G = det ∂T/∂x = Π τ'``
(block triangular, per-particle rotations). G commutes with the joint translations
``w ↦ w + (1 ⊗ t, 1 ⊗ t)``, so ∂G maps the D-dimensional translation subspace W identically
onto itself; in a basis ``[W, S]`` with ``S = U × R^{N·D}`` (transverse to W) ``∂G = [[I, *], [0, J_S]]``,
where ``J_S`` is the Jacobian of G followed by the projection onto S along W, which is exactly
the re-centring. Hence ``det J_S = det ∂G = Π τ'``. The inverse solves ``x̃ = T⁻¹(y; b)`` in
the input's frame and returns ``(x̃ - mean x̃, b - mean x̃)`` (then ``x̃ - mean x̃ ∈ U`` and the
forward map recovers ``(y, b)``). The tests compare with the brute-force Jacobian on that basis.

**Symmetries.** ``frame="right-handed"`` (the authors'): rotations, permutations, translations,
not reflections, in 2-D and 3-D (:mod:`eqbench.flows.frames`): ``symmetries = ("rotation",
"permutation", "translation")``. ``frame="gram-schmidt"`` adds ``"reflection"``.
:func:`eqbench.testing.check_flow` verifies each claim on the joint map.

Text, code and defaults
-----------------------
"Paper" is the NeurIPS 2023 text (its summary, seed 003, and what the code implements); "code" is
github.com/lollcat/se3-augmented-coupling-flows at ``beafab1``; file:line refer to it.

- **Projection.** Paper and code: Cartesian (``type=proj``), spherical and vector
  (``along_vector``) projections (``build_flow.py:66``); code default type ``spherical``
  (``examples/config/flow/default.yaml:14``). eqbench: Cartesian only (``projection =
  "cartesian"``, the one value of the setting; spherical is not implemented).
- **Frame.** Code, Cartesian: origin ``c_i + v_i0`` (``origin_on_coupled_pair: false``,
  ``default.yaml:33``; ``proj_coupling.py:148-153``), basis from D - 1 further vectors, 2-D by a
  +90° turn, 3-D by rejection and a cross product (``proj_coupling.py:19-50``), plus ``1e-6·I``
  added to the vectors "for stability" (``proj_coupling.py:24-26``). eqbench: the same frame
  without the ``1e-6·I`` term (it breaks exact equivariance); ``frame="gram-schmidt"`` (D
  vectors, O(D)-equivariant) is an eqbench option.
- **Transform in the frame.** Paper: "standard flow transformations, such as monotonic
  rational-quadratic splines". Code: ``proj.transform_type: real_nvp`` by default
  (``default.yaml:31``; softplus scale initialised to 1, ``build_proj_coupling.py:60-69``) or
  distrax RQS with 8 bins on [-10, 10], ``boundary_slopes='unconstrained'``, min bin size
  ``20·1e-4`` (``build_proj_coupling.py:70-79``; ``default.yaml:34-36``), ``3K + 1`` parameters per
  coordinate. eqbench: ``transform="spline"`` (default), zuko's RQS, ``bins = 8``, ``bound = 10``,
  boundary derivatives fixed at 1 (zuko's linear tails; ``3K - 1 = 23`` parameters per
  coordinate), minimum slope 1e-3 (zuko's); ``transform="affine"`` gives the code's default
  (``softplus(s + softplus⁻¹(1))`` scale and a shift).
- **Layers.** Code: ``n_layers: 12`` (``default.yaml:12``) blocks of two couplings (x|a, a|x),
  for DW-4 and LJ-13 alike. eqbench: ``blocks = 12``.
- **Augmented variables.** Code: ``n_aug: 1`` (``dw4.yaml:19``, ``lj13.yaml:14``); π and the base
  conditional ``a ~ x + N(0, 0.1² I)``, conditioned on x, over all N·D coordinates (not CoM-free)
  (``target/default.yaml:2-3``; ``base_dist.py:37-66``; ``conditional_dist.py:47-92``).
  eqbench: one auxiliary particle per particle, ``aux_scale = base_aux_scale = 0.1``.
- **CoM.** Code: x lives on the zero-CoM subspace (``CentreGravityGaussian``), a is free; densities
  are evaluated after shifting x and a by x's CoM (``aug_flow_dist.py:231-234``). eqbench: the same.
- **EGNN.** Code: its own EGNN (``eacf/nets/en_gnn.py``): 3 layers (``n_blocks: 3``), MLPs
  [64, 64] with LayerNorm and residual connections, 128 invariant features, cross-multiplicity
  shifts (``default.yaml:38-46``); a head MLP [64, 64] (``mlp_head_config``) from the invariant
  features to the transform parameters, zero-initialised last layer (``identity_init: true``,
  ``default.yaml:13``).
  eqbench: the shared :class:`eqbench.flows.egnn.EGNN` (Satorras et al. 2021 layer, SiLU MLPs,
  attention), ``egnn_layers = 3``, ``hidden = 64`` (one width for messages and features, the
  code's MLP width; its 128-feature node state has no counterpart in the shared module),
  scalars = ``hidden``; head MLP ``head_hidden = [64, 64]`` SiLU whose last layer starts at
  ``init_scale = 0.01`` × PyTorch's default with zero bias (near the identity while every
  parameter receives a gradient, as real NVP does; an exactly zero layer would leave the head's
  other layers without gradient at step 0).
- **Objective.** Code: ``-log q(x, a)`` with one ``a ~ π(· | x)`` per configuration
  (``max_lik_train_and_eval.py:68-73``), plus for LJ-13 a log-barrier on the angle between the
  two frame vectors, weight 10 (``lj13.yaml:26-27``; off for DW-4, ``dw4.yaml:30``;
  ``proj_coupling.py:164-200``). eqbench:
  ``training_estimator = {"iw_draws": 1}`` (the same gradient); the barrier is the setting
  ``frame_penalty`` (:func:`~eqbench.flows.frames.frame_barrier`, averaged over the couplings of
  each training pass and added by :func:`eqbench.train.fit` through
  :meth:`~eqbench.flows.base.Flow.training_penalty`), 0 (off) by default on every system so
  that the default objective is the likelihood alone; the authors' LJ-13 loss is
  ``frame_penalty = 10``. It never enters a density.
- **Marginal.** Code: ``K_marginal_log_lik: 20`` (``training/default.yaml:5``), IW estimate
  (``max_lik_train_and_eval.py:108-120``). eqbench: ``iw_draws = 20``.
- **Optimiser** (code, for reference; eqbench's training settings are the task's): Adam, learning
  rate warmed up from 2e-5 to 2e-4 over 30 epochs, then cosine decay to 2e-5
  (``eacf/utils/optimize.py:97-104``, ``training/optimizer/default_lr_schedule.yaml``); gradients
  clipped at 2x and updates skipped above 10x the running median norm over 100 steps
  (``optimize.py:16-48``); batch 32, 100 (DW-4) / 400 (LJ-13) epochs on 1,000 samples
  (``dw4.yaml:23-24``, ``lj13.yaml:19-20``); samples with ``log q < -1e4`` or a non-finite loss
  masked out of the batch (``max_lik_train_and_eval.py:28,50``).

**Parameter counts** (default settings, pinned in ``tests/test_augmented_coupling.py``):
DW-4 2,481,816; LJ-13 2,519,232: 24 couplings of one EGNN (3 layers of width 64, ``7H² + 8H + 1``
parameters per layer plus ``H`` per coordinate head, D + 1 heads in the last layer, embedding and
a 64-scalar read-out) and a head ``[64, 64, 64, 23·D]`` (8,320 + 65·23·D): 103,409 (D = 2) and
104,968 (D = 3) per coupling. eqbench has not counted the authors' JAX model (its EGNN carries
128 node features and LayerNorm MLPs, so the counts differ). ``{"hidden": 32, "head_hidden":
[32, 32]}`` gives 651,672 / 670,656.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from zuko.transforms import MonotonicRQSTransform

from eqbench.capabilities import model_builder
from eqbench.errors import ConfigError
from eqbench.flows.augmented import DEFAULT_IW_DRAWS, AugmentedFlow, GaussianAuxiliary, check_draws
from eqbench.flows.cnf import parse_dtype
from eqbench.flows.egnn import EGNN
from eqbench.flows.frames import FRAMES, frame_barrier, frame_vectors, gram_schmidt_frame, right_handed_frame
from eqbench.flows.node import parse_hidden
from eqbench.flows.settings import Setting, check_settings, choice, dtype_setting, integer, number, widths
from eqbench.systems.base import ParticleSystem

__all__ = ["DEFAULTS", "PROJECTIONS", "SETTINGS", "TRANSFORMS", "AugmentedCouplingFlow", "FrameCoupling", "build",
           "validate"]

#: Projections implemented (the paper's Cartesian projection).
PROJECTIONS = ("cartesian",)
#: Elementwise transforms in the local frame.
TRANSFORMS = ("spline", "affine")
#: Default settings (module docstring, "Text, code and defaults").
DEFAULTS: dict[str, Any] = {
    "blocks": 12,
    "hidden": 64,
    "egnn_layers": 3,
    "head_hidden": [64, 64],
    "bins": 8,
    "bound": 10.0,
    "transform": "spline",
    "projection": "cartesian",
    "frame": "right-handed",
    "aux_scale": 0.1,
    "base_aux_scale": 0.1,
    "iw_draws": DEFAULT_IW_DRAWS,
    "init_scale": 0.01,
    "frame_penalty": 0.0,
    "dtype": "float32",
}
_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


def _head(n_in: int, hidden: Sequence[int], n_out: int, init_scale: float, dtype: torch.dtype) -> nn.Sequential:
    widths_ = (n_in, *hidden, n_out)
    layers: list[nn.Module] = []
    for k in range(len(widths_) - 1):
        layers.append(nn.Linear(widths_[k], widths_[k + 1], dtype=dtype))
        if k < len(widths_) - 2:
            layers.append(nn.SiLU())
    with torch.no_grad():
        layers[-1].weight.mul_(init_scale)
        layers[-1].bias.zero_()
    return nn.Sequential(*layers)


class FrameCoupling(nn.Module):
    """Transform ``y`` [B, N, D] elementwise in per-particle frames built from ``c`` [B, N, D]
    (module docstring, "One coupling"). ``forward``/``inverse`` return the log-determinant of
    the map they apply, ``[B]``."""

    def __init__(self, n_dims: int, *, hidden: int = 64, egnn_layers: int = 3, head_hidden: Sequence[int] = (64, 64),
                 bins: int = 8, bound: float = 10.0, transform: str = "spline", frame: str = "right-handed",
                 init_scale: float = 0.01, dtype: torch.dtype = torch.float32):
        super().__init__()
        #: Mean :func:`frame_barrier` of the last training-mode pass (only while ``track_barrier``).
        self.track_barrier = False
        self.last_barrier: torch.Tensor | None = None
        if transform not in TRANSFORMS:
            raise ConfigError(f"se3-acf setting transform must be one of {', '.join(TRANSFORMS)}; got {transform!r}")
        self.n_dims, self.bins, self.bound = n_dims, int(bins), float(bound)
        self.transform, self.frame = transform, frame
        self.n_frame_vectors = frame_vectors(frame, n_dims)
        self.n_params = 3 * self.bins - 1 if transform == "spline" else 2
        self.egnn = EGNN(1, hidden=hidden, layers=egnn_layers, n_vectors=1 + self.n_frame_vectors, n_scalars=hidden,
                         dtype=dtype)
        self.head = _head(hidden, head_hidden, n_dims * self.n_params, init_scale, dtype)

    def conditioner(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(origin [B, N, D], frame [B, N, D, D] (columns), parameters [B, N, D, P])`` from ``c``."""
        vectors, scalars = self.egnn(c, c.new_ones(*c.shape[:-1], 1))
        origin = c + vectors[:, :, 0]
        basis = vectors[:, :, 1:]
        if self.track_barrier and self.training and basis.shape[-2] >= 2:
            self.last_barrier = frame_barrier(basis).mean()
        frame = right_handed_frame(basis) if self.frame == "right-handed" else gram_schmidt_frame(basis)
        params = self.head(scalars).reshape(*c.shape, self.n_params)
        return origin, frame, params

    def _elementwise(self, params: torch.Tensor, u: torch.Tensor, inverse: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply τ (or τ⁻¹) to ``u`` [B, N, D]; returns the output and ``log|τ'|`` at the *input* of
        τ (so the caller adds it forward and subtracts it inverse)."""
        if self.transform == "affine":
            log_scale = F.softplus(params[..., 0] + _SOFTPLUS_INV_ONE).log()
            shift = params[..., 1]
            if inverse:
                return (u - shift) * torch.exp(-log_scale), log_scale
            return u * torch.exp(log_scale) + shift, log_scale
        widths_, heights, derivatives = params.split((self.bins, self.bins, self.bins - 1), dim=-1)
        spline = MonotonicRQSTransform(widths_, heights, derivatives, bound=self.bound)
        if inverse:
            u = spline.inv(u)
        out, ladj = spline.call_and_ladj(u)
        return (u if inverse else out), ladj

    def _transform(self, y: torch.Tensor, c: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        origin, frame, params = self.conditioner(c)
        u = torch.einsum("bnde,bnd->bne", frame, y - origin)
        v, ladj = self._elementwise(params, u, inverse)
        out = torch.einsum("bnde,bne->bnd", frame, v) + origin
        ladj = ladj.sum(dim=(1, 2))
        return out, (-ladj if inverse else ladj)

    def forward(self, y: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._transform(y, c, inverse=False)

    def inverse(self, y: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._transform(y, c, inverse=True)


class AugmentedCouplingFlow(AugmentedFlow):
    """The SE(3) equivariant augmented coupling flow on ``(x, a)`` (module docstring)."""

    def __init__(self, system: ParticleSystem, *, blocks: int = 12, hidden: int = 64, egnn_layers: int = 3,
                 head_hidden: Sequence[int] = (64, 64), bins: int = 8, bound: float = 10.0, transform: str = "spline",
                 projection: str = "cartesian", frame: str = "right-handed", aux_scale: float = 0.1,
                 base_aux_scale: float = 0.1, iw_draws: int = DEFAULT_IW_DRAWS, init_scale: float = 0.01,
                 frame_penalty: float = 0.0, dtype: torch.dtype = torch.float32):
        super().__init__(system)
        _check_system(system)
        if projection not in PROJECTIONS:
            raise ConfigError(f"se3-acf setting projection must be one of {', '.join(PROJECTIONS)}; got {projection!r}")
        if frame not in FRAMES:
            raise ConfigError(f"se3-acf setting frame must be one of {', '.join(FRAMES)}; got {frame!r}")
        #: K of :meth:`log_prob`.
        self.iw_draws = check_draws(iw_draws, "se3-acf")
        self.projection, self.frame = projection, frame
        self.symmetries = ("rotation", "permutation", "translation") + (
            ("reflection",) if frame == "gram-schmidt" else ())
        #: Target conditional π(a | x) and the base conditional of z_a given z_x.
        self.aux = GaussianAuxiliary(aux_scale)
        self.base_aux = GaussianAuxiliary(base_aux_scale)
        kwargs = dict(hidden=hidden, egnn_layers=egnn_layers, head_hidden=tuple(head_hidden), bins=bins, bound=bound,
                      transform=transform, frame=frame, init_scale=init_scale, dtype=dtype)
        #: ``blocks`` pairs ``[x given a, a given x]`` in sampling order.
        self.blocks = nn.ModuleList(
            nn.ModuleList([FrameCoupling(system.n_dims, **kwargs), FrameCoupling(system.n_dims, **kwargs)])
            for _ in range(blocks))
        #: Weight of the authors' frame barrier in the training loss (0: off).
        self.frame_penalty = float(frame_penalty)
        for coupling in self._couplings():
            coupling.track_barrier = self.frame_penalty > 0.0

    def _couplings(self) -> list[FrameCoupling]:
        return [coupling for pair in self.blocks for coupling in pair]

    def training_penalty(self) -> torch.Tensor | None:
        """``frame_penalty`` x the mean :func:`~eqbench.flows.frames.frame_barrier` over the couplings
        of the last training-mode pass (the authors' LJ-13 auxiliary loss, weight 10), then forgotten;
        ``None`` when the setting is 0 or no pass has run since. A training loss term only: the
        densities stay exact."""
        barriers = [c.last_barrier for c in self._couplings() if c.last_barrier is not None]
        for coupling in self._couplings():
            coupling.last_barrier = None
        if self.frame_penalty <= 0.0 or not barriers:
            return None
        return self.frame_penalty * torch.stack(barriers).mean()

    # ------------------------------------------------------------------ joint bijection
    def _split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if h.shape[-2] != 2 * self.n_particles:
            raise ValueError(f"se3-acf acts on joint states [B, 2N, D] = [B, {2 * self.n_particles}, {self.n_dims}] "
                             f"(x rows first, then a); got {tuple(h.shape)}")
        return h[:, :self.n_particles], h[:, self.n_particles:]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint base state ``[B, 2N, D]`` (x rows CoM-free) → ``(joint sample, log|det|)`` on ``U × R^{N·D}``."""
        x, a = self._split(z)
        logdet = z.new_zeros(z.shape[0])
        for x_given_a, a_given_x in self.blocks:
            x, ld_x = x_given_a(x, a)
            com = x.mean(dim=1, keepdim=True)
            x, a = x - com, a - com
            a, ld_a = a_given_x(a, x)
            logdet = logdet + ld_x + ld_a
        return torch.cat((x, a), dim=1), logdet

    def inverse(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint state ``[B, 2N, D]`` → ``(base state, log|det|)``; first shifts x and a by x's CoM."""
        x, a = self._split(h)
        com = x.mean(dim=1, keepdim=True)
        x, a = x - com, a - com
        logdet = h.new_zeros(h.shape[0])
        for x_given_a, a_given_x in reversed(self.blocks):
            a, ld_a = a_given_x.inverse(a, x)
            x, ld_x = x_given_a.inverse(x, a)
            com = x.mean(dim=1, keepdim=True)
            x, a = x - com, a - com
            logdet = logdet + ld_x + ld_a
        return torch.cat((x, a), dim=1), logdet

    # ------------------------------------------------------------------ densities
    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log N_U(z_x; 0, I) + log N(z_a; z_x, σ_b² I)`` of joint base states ``[B, 2N, D]``."""
        zx, za = self._split(z)
        return self.prior.log_prob(zx) + self.base_aux.log_prob(za, zx)

    def log_prob_joint(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Exact ``log q(x, a)`` [B]; invariant under a joint translation of ``x`` and ``a``."""
        z, logdet = self.inverse(torch.cat((x, a), dim=1))
        return self.base_log_prob(z) + logdet

    def sample_joint(self, n: int, *, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, a, log q(x, a))`` for ``n`` draws; x CoM-free."""
        ref = self._reference_tensor()
        zx = self.prior.sample(n, generator=generator, dtype=ref.dtype, device=ref.device)
        za = self.base_aux.sample(zx, 1, generator=generator)[0]
        z = torch.cat((zx, za), dim=1)
        h, logdet = self.forward(z)
        x, a = self._split(h)
        return x, a, self.base_log_prob(z) - logdet

    def aux_log_prob(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log π(a | x) = log N(a; x, σ² I_{N·D})``."""
        return self.aux.log_prob(a, x)

    def sample_aux(self, x: torch.Tensor, k: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` draws ``a ~ N(x, σ² I)`` per configuration, ``[k, B, N, D]``."""
        return self.aux.sample(x, k, generator=generator)


def _check_system(system: ParticleSystem) -> None:
    if system.n_dims not in (2, 3):
        raise ConfigError(f"se3-acf builds frames in 2 or 3 dimensions (valid: 2, 3); system {system.name} "
                          f"has {system.n_dims}")


def _scalar_ok(value: Any) -> bool:
    return number(above=0.0).check(value)


#: The settings of ``se3-acf`` (:mod:`eqbench.flows.settings`); defaults in :data:`DEFAULTS`.
SETTINGS = {
    "blocks": integer(1),
    "hidden": integer(1),
    "egnn_layers": integer(1),
    "head_hidden": widths(),
    "bins": integer(2),
    "bound": number(above=0.0),
    "transform": choice(*TRANSFORMS),
    "projection": choice(*PROJECTIONS),
    "frame": choice(*FRAMES),
    "aux_scale": Setting(_scalar_ok, "positive (a finite number > 0)"),
    "base_aux_scale": Setting(_scalar_ok, "positive (a finite number > 0)"),
    "iw_draws": integer(1),
    "init_scale": number(above=0.0),
    "frame_penalty": number(at_least=0.0),
    "dtype": dtype_setting(),
}


def validate(system: ParticleSystem, config: Mapping[str, Any]) -> None:
    """Check ``se3-acf`` settings (and that the system is 2-D or 3-D) without building anything."""
    check_settings(config, "se3-acf", SETTINGS)
    _check_system(system)


@model_builder(capabilities=["trainable", "equivariant", "augmented"], validate=validate,
               description="SE(3) equivariant augmented coupling flow (Midgley et al. 2023), Cartesian projection; "
                           "marginal log q is an IW estimate")
def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> AugmentedCouplingFlow:
    """Registry builder for ``se3-acf``: any 2-D or 3-D system, settings :data:`DEFAULTS` unless set.

    Settings: ``blocks`` (12 pairs of couplings), ``hidden`` (EGNN width, 64), ``egnn_layers`` (3),
    ``head_hidden`` ([64, 64]), ``bins`` (8), ``bound`` (10), ``transform`` (spline | affine),
    ``projection`` (cartesian), ``frame`` (right-handed | gram-schmidt), ``aux_scale`` and
    ``base_aux_scale`` (0.1), ``iw_draws`` (K = 20), ``init_scale`` (0.01), ``frame_penalty`` (0: off;
    the authors' LJ-13 loss uses 10; it acts only where a frame has two vectors to keep apart, so
    in 3-D, or in 2-D with ``frame="gram-schmidt"``: a 2-D right-handed frame has one), ``dtype``.

    Example:
        >>> import eqbench
        >>> system = eqbench.get_system("dw4")
        >>> flow = build(system, {"blocks": 2, "hidden": 16})
        >>> x, log_w_q = flow.sample(5)           # x CoM-free; log q(x, a) - log π(a | x)
        >>> tuple(x.shape), flow.density_estimate
        ((5, 4, 2), 'IW estimate K=20')
        >>> bool(torch.isfinite(flow.log_prob(x)).all())
        True
    """
    config = dict(config or {})
    validate(system, config)
    settings = {**DEFAULTS, **config}
    return AugmentedCouplingFlow(
        system,
        blocks=settings["blocks"],
        hidden=settings["hidden"],
        egnn_layers=settings["egnn_layers"],
        head_hidden=parse_hidden(settings["head_hidden"], "se3-acf"),
        bins=settings["bins"],
        bound=float(settings["bound"]),
        transform=settings["transform"],
        projection=settings["projection"],
        frame=settings["frame"],
        aux_scale=float(settings["aux_scale"]),
        base_aux_scale=float(settings["base_aux_scale"]),
        iw_draws=check_draws(settings["iw_draws"], "se3-acf"),
        init_scale=float(settings["init_scale"]),
        frame_penalty=float(settings["frame_penalty"]),
        dtype=parse_dtype(settings["dtype"], "se3-acf"),
    )
