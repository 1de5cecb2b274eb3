"""Real NVP: the non-equivariant affine coupling baseline with a Gaussian CoM (paper B.2, C.5).

**Architecture.** Affine coupling blocks (Dinh et al. 2016) on the *full* flattened coordinates
``x ∈ R^{N·D}`` (particle-major: x₁, y₁, x₂, ...). With ``n = N·D`` and ``m = ⌊n/2⌋``, block k
conditions on m coordinates and transforms the other ``n - m``:

- even k: condition on the first m coordinates, transform the last ``n - m``;
- odd k:  condition on the last m coordinates, transform the first ``n - m``;

    y_T = x_T · exp(s(x_C)) + t(x_C),    y_C = x_C,    log|det| = Σ s(x_C).

The scale net ``s`` and translation net ``t`` are separate MLPs ``[m, 64, 64, n - m]`` (C.5):
``t`` with ReLU hidden activations, ``s`` with tanh hidden activations and a linear output that
is softly bounded, ``s ← B·tanh(s/B)`` with ``B = log_scale_bound`` (default 10; ``None``/0
switches it off). The bound changes nothing for ``|s| ≲ 3`` and only keeps ``exp(s)`` finite if
training runs away; it has no parameters. Blocks: 8 for DW-4, 16 for LJ-13 (C.5; rule below).
DW-4 splits 4/4; LJ-13 (39 coordinates) splits 19/20 in even and 20/19 in odd blocks, so both
halves alternate and flat coordinate 19 (the y component of particle index 6) is transformed by
every block. The last layer of each net starts at ``init_scale`` (0.01) times PyTorch's default and
zero bias: the flow starts near the identity while every parameter receives a gradient.

**Parameter counts vs the paper (C.5).** An MLP ``[a, h₁, h₂, b]`` has
``(a+1)h₁ + (h₁+1)h₂ + (h₂+1)b`` parameters.

- DW-4, the stated layout ``[4, 64, 64, 4]``: ``320 + 4,160 + 260 = 4,740`` per net, 2 nets per
  block, 8 blocks: ``16 · 4,740 = 75,840``. The paper states 21,576, which no 16 identical
  ``[4, h, h, 4]`` nets can give (21,576 / 16 = 1,348.5 is not an integer); hidden width 32
  gives ``160 + 1,056 + 132 = 1,348`` per net, ``16 · 1,348 = 21,568`` = paper − 8 (8 = N·D, as
  if a per-coordinate scale had been added, which C.5 does not describe). The paper's DW-4
  number therefore does not match its stated widths; eqbench implements the stated widths
  (75,840). ``build(system, {"hidden": [32, 32]})`` gives the 21,568 variant.
- LJ-13, ``[19/20, 64, 64, 20/19]``: a net conditioning on ``a`` and transforming ``b = 39 - a``
  coordinates has ``64(a+1) + 4,160 + 65 b = 6,720 + b`` parameters. eqbench transforms 20
  coordinates in every block (b = 20 for all 32 nets): ``32 · 6,740 = 215,680``, exactly the
  paper's number. Alternating b between 20 and 19 instead (transforming 19 coordinates in every
  other block) would give ``16 · 6,740 + 16 · 6,739 = 215,664``.

The tests recompute these numbers and compare them with the built models.

**CoM treatment (paper B.2).** Coupling layers do not conserve the CoM, so the flow models a
density ``q_full`` on all of ``R^{N·D}`` with the full standard normal prior ``N(0, I_{N·D})``,
and the CoM-free data ``x ∈ U`` get a Gaussian CoM ``c ~ N(0, I_D/N)`` added — the law of the
CoM of the full normal prior. Split ``x̃ = x + c`` orthogonally into ``x ∈ U`` and the
orthonormal CoM coordinate ``w = √N c ∈ R^D`` (the coordinate along the unit vectors
``(1/√N) 1 ⊗ e_d``; ``|x̃|² = |x|² + |w|²``). The extended target is ``p(x) · N(w; 0, I_D)``,
and the density the flow assigns to the CoM-free configuration is

    log q(x) := log q_full(x + c) - log N(√N c; 0, I_D)
              = log q_full(x + c) - log N(c; 0, I_D/N) + (D/2) log N,

which is :meth:`RealNVP.log_prob_augmented` (the CoM term is :meth:`RealNVP.com_log_prob`).
The paper's sentence "running an equivariant flow on the CoM-free system and then adding the
energy of the CoM perturbation yields the NLL of the rNVP flow on the perturbed system" fixes
the exponent ``N|c|²/2``; the constant must be that of the density of ``w``, not of ``c``: the
Lebesgue measure of ``R^{N·D}`` factorises as (measure on U) × ``dw`` and ``dw = N^{D/2} dc``.
Subtracting ``log N(c; 0, I_D/N)`` instead would lower every reported log-density by
``(D/2) log N`` (1.386 nats on DW-4, 3.847 on LJ-13) and make the NLL incomparable with the
CoM-free flows. Check: a flow that is the identity gives exactly the CoM-free normal density of
:mod:`eqbench.flows.prior` (a test asserts it).

- The density real NVP assigns to a CoM-free ``x`` is the marginal of ``q_full`` on U,
  ``q_U(x) = ∫ q_full(x + c) dw = E_{c ~ N(0, I_D/N)}[q_full(x + c) / N(√N c; 0, I_D)]``, an
  integral over the D CoM coordinates with no closed form. :meth:`RealNVP.log_prob` estimates
  it by importance sampling with the CoM prior as proposal, K = ``iw_draws`` draws per row:

      log q_U(x) ≈ logsumexp_k [log q_full(x + c_k) - log N(√N c_k; 0, I_D)] - log K,
                   c_k ~ N(0, I_D/N),

  (Burda et al. 2016). It is **stochastic** (pass ``generator`` to fix the draws) and biased
  low in expectation (Jensen), by an amount that shrinks monotonically with K and vanishes as
  K → ∞; the default K = 64 is a model setting, reported with every NLL through
  :attr:`~eqbench.flows.base.Flow.density_estimate` ("IW estimate K=64"), and tasks record the
  gap to K = 1 beside it. K = 1 is the one-draw estimate ``log_prob_augmented(x + c)`` whose
  expectation is the Jensen lower bound; it is what training maximises
  (:meth:`RealNVP.training_log_prob`): maximum likelihood on the CoM-augmented data, as in B.2.
- :meth:`RealNVP.sample` draws ``z ~ N(0, I_{N·D})``, maps it to ``x̃``, and returns
  ``(remove_com(x̃), log q_full(x̃) - log N(w; 0, I_D))``, exactly ``log_prob_augmented(x̃)``
  (:meth:`RealNVP.sample_augmented` returns ``x̃`` itself). These are exact densities of the
  samples ``(x, w)`` on the extended space, so the log-weights ``-u(x) - log q`` (SPEC §1) are
  importance weights for the extended target ``p(x) N(w; 0, I_D)``, whose x-marginal is p (the
  energies are CoM-invariant): self-normalised reweighting of any function of x with them is
  consistent, exactly as for a CoM-free flow. They are **not** ``log q_U(x)``: ``sample``'s
  ``log q`` and ``log_prob`` of the same ``x`` differ by the CoM term (hence the contract test
  compares them only for CoM-free flows); for importance weights the extended density is the
  right one and needs no estimate.
- :meth:`RealNVP.forward` / :meth:`RealNVP.inverse` act on full coordinates ``[B, N, D]`` with
  exact log-determinants; ``com_augmented = True`` tells :func:`eqbench.testing.check_flow` so.

**Defaults by dimension** (:func:`default_blocks`, :func:`default_hidden`). The paper's 8 blocks
(DW-4, N·D = 8) and 16 blocks (LJ-13, N·D = 39) are a choice about the number of coordinates
the couplings must mix, not about the potential: eqbench uses 8 blocks up to N·D = 32 and 16
above, the same switch as the node's (:mod:`eqbench.flows.defaults`). Hidden widths ``[w, w]``
with ``w`` = 64 rounded up to a multiple of 64 not below the ``N·D - ⌊N·D/2⌋`` transformed
coordinates (each net's last hidden layer must span its output): [64, 64] for every paper
system and up to N·D = 128, e.g. LJ-55 (N·D = 165, 83 outputs) gets [128, 128].

Config keys (``build``): ``blocks`` (default :func:`default_blocks`), ``hidden`` (default
:func:`default_hidden`), ``log_scale_bound`` (default 10; 0 or "none" for none), ``init_scale``
(0.01), ``iw_draws`` (K of :meth:`RealNVP.log_prob`, default 64), ``dtype`` ("float32" default,
"float64").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from eqbench.capabilities import model_builder
from eqbench.flows.augmented import check_draws
from eqbench.flows.base import Flow
from eqbench.flows.prior import StandardNormal
from eqbench.flows.cnf import parse_dtype
from eqbench.flows.defaults import is_large, paper_width
from eqbench.flows.node import parse_hidden
from eqbench.flows.settings import Setting, check_settings, dtype_setting, integer, number, widths
from eqbench.geometry import remove_com
from eqbench.systems.base import ParticleSystem

__all__ = ["DEFAULT_IW_DRAWS", "SETTINGS", "AffineCoupling", "RealNVP", "build", "default_blocks", "default_hidden",
           "validate"]

#: Coupling blocks of the paper's DW-4 and LJ-13 architectures (C.5).
_SMALL_BLOCKS, _LARGE_BLOCKS = 8, 16
#: Default K of the importance-weighted CoM marginal (:meth:`RealNVP.log_prob`).
DEFAULT_IW_DRAWS = 64
#: Rows per pass of the coupling stack when evaluating K draws (bounds the memory of large K).
_ROWS_PER_PASS = 1 << 16


def default_blocks(system: ParticleSystem) -> int:
    """Coupling blocks by dimension (module docstring; paper C.5): 8 for N·D <= 32 (DW-4's), 16
    above (LJ-13's)."""
    return _LARGE_BLOCKS if is_large(system) else _SMALL_BLOCKS


def default_hidden(system: ParticleSystem) -> tuple[int, int]:
    """Hidden widths of every scale and translation net (paper C.5: [64, 64]), widened to a
    multiple of 64 not below the ``N·D - ⌊N·D/2⌋`` coordinates a block transforms."""
    width = paper_width(system.dim - system.dim // 2)
    return (width, width)


def _mlp(n_in: int, hidden: Sequence[int], n_out: int, activation: type[nn.Module], dtype: torch.dtype,
         init_scale: float) -> nn.Sequential:
    widths = (n_in, *hidden, n_out)
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b, dtype=dtype))
        if k < len(widths) - 2:
            layers.append(activation())
    with torch.no_grad():
        layers[-1].weight.mul_(init_scale)
        layers[-1].bias.zero_()
    return nn.Sequential(*layers)


class AffineCoupling(nn.Module):
    """One block on flat vectors of length ``dim``: ``y_T = x_T exp(s(x_C)) + t(x_C)``.

    ``condition_first``: condition on the first ``dim // 2`` coordinates and transform the rest;
    otherwise condition on the last ``dim // 2`` and transform the first ``dim - dim // 2``.
    """

    def __init__(self, dim: int, condition_first: bool, hidden: Sequence[int], *,
                 log_scale_bound: float | None = 10.0, init_scale: float = 0.01,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dim = dim
        self.n_cond = dim // 2
        self.n_trans = dim - self.n_cond
        self.condition_first = condition_first
        self.log_scale_bound = log_scale_bound
        self.scale_net = _mlp(self.n_cond, hidden, self.n_trans, nn.Tanh, dtype, init_scale)
        self.translation_net = _mlp(self.n_cond, hidden, self.n_trans, nn.ReLU, dtype, init_scale)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.condition_first:
            return x[:, :self.n_cond], x[:, self.n_cond:]
        return x[:, self.n_trans:], x[:, :self.n_trans]

    def _join(self, cond: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        return torch.cat((cond, trans) if self.condition_first else (trans, cond), dim=1)

    def _scale_shift(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale_net(cond)
        if self.log_scale_bound:
            s = self.log_scale_bound * torch.tanh(s / self.log_scale_bound)
        return s, self.translation_net(cond)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, trans = self._split(x)
        s, t = self._scale_shift(cond)
        return self._join(cond, trans * torch.exp(s) + t), s.sum(dim=1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, trans = self._split(y)
        s, t = self._scale_shift(cond)
        return self._join(cond, (trans - t) * torch.exp(-s)), -s.sum(dim=1)


class RealNVP(Flow):
    """Affine coupling flow on full coordinates with a Gaussian CoM; see the module docstring."""

    symmetries = ()
    #: The flow works on CoM-augmented coordinates (paper B.2); read by eqbench.testing.
    com_augmented = True

    def __init__(
        self,
        system: ParticleSystem,
        blocks: int = 8,
        hidden: Sequence[int] = (64, 64),
        *,
        log_scale_bound: float | None = 10.0,
        init_scale: float = 0.01,
        iw_draws: int = DEFAULT_IW_DRAWS,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(system)
        #: K, the CoM draws per configuration of :meth:`log_prob` (see the module docstring).
        self.iw_draws = check_draws(iw_draws, "real-nvp")
        self.prior = StandardNormal(system.n_particles, system.n_dims)
        self.dim = system.n_particles * system.n_dims
        self.hidden = tuple(int(h) for h in hidden)
        self.blocks = nn.ModuleList(
            AffineCoupling(self.dim, k % 2 == 0, self.hidden, log_scale_bound=log_scale_bound,
                           init_scale=init_scale, dtype=dtype)
            for k in range(blocks)
        )

    # ------------------------------------------------------------------ bijection on R^{N·D}
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full coordinates ``[B, N, D]`` → ``(x̃, log|det ∂x̃/∂z|)``."""
        h = z.reshape(z.shape[0], -1)
        logdet = h.new_zeros(h.shape[0])
        for block in self.blocks:
            h, ld = block(h)
            logdet = logdet + ld
        return h.reshape(z.shape), logdet

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full coordinates ``[B, N, D]`` → ``(z, log|det ∂z/∂x̃|)``."""
        h = x.reshape(x.shape[0], -1)
        logdet = h.new_zeros(h.shape[0])
        for block in reversed(self.blocks):
            h, ld = block.inverse(h)
            logdet = logdet + ld
        return h.reshape(x.shape), logdet

    # ------------------------------------------------------------------ densities
    def com_log_prob(self, com: torch.Tensor) -> torch.Tensor:
        """``log N(√N c; 0, I_D)`` of CoM vectors ``c`` ``[B, D]``: density of the orthonormal CoM coordinate."""
        return -0.5 * self.n_particles * com.pow(2).sum(-1) - 0.5 * self.n_dims * math.log(2.0 * math.pi)

    def log_prob_full(self, x_full: torch.Tensor) -> torch.Tensor:
        """``log q_full(x̃)`` on all of ``R^{N·D}``."""
        z, logdet = self.inverse(x_full)
        return self.prior.log_prob(z) + logdet

    def log_prob_augmented(self, x_full: torch.Tensor) -> torch.Tensor:
        """Deterministic ``log q_full(x̃) - log N(√N c̃; 0, I_D)``, ``c̃`` the particle mean of ``x̃``."""
        return self.log_prob_full(x_full) - self.com_log_prob(x_full.mean(dim=-2))

    def log_prob(self, x: torch.Tensor, *, iw_draws: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance-weighted estimate of the CoM-free marginal ``log q_U(x)`` (paper B.2).

        ``logsumexp_k log_prob_augmented(x + c_k) - log K`` with ``c_k ~ N(0, I_D/N)``, K =
        ``iw_draws`` (default :attr:`iw_draws`). ``x`` is projected onto U first. Stochastic and
        biased low by a gap that shrinks with K; ``iw_draws=1`` is the one-draw Jensen bound that
        training maximises. Fix ``generator`` for reproducible values: the draws are taken as one
        ``[K, B, 1, D]`` block, so K = 1 with a given generator state matches the old one-draw value.
        The K draws are evaluated as batched rows of the coupling stack.
        """
        k = self.iw_draws if iw_draws is None else check_draws(iw_draws, "real-nvp")
        x = remove_com(x)
        batch = x.shape[0]
        c = torch.randn(k, batch, 1, self.n_dims, generator=generator, dtype=x.dtype,
                        device=x.device if generator is None else generator.device)
        shifted = (x.unsqueeze(0) + c.to(x.device) / math.sqrt(self.n_particles)).reshape(k * batch, *x.shape[1:])
        log_w = torch.cat([self.log_prob_augmented(chunk)
                           for chunk in shifted.split(_ROWS_PER_PASS)])
        return torch.logsumexp(log_w.reshape(k, batch), dim=0) - math.log(k)

    @property
    def training_estimator(self) -> dict[str, Any]:
        """``{"iw_draws": 1}``: training maximises the one-draw CoM-augmented likelihood (B.2)."""
        return {"iw_draws": 1}

    # ------------------------------------------------------------------ sampling
    def sample_augmented(self, n: int, *, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` full-space samples ``x̃`` (with their CoM) and ``log_prob_augmented(x̃)``."""
        ref = self._reference_tensor()
        z = self.prior.sample(n, generator=generator, dtype=ref.dtype,
                              device=ref.device if generator is None else generator.device).to(ref.device)
        x_full, logdet = self.forward(z)
        log_q = self.prior.log_prob(z) - logdet - self.com_log_prob(x_full.mean(dim=-2))
        return x_full, log_q

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CoM-free samples and their *exact* extended-space log-densities ``log_prob_augmented(x̃)``.

        Exact, not estimated: valid importance weights ``-u(x) - log q`` for the extended target
        ``p(x) N(w; 0, I_D)`` (see the module docstring); not equal to :meth:`log_prob` of ``x``.
        """
        x_full, log_q = self.sample_augmented(n, generator=generator)
        return remove_com(x_full), log_q


def _bound_ok(value: Any) -> bool:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return True
    return number(at_least=0.0).check(value)


#: The settings of ``real-nvp`` (:mod:`eqbench.flows.settings`).
SETTINGS = {
    "blocks": integer(1),
    "hidden": widths(),
    "log_scale_bound": Setting(_bound_ok, "a finite number >= 0 (0 = no bound) or 'none'"),
    "init_scale": number(above=0.0),
    "iw_draws": integer(1),
    "dtype": dtype_setting(),
}


def validate(system: ParticleSystem, config: Mapping[str, Any]) -> None:
    """Check ``real-nvp`` settings without building anything (planning calls this)."""
    check_settings(config, "real-nvp", SETTINGS)


@model_builder(capabilities=["trainable"], validate=validate)
def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> RealNVP:
    """Registry builder for ``real-nvp`` (paper B.2, C.5): any system, blocks and hidden widths by
    its dimension (:func:`default_blocks`, :func:`default_hidden`) unless set."""
    validate(system, config or {})
    config = dict(config or {})
    blocks = config.pop("blocks", default_blocks(system))
    hidden = parse_hidden(config.pop("hidden", list(default_hidden(system))), "real-nvp")
    bound = config.pop("log_scale_bound", 10.0)
    bound = None if bound is None or isinstance(bound, str) else (float(bound) or None)
    init_scale = float(config.pop("init_scale", 0.01))
    iw_draws = check_draws(config.pop("iw_draws", DEFAULT_IW_DRAWS), "real-nvp")
    dtype = parse_dtype(config.pop("dtype", "float32"), "real-nvp")
    return RealNVP(system, blocks, hidden, log_scale_bound=bound, init_scale=init_scale, iw_draws=iw_draws,
                   dtype=dtype)
