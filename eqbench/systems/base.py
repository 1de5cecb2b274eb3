"""The ParticleSystem abstraction: an invariant pair-potential energy on N particles in D dims.

A system knows its energy ``u(x)`` in units of kT (SPEC §1), its force ``-∇u``, the Laplacian
``Δu`` (for the configurational temperature check of SPEC §2), its symmetries (S1-S3 of paper
§5) and the recipe for its reference data (paper C.4, SPEC §3). It does not load data, plot or
log: those live in :mod:`eqbench.data` and the tasks.

A system also says *what it is*, so that models choose their default settings from that and
never from its name (DESIGN "Models declare what they are"): its :attr:`ParticleSystem.kind`
(one of :data:`SYSTEM_KINDS`) and its length scales, :attr:`ParticleSystem.length_scale` and
:attr:`ParticleSystem.pair_distance_range`, derived from the potential's parameters. The paper
places its distance kernels by the potential (C.1, C.2: equispaced over [0, 8] for the double
well with d0 = 4; for Lennard-Jones the authors' quadratic placement in units of rm = 1); a system with the same potential and
another particle count or parameter then gets the same placement, scaled with its lengths.

All derivatives are analytic (pair potentials make that cheap); tests check them against
autograd.
"""

from __future__ import annotations

import dataclasses
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from eqbench.errors import ConfigError
from eqbench.geometry import pair_vectors, remove_com

__all__ = ["DATA_SPLITS", "DataProtocol", "ParticleSystem", "SYMMETRIES", "SYSTEM_KINDS"]

#: The symmetry names a system or a model may claim (paper §5, S1-S3; reflections are part of O(D)).
SYMMETRIES = ("permutation", "rotation", "reflection", "translation")


#: The reference-data splits, each from its own disjoint chains and seed (SPEC §3).
DATA_SPLITS = ("train", "val", "test")

#: What a system may declare it is (:attr:`ParticleSystem.kind`). The paper's models have
#: settings for the double well and Lennard-Jones (paper C.1-C.5); ``harmonic`` is the
#: known-answer system; ``other`` is a system eqbench knows nothing about beyond its lengths,
#: for which models use their potential-agnostic defaults.
SYSTEM_KINDS = ("double-well", "lennard-jones", "harmonic", "other")


#: Most pairs :meth:`ParticleSystem.energy` evaluates in one block (about 25 LJ-55 configurations).
PAIR_BLOCK = 32_768


@dataclass(frozen=True)
class DataProtocol:
    """How the reference data of a system is generated (paper C.4, SPEC §3).

    ``burn_in`` and ``stride`` follow the slowest mode measured (energy or mean pair distance),
    not the energy alone: the burn-in is at least 20 integrated autocorrelation times of that
    mode, so the bias left from the starting distribution (which decays like
    ``exp(-burn_in / τ)``) is far below the standard error, and the stride is at least one τ.
    The data diagnostics measure both times and flag a protocol that falls short.

    The training pool and the test set each come from ``n_chains`` chains; the validation set
    (for model selection) is smaller and comes from ``n_val_chains`` chains with the same
    samples per chain, so its chains are as long (and as well decorrelated) as the others
    while costing a fifth. Every split has its own seed, hence disjoint chains.
    """

    step_size: float
    burn_in: int
    stride: int
    n_chains: int
    n_train: int = 10_000
    n_test: int = 10_000
    train_seed: int = 1
    test_seed: int = 2
    init_scale: float = 1.0
    n_val: int = 2_000
    n_val_chains: int = 100
    val_seed: int = 3

    def _check(self, split: str) -> None:
        if split not in DATA_SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(DATA_SPLITS)}")

    def size(self, split: str) -> int:
        """Number of stored configurations of ``split``."""
        self._check(split)
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def seed(self, split: str) -> int:
        """Seed of the generator that drives every chain of ``split``."""
        self._check(split)
        return {"train": self.train_seed, "val": self.val_seed, "test": self.test_seed}[split]

    def chains(self, split: str) -> int:
        """Number of independent chains of ``split`` (also its number of batch-means batches)."""
        self._check(split)
        return self.n_val_chains if split == "val" else self.n_chains


@dataclass(frozen=True)
class ParticleSystem(ABC):
    """N identical particles in D dimensions with a pair-potential energy.

    ``u(x) = pair_multiplicity * Σ_{i<j} f(d_ij) + u_ext(x)``; ``pair_multiplicity`` is 1 when the
    sum runs over unordered pairs and 2 for the ordered-pair convention (SPEC §2, LJ-13).

    A subclass declares :attr:`kind` (a class attribute, default ``"other"``) and implements
    :attr:`length_scale`; it may refine :attr:`pair_distance_range`. ``kind`` is a class
    attribute rather than a dataclass field on purpose: the reference data are keyed by a hash
    of the system's ``repr`` (:func:`eqbench.data.store.dataset_key`), which a new field would
    change, orphaning every cached data set.
    """

    #: What the potential is, one of :data:`SYSTEM_KINDS`; models choose their defaults by it.
    kind: ClassVar[str] = "other"

    name: str
    n_particles: int
    n_dims: int
    data_protocol: DataProtocol
    pair_multiplicity: float = 1.0
    symmetries: tuple[str, ...] = field(default=SYMMETRIES)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind not in SYSTEM_KINDS:
            raise ConfigError(f"system class {cls.__name__} declares kind {cls.kind!r}; valid: {', '.join(SYSTEM_KINDS)}")

    # ----------------------------------------------------------------- what the system is
    @property
    @abstractmethod
    def length_scale(self) -> float:
        """The characteristic pair distance of the potential, in its length unit.

        Derived from the potential's parameters (double well: ``d0``; Lennard-Jones: ``rm``;
        harmonic: the RMS pair distance). Models place their distance kernels in units of it,
        so doubling it doubles every kernel centre and bandwidth (paper C.1, C.2).
        """

    @property
    def pair_distance_range(self) -> tuple[float, float]:
        """``(lo, hi)``: the pair distances a model must resolve for this system.

        Default ``(0, 2 * length_scale)``: from coincident particles to twice the characteristic
        distance, which for the double well (``length_scale = d0 = 4``) is the paper's kernel
        range [0, 8] (C.1). Systems with a better statement of their typical pair distances
        override it.
        """
        return (0.0, 2.0 * self.length_scale)

    def with_particles(self, n_particles: int) -> ParticleSystem:
        """The same potential (same kind, parameters and lengths) with ``n_particles`` particles.

        Named for what it is: the name's last run of digits is replaced by the new count (``dw4``
        -> ``dw8``, ``lj13`` -> ``lj55``, ``lj13-single`` -> ``lj55-single``; a name without
        digits gets the count appended, ``harmonic`` -> ``harmonic8``), so that nothing can
        mistake it for the registered system; models take their defaults from its kind and
        lengths, not its name. The data protocol is kept as it is (it was measured for the
        original count only). ``self`` when the count is unchanged.
        """
        if isinstance(n_particles, bool) or not isinstance(n_particles, int) or n_particles < 2:
            raise ConfigError(f"{self.name}: the number of particles must be an integer >= 2, got {n_particles!r}")
        if n_particles == self.n_particles:
            return self
        head, digits, tail = re.fullmatch(r"(.*?)(\d*)(\D*)", self.name).groups()
        name = f"{head}{n_particles}{tail}" if digits else f"{self.name}{n_particles}"
        return dataclasses.replace(self, name=name, n_particles=n_particles)

    def describe_scales(self) -> str:
        """One line for :meth:`describe`: the kind and the lengths models take their defaults from."""
        lo, hi = self.pair_distance_range
        return (f"  Kind: {self.kind}; length scale {self.length_scale:.4g}; typical pair distances "
                f"[{lo:.4g}, {hi:.4g}] (model defaults follow these, not the name).")

    # ----------------------------------------------------------------- shape helpers
    @property
    def dim(self) -> int:
        """Number of Cartesian coordinates, ``N * D``."""
        return self.n_particles * self.n_dims

    @property
    def n_dof(self) -> int:
        """Dimension of the CoM-free subspace U, ``(N - 1) * D`` (paper A.3)."""
        return (self.n_particles - 1) * self.n_dims

    @property
    def event_shape(self) -> tuple[int, int]:
        return (self.n_particles, self.n_dims)

    def check_shape(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the expected shape when ``x`` does not end in ``[N, D]``."""
        if x.ndim < 2 or tuple(x.shape[-2:]) != self.event_shape:
            raise ValueError(
                f"{self.name} expects configurations of shape [..., {self.n_particles}, {self.n_dims}], "
                f"got {list(x.shape)}"
            )

    # ----------------------------------------------------------------- the potential
    @abstractmethod
    def pair_potential(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(f(d), f'(d), f''(d))`` of the pair potential for distances ``d``."""

    def pair_energy(self, d: torch.Tensor) -> torch.Tensor:
        """``f(d)`` alone, for :meth:`energy`. Override where ``f`` is much cheaper than the three
        derivatives together: Metropolis sampling evaluates nothing else."""
        return self.pair_potential(d)[0]

    def pair_energy_of_squared(self, d2: torch.Tensor) -> torch.Tensor:
        """``f`` at squared distances ``d2``, for :meth:`energy`. Override where ``f`` depends on
        ``d²`` alone (Lennard-Jones): the square root is the slowest elementwise step of an
        energy evaluation, and Metropolis sampling of LJ-55 spends most of its time there."""
        return self.pair_energy(d2.sqrt())

    def external_energy(self, x: torch.Tensor) -> torch.Tensor:
        """Energy of a one-body term (none by default)."""
        return x.new_zeros(x.shape[:-2])

    def external_gradient(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def external_laplacian(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[:-2])

    # ----------------------------------------------------------------- public physics
    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Reduced energy ``u(x)`` in kT, shape ``x.shape[:-2]``.

        Large batches are evaluated in blocks of at most :data:`PAIR_BLOCK` pairs: the pair
        tensors of a whole batch of a large cluster (200 LJ-55 chains: 300,000 pairs) fall out of
        the CPU caches, and blocks of ~25 such configurations were 3x faster. Each row's result is
        the same either way.
        """
        self.check_shape(x)
        return self._in_blocks(self._energy, x, x.shape[:-2])

    def _in_blocks(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   out_shape: torch.Size) -> torch.Tensor:
        """``fn(x)`` over blocks of at most :data:`PAIR_BLOCK` pairs along the flattened batch."""
        n_pairs = self.n_particles * (self.n_particles - 1) // 2
        rows = max(1, PAIR_BLOCK // max(n_pairs, 1))
        flat = x.reshape(-1, *self.event_shape)
        if flat.shape[0] <= rows:
            return fn(x)
        return torch.cat([fn(block) for block in flat.split(rows)]).reshape(out_shape)

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        r, _, _ = pair_vectors(x)
        d2 = torch.einsum("...k,...k->...", r, r)
        return self.pair_multiplicity * self.pair_energy_of_squared(d2).sum(-1) + self.external_energy(x)

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``∇u(x)``, same shape as ``x`` (in blocks, as :meth:`energy`)."""
        self.check_shape(x)
        return self._in_blocks(self._gradient, x, x.shape)

    def _gradient(self, x: torch.Tensor) -> torch.Tensor:
        r, i, j = pair_vectors(x)
        d = torch.linalg.vector_norm(r, dim=-1)
        _, df, _ = self.pair_potential(d)
        g_pair = (self.pair_multiplicity * df / d).unsqueeze(-1) * r  # ∂/∂x_i of the (i, j) term
        grad = torch.zeros_like(x)
        grad.index_add_(-2, i, g_pair)
        grad.index_add_(-2, j, -g_pair)
        return grad + self.external_gradient(x)

    def force(self, x: torch.Tensor) -> torch.Tensor:
        """Force ``-∇u(x)``."""
        return -self.gradient(x)

    def laplacian(self, x: torch.Tensor) -> torch.Tensor:
        """``Δu(x)``: each pair adds ``2 (f'' + (D - 1) f'/d)`` (its Hessian trace over both particles)."""
        self.check_shape(x)
        d = torch.linalg.vector_norm(pair_vectors(x)[0], dim=-1)
        _, df, d2f = self.pair_potential(d)
        per_pair = 2.0 * (d2f + (self.n_dims - 1) * df / d)
        return self.pair_multiplicity * per_pair.sum(-1) + self.external_laplacian(x)

    def configurational_temperature(self, x: torch.Tensor) -> float:
        """``⟨|∇u|²⟩ / ⟨Δu⟩`` over samples ``x``: 1 for exact samples of ``exp(-u)`` (SPEC §2)."""
        grad_sq = self.gradient(x).pow(2).sum(dim=(-2, -1))
        return float(grad_sq.mean() / self.laplacian(x).mean())

    # ----------------------------------------------------------------- sampling helpers
    def initial_configurations(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """CoM-free starting points for MCMC chains: isotropic Gaussian of the protocol's scale."""
        x = self.data_protocol.init_scale * torch.randn(
            n, self.n_particles, self.n_dims, generator=generator, dtype=torch.float64
        )
        return remove_com(x)

    def prior_log_normaliser(self) -> float:
        """``0.5 (N-1) D log 2π``: the Gaussian constant every NLL includes (SPEC §1)."""
        return 0.5 * self.n_dof * math.log(2.0 * math.pi)

    # ----------------------------------------------------------------- documentation
    @abstractmethod
    def describe(self) -> str:
        """Human-readable statement of the energy and its conventions."""
