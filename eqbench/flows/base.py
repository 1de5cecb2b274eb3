"""The Flow interface every model implements (DESIGN "Public Python API"; paper §2).

A flow maps prior samples ``z`` (CoM-free normal, :mod:`eqbench.flows.prior`) to configurations
``x``. ``forward(z) -> (x, logdet)`` with ``logdet = log|det ∂x/∂z|`` on U, and
``inverse(x) -> (z, logdet)`` with the log-determinant of the inverse map, so that
``log q(x) = log ρ(z) + logdet_inverse`` (SPEC §1 signs). Models state the symmetries they
claim; the contract tests in :mod:`eqbench.testing` hold them to it.

**What ``log_prob`` and ``sample`` return does not depend on ``flow.training``.** Both give the
model's density as the benchmark scores it (SPEC §1, §4: "models ... are *scored* with exact
divergence", paper §7.3) in training and in evaluation mode alike; a stochastic estimator is
used only where a caller names it (``divergence="hutchinson"`` on a CNF). Training may use a
cheaper estimator (the CNFs without closed-form trace train with one Hutchinson probe, §7.3;
real NVP with one CoM draw, B.2): the loop in :mod:`eqbench.train` asks for it without knowing
the model through :meth:`Flow.training_log_prob` and :meth:`Flow.training_sample`.

Where ``log_prob`` cannot be exact — a model of an extended space whose marginal on U is an
integral, such as real NVP with its Gaussian CoM (paper B.2) — it is an importance-weighted
estimate with ``iw_draws`` = K draws, and :attr:`Flow.density_estimate` says so; every NLL a
task records carries that description in its unit (:func:`eqbench.tasks.common.nll_records`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from eqbench.flows.prior import CoMFreeNormal
from eqbench.systems.base import ParticleSystem

__all__ = ["Flow"]


class Flow(nn.Module, ABC):
    """Base class: subclasses implement :meth:`forward` and :meth:`inverse`."""

    #: Symmetries of the model density (a subset of ``eqbench.systems.SYMMETRIES``).
    symmetries: tuple[str, ...] = ()
    #: ``None``: :meth:`log_prob` is the exact density. An int K: :meth:`log_prob` is an
    #: importance-weighted estimate of a marginal density with K draws of an auxiliary variable
    #: per configuration, and accepts ``iw_draws=`` (another K) and ``generator=`` (fixed draws).
    iw_draws: int | None = None

    def __init__(self, system: ParticleSystem):
        super().__init__()
        self.n_particles = system.n_particles
        self.n_dims = system.n_dims
        self.system_name = system.name
        self.prior = CoMFreeNormal(system.n_particles, system.n_dims)

    @abstractmethod
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map prior samples to configurations: ``(x, log|det ∂x/∂z|)``."""

    @abstractmethod
    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map configurations to latents: ``(z, log|det ∂z/∂x|)``."""

    def _reference_tensor(self) -> torch.Tensor:
        for tensor in self.parameters():
            return tensor
        for tensor in self.buffers():
            return tensor
        return torch.empty(0)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log q(x)`` in nats per configuration, including the Gaussian constant."""
        z, logdet = self.inverse(x)
        return self.prior.log_prob(z) + logdet

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` configurations and their exact log-densities ``log q(x)``."""
        ref = self._reference_tensor()
        z = self.prior.sample(n, generator=generator, dtype=ref.dtype, device=ref.device)
        x, logdet = self.forward(z)
        return x, self.prior.log_prob(z) - logdet

    def sample_positions(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` configurations without their ``log q``: what :meth:`sample` draws with the same
        ``generator``, for callers that only look at the configurations (sample metrics, minima).

        The default is :meth:`sample`'s ``x``. Models whose density costs far more than their
        transform override it: a CNF without a closed-form divergence pays one backward pass per
        coordinate per solver step for ``log q`` (:meth:`eqbench.flows.cnf.CNF.sample_positions`
        integrates the velocity alone). The contract (:func:`eqbench.testing.check_flow`) holds an
        override to :meth:`sample`'s configurations.

        Example:
            >>> import torch, eqbench
            >>> flow = eqbench.build_model("kernel-flow", "dw4")
            >>> x = flow.sample_positions(3, generator=torch.Generator().manual_seed(0))
            >>> x_ref, _ = flow.sample(3, generator=torch.Generator().manual_seed(0))
            >>> bool(torch.allclose(x, x_ref))
            True
        """
        return self.sample(n, generator=generator)[0]

    # ------------------------------------------------------------------ what the numbers are
    @property
    def density_estimate(self) -> str | None:
        """``None`` when :meth:`log_prob` is exact; else what it estimates and with how many draws.

        The default follows :attr:`iw_draws`: ``"IW estimate K=64"`` for an importance-weighted
        estimate with 64 draws. Tasks put it in the unit of every NLL they record (SPEC §1:
        "every NLL record states whether its trace was exact or estimated").
        """
        return None if self.iw_draws is None else f"IW estimate K={self.iw_draws}"

    @property
    def training_estimator(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`log_prob` that select the estimator training uses.

        Empty for models trained on their exact density. :meth:`training_log_prob` passes them;
        a caller that wants the training objective of any model calls that method rather than
        reading this, which is here to be recorded and tested.
        """
        return {}

    def training_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log q(x)`` as training computes it: :meth:`log_prob` with :attr:`training_estimator`.

        Differs from :meth:`log_prob` only for models that train with a cheaper (stochastic)
        estimator; it is what :func:`eqbench.train.fit` maximises, never a score.
        """
        return self.log_prob(x, **self.training_estimator)

    def training_penalty(self) -> torch.Tensor | None:
        """An auxiliary term :func:`eqbench.train.fit` adds to the training loss after each pass,
        or ``None`` (the default: the loss is the λ-mix of NLL and reverse KL alone). A model
        setting switches it on (``se3-acf``'s ``frame_penalty``); it never enters a density."""
        return None

    def training_sample(self, n: int, *, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples and ``log q`` as training computes them (the reverse-KL term of the λ-mix, B.3).

        Default: :meth:`sample`; CNFs use their training divergence here too.
        """
        return self.sample(n, generator=generator)

    @property
    def n_parameters(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
