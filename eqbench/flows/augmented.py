"""Flows on an augmented space: a model of ``(x, a)`` whose x-marginal is the benchmark's density.

Why a base class: an augmented flow (Huang, Dinh & Courville 2020, "Augmented normalizing flows";
Midgley et al. NeurIPS 2023, SE(3) equivariant augmented coupling flows, seed 003) is exact on the
*joint* space of configurations ``x`` and auxiliary variables ``a`` but not on x alone. The
benchmark scores ``log q(x)``, so eqbench needs one convention for what such a model returns
(DESIGN "Augmented flows": the exact joint density is the contract; the marginal is an estimate
whose K is recorded). It matches real NVP's CoM-augmented convention
(:mod:`eqbench.flows.real_nvp`, paper B.2), so tasks and metrics treat both alike.

**The interface** (every method a subclass implements is exact):

- ``sample_joint(n) -> (x, a, log q(x, a))``; ``log_prob_joint(x, a) -> log q(x, a)``;
- ``aux_log_prob(a, x) -> log π(a | x)``, the *target* conditional of the auxiliary variable
  (the model is trained so that ``q(x, a) ≈ p(x) π(a | x)``);
- ``sample_aux(x, k) -> a`` of shape ``[k, B, N, D]``, ``a ~ π(· | x)``;
- ``forward(z)`` / ``inverse(h)`` on joint states ``[B, 2N, D]`` (rows ``0..N-1`` are x, rows
  ``N..2N-1`` are a, particle i's auxiliary variable in row ``N + i``) with exact log-determinants
  on the joint space spanned by :meth:`AugmentedFlow.joint_basis` (default ``U × R^{N·D}``: x
  CoM-free, a unconstrained; a model with another CoM treatment overrides it). The contract
  (:func:`eqbench.testing.check_flow`) relies on this layout and basis.

**What this class derives from them** (no subclass needs to override these):

- :meth:`AugmentedFlow.log_prob` is the importance-weighted marginal estimate (Burda, Grosse &
  Salakhutdinov 2016, "Importance weighted autoencoders", eq. 8; the estimator of the SE(3)
  augmented coupling flow paper's marginal likelihood with K = 20):

      log q̂_K(x) = logsumexp_k [log q(x, a_k) - log π(a_k | x)] - log K,   a_k ~ π(· | x).

  Its expectation is a lower bound on ``log q(x)`` that increases monotonically with K and tends
  to ``log q(x)`` as K → ∞ (Burda et al. 2016, Theorem 1). It is stochastic: pass ``generator``
  for fixed draws. ``iw_draws`` (K, default :data:`DEFAULT_IW_DRAWS` = 20) is a model setting, and
  :attr:`~eqbench.flows.base.Flow.density_estimate` says "IW estimate K=20".
- :attr:`AugmentedFlow.training_estimator` is ``{"iw_draws": 1}``: training maximises
  ``log q(x, a) - log π(a | x)`` with one ``a ~ π(· | x)`` per configuration, i.e. maximum
  likelihood of the joint on ``(x, a)`` (the authors' objective, ``eacf/train/
  max_lik_train_and_eval.py:68-73``; the ``- log π`` term has no parameters and only makes the
  number a lower bound on ``log q(x)`` rather than a joint density).
- :meth:`AugmentedFlow.sample` returns ``(x, log q(x, a) - log π(a | x))`` for ``(x, a) ~ q``:
  the exact log-density of the sample on the extended space relative to the extended target
  ``p(x) π(a | x)``, whose x-marginal is p. Hence ``-u(x) - log q`` are valid importance
  weights (SPEC §1) for self-normalised reweighting of any function of x (the authors' reverse
  ESS "on the joint space"), and reverse-KL training through
  :meth:`~eqbench.flows.base.Flow.training_sample` minimises ``KL(q(x, a) || p(x) π(a | x))``,
  which bounds ``KL(q(x) || p(x))`` from above. It is **not** ``log_prob(x)`` of the same x.

:func:`eqbench.testing.check_flow` checks a flow with ``augmented = True`` on these terms
(joint density, joint round trip and log-determinant, equivariance of the joint map, and that
the marginal estimate converges as K grows).

The Gaussian conditional :class:`GaussianAuxiliary` (``π(a | x) = N(a; x, σ² I)``) is what the
SE(3) augmented coupling flow uses (``eacf/flow/conditional_dist.py``); subclasses may use it.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch

from eqbench.errors import ConfigError
from eqbench.flows.base import Flow
from eqbench.geometry import com_free_basis, remove_com

__all__ = ["DEFAULT_IW_DRAWS", "AugmentedFlow", "GaussianAuxiliary", "check_draws"]

#: Default K of the importance-weighted marginal (the authors' ``K_marginal_log_lik: 20``,
#: ``examples/config/training/default.yaml:5``).
DEFAULT_IW_DRAWS = 20
#: Rows (configuration × draw) per pass when evaluating K draws. Small passes bound the memory
#: of large K and keep each intermediate tensor of an EGNN conditioner (rows × N² × width) small
#: enough for the allocator to reuse freed memory: passes of tens of megabytes per tensor are
#: mapped fresh and page-faulted on every pass, which on LJ-13 made K = 20 scoring spend as much
#: time in the kernel as in arithmetic. The estimate does not depend on the pass size (tested).
_ROWS_PER_PASS = 512


def check_draws(k: object, model: str = "augmented flow") -> int:
    """``k`` if it is a positive integer, else a one-line ConfigError."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{model} iw_draws must be a positive integer; got {k!r}")
    return k


class GaussianAuxiliary:
    """``π(a | x) = N(a; x, σ² I)`` on all ``N·D`` coordinates of ``a`` (one auxiliary particle
    per particle, centred on it; the authors' ``ConditionalGaussian`` with ``conditioned=True``).

    ``a`` is not CoM-free: its CoM is a free Gaussian variable around x's (zero) CoM, so the
    normaliser runs over all ``N·D`` coordinates. The density is invariant under a simultaneous
    translation, rotation, reflection or permutation of ``x`` and ``a``.
    """

    def __init__(self, scale: float):
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise ConfigError(f"the auxiliary scale must be a finite number > 0; got {scale!r}")
        self.scale = float(scale)

    def log_prob(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log N(a; x, σ² I)`` summed over particles and dimensions: shape ``a.shape[:-2]``."""
        n_coords = a.shape[-1] * a.shape[-2]
        r2 = (a - x).pow(2).sum(dim=(-2, -1)) / self.scale ** 2
        return -0.5 * r2 - n_coords * (math.log(self.scale) + 0.5 * math.log(2.0 * math.pi))

    def sample(self, x: torch.Tensor, k: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` draws per configuration: ``[k, *x.shape]``. Drawn where ``generator`` lives (a
        seeded CPU generator stays reproducible on CUDA runs), then moved to ``x``'s device."""
        source = generator.device if generator is not None else x.device
        eps = torch.randn(k, *x.shape, generator=generator, dtype=x.dtype, device=source)
        return x.unsqueeze(0) + self.scale * eps.to(x.device)


class AugmentedFlow(Flow):
    """Base class of flows on ``(x, a)``: subclasses implement the exact joint methods; the
    marginal estimate, the training objective and ``sample`` follow (module docstring)."""

    #: Read by :func:`eqbench.testing.check_flow`: check the joint contract, not the marginal one.
    augmented = True
    #: K of :meth:`log_prob` (an instance attribute set by subclasses from their settings).
    iw_draws: int = DEFAULT_IW_DRAWS

    # ------------------------------------------------------------------ what subclasses provide
    @abstractmethod
    def sample_joint(self, n: int, *, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` joint samples: ``(x [n, N, D] CoM-free, a [n, N, D], log q(x, a) [n])``, exact."""

    @abstractmethod
    def log_prob_joint(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Exact ``log q(x, a)`` [B] (nats, including every normalising constant)."""

    @abstractmethod
    def aux_log_prob(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log π(a | x)`` of the target conditional; broadcasts over leading dimensions."""

    @abstractmethod
    def sample_aux(self, x: torch.Tensor, k: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` draws ``a ~ π(· | x)`` per configuration: ``[k, B, N, D]``."""

    def joint_basis(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Orthonormal basis ``[2N·D, dof]`` of the joint space on which :meth:`forward` and
        :meth:`inverse` are bijections and their log-determinants are taken: ``B_U ⊕ I`` (x in the
        CoM-free subspace U, a unconstrained; ``dof = (2N - 1) D``). Override for another CoM
        treatment (e.g. a CoM-free a: ``B_U ⊕ B_U``); the contract's brute-force Jacobian uses it."""
        return torch.block_diag(com_free_basis(self.n_particles, self.n_dims, dtype),
                                torch.eye(self.n_particles * self.n_dims, dtype=dtype))

    # ------------------------------------------------------------------ derived
    def log_prob(self, x: torch.Tensor, *, iw_draws: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance-weighted estimate of the marginal ``log q(x)`` with K draws (module docstring).

        ``x`` is projected onto the CoM-free subspace first. The K draws are evaluated as batched
        rows of :meth:`log_prob_joint`. Stochastic; biased low by a gap that shrinks with K.
        """
        k = self.iw_draws if iw_draws is None else check_draws(iw_draws)
        x = remove_com(x)
        batch = x.shape[0]
        a = self.sample_aux(x, k, generator=generator)
        xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * batch, *x.shape[1:])
        a = a.reshape(k * batch, *x.shape[1:])
        log_w = torch.cat([self.log_prob_joint(xc, ac) - self.aux_log_prob(ac, xc)
                           for xc, ac in zip(xs.split(_ROWS_PER_PASS), a.split(_ROWS_PER_PASS), strict=True)])
        return torch.logsumexp(log_w.reshape(k, batch), dim=0) - math.log(k)

    @property
    def training_estimator(self) -> dict[str, Any]:
        """``{"iw_draws": 1}``: joint maximum likelihood with one ``a ~ π(· | x)`` (module docstring)."""
        return {"iw_draws": 1}

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` and the exact extended-space ``log q(x, a) - log π(a | x)`` of the joint sample.

        Draws exactly what :meth:`sample_joint` draws with the same generator (the contract
        compares them). Valid importance weights for the extended target; not :meth:`log_prob`.
        """
        x, a, log_q = self.sample_joint(n, generator=generator)
        return x, log_q - self.aux_log_prob(a, x)
