"""Default settings of the paper's models, from what a system is: its kind, lengths and size.

Why here and not keyed on system names: a model must build for any system (a ``dw8``, an
``lj55``, the known-answer ``harmonic`` system, a plugin's), and the paper's choices are really
choices about the *potential* and the *dimension*, which a system declares
(:attr:`~eqbench.systems.base.ParticleSystem.kind`,
:attr:`~eqbench.systems.base.ParticleSystem.length_scale`,
:attr:`~eqbench.systems.base.ParticleSystem.pair_distance_range`, ``N·D``). For the paper's
systems every rule below reproduces the paper's settings exactly (DW-2/DW-4/LJ-13; the tests pin
them value for value).

**Distance kernels** (kernel flow, paper C.1; the gradient flows' RBFs, C.2 "the same distance
embedding"), :func:`distance_kernel_placement`:

- ``lennard-jones``: the authors' LJ-13 placement in units of ``rm`` (SPEC §4 "Kernel flow
  details"): ``μ = rm · sort((linspace(0, 16, K) - 1.5)² / 32)`` (0 to 6.57 rm),
  ``γ = rm · (0.3 + 3 (μ/rm - 1.5)² / 64)``. It is shaped around the repulsive core and the
  pair minimum, so it is kept for every Lennard-Jones cluster and scaled with rm only.
- every other kind: K centres equispaced over the system's typical pair distances
  ``[lo, hi] = pair_distance_range`` with ``γ = (hi - lo) / 16``: the paper's double-well
  placement ``linspace(0, 8)``, γ = 0.5, is exactly this for ``[0, 2 d0] = [0, 8]``. It assumes
  nothing about the potential beyond its lengths, so it is also the rule for ``harmonic`` and
  ``other``.

**Time kernels** of the kernel flow (C.1), :func:`time_kernel_placement`: centres
``linspace(0, 1)``; bandwidths for ``lennard-jones`` by one of :data:`TIME_BANDWIDTH_RULES`: the
authors' code, ``(0.3 + 0.5 (ν - 0.5)²) / √10`` (0.095 at t = 0.5 to 0.134 at the ends; the
default, since the paper's text only gives the shape, "narrower around t = 0.5"), or eqbench's
former choice ``0.15 + 0.6 (ν - 0.5)²`` (0.15 to 0.30); 0.3 (the DW-4 value, text and code)
for every other kind under either rule.

**Widths by dimension** (node, real NVP; paper C.3, C.5), :func:`paper_width`,
:func:`is_large`: the paper gives two points, N·D = 8 (DW-4: node [64, 64], real NVP 8 blocks)
and N·D = 39 (LJ-13: node [64, 128, 64], real NVP 16 blocks). eqbench takes the larger
(LJ-13) architecture when N·D exceeds :data:`LARGE_DIMENSION` = 32, half the paper's width of
64: below it a 64-wide layer is at least twice as wide as the coordinates (the DW-4 regime),
above it no longer. The base width is 64 rounded up to a multiple of 64 that is at least the
number of outputs the network must produce: a last hidden layer narrower than its output
confines the output to an affine subspace of that width (for a node, the velocity could not
point in every direction of the CoM-free space), so widths grow with large systems (LJ-55:
N·D = 165, width 192) and are 64 for every paper system.
"""

from __future__ import annotations

import math

import torch

from eqbench.errors import ConfigError
from eqbench.systems.base import ParticleSystem

__all__ = [
    "LARGE_DIMENSION",
    "PAPER_WIDTH",
    "TIME_BANDWIDTH_RULES",
    "distance_kernel_placement",
    "is_large",
    "paper_width",
    "time_kernel_placement",
]

#: Hidden width of the paper's MLPs (C.3, C.5).
PAPER_WIDTH = 64
#: Rules for the kernel flow's Lennard-Jones time bandwidths (:func:`time_kernel_placement`).
TIME_BANDWIDTH_RULES = ("paper-code", "eqbench")
#: N·D above which a system gets the paper's LJ-13 architecture rather than its DW-4 one.
LARGE_DIMENSION = 32


def _lengths(system: ParticleSystem) -> tuple[float, float, float]:
    """``(length_scale, lo, hi)``, checked: a one-line ConfigError for a system with bad lengths."""
    scale = float(system.length_scale)
    lo, hi = (float(v) for v in system.pair_distance_range)
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"system {system.name}: length_scale must be a finite number > 0, got {scale}")
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ConfigError(f"system {system.name}: pair_distance_range must be finite with 0 <= lo < hi, "
                          f"got ({lo}, {hi})")
    return scale, lo, hi


def distance_kernel_placement(system: ParticleSystem, n_kernels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres ``μ`` and bandwidths ``γ`` (float64, ``[n_kernels]``) of the distance kernels.

    The rule follows the system's kind and lengths (module docstring; paper C.1, C.2): the
    authors' LJ-13 placement scaled by ``rm`` for ``lennard-jones``, centres equispaced over
    ``pair_distance_range`` with ``γ = (hi - lo) / 16`` for every other kind.
    """
    if n_kernels < 2:
        raise ConfigError(f"at least 2 distance kernels are needed, got {n_kernels}")
    scale, lo, hi = _lengths(system)
    f64 = torch.float64
    if system.kind == "lennard-jones":
        unit = torch.sort((torch.linspace(0.0, 16.0, n_kernels, dtype=f64) - 1.5) ** 2 / 32).values
        return scale * unit, scale * (0.3 + 3.0 * (unit - 1.5) ** 2 / 64)
    mu = torch.linspace(lo, hi, n_kernels, dtype=f64)
    return mu, torch.full((n_kernels,), (hi - lo) / 16.0, dtype=f64)


def time_kernel_placement(system: ParticleSystem, n_kernels: int,
                          rule: str = "paper-code") -> tuple[torch.Tensor, torch.Tensor]:
    """Centres ``ν`` and bandwidths ``β`` (float64) of the kernel flow's time kernels on [0, 1].

    ``lennard-jones``: ``rule = "paper-code"`` (default) gives the authors' code,
    ``β = (0.3 + 0.5 (ν - 0.5)²) / √10`` (0.095 at t = 0.5, 0.134 at the ends); ``"eqbench"``
    gives ``β = 0.15 + 0.6 (ν - 0.5)²`` (0.15 to 0.30). The paper's text (C.1) gives only the
    shape, narrower around t = 0.5, which both satisfy. Every other kind: β = 0.3 (DW-4, C.1)
    under either rule. Time is dimensionless, so nothing here scales with the system's lengths.

    Example:
        >>> import eqbench
        >>> nu, beta = time_kernel_placement(eqbench.get_system("lj13"), 10)
        >>> round(float(beta[0]), 4), round(float(beta.min()), 4)
        (0.1344, 0.0954)
    """
    if n_kernels < 2:
        raise ConfigError(f"at least 2 time kernels are needed, got {n_kernels}")
    if rule not in TIME_BANDWIDTH_RULES:
        raise ConfigError(f"time_bandwidths must be one of {', '.join(TIME_BANDWIDTH_RULES)}; got {rule!r}")
    f64 = torch.float64
    nu = torch.linspace(0.0, 1.0, n_kernels, dtype=f64)
    if system.kind == "lennard-jones":
        if rule == "paper-code":
            return nu, (0.3 + 0.5 * (nu - 0.5) ** 2) / math.sqrt(10.0)
        return nu, 0.15 + 0.6 * (nu - 0.5) ** 2
    return nu, torch.full((n_kernels,), 0.3, dtype=f64)


def paper_width(n_outputs: int) -> int:
    """The paper's width 64, rounded up to a multiple of 64 of at least ``n_outputs`` (module
    docstring: a narrower last hidden layer could not span its output)."""
    return PAPER_WIDTH * max(1, math.ceil(n_outputs / PAPER_WIDTH))


def is_large(system: ParticleSystem) -> bool:
    """Whether ``system`` gets the paper's LJ-13 architecture: N·D > :data:`LARGE_DIMENSION`."""
    return system.dim > LARGE_DIMENSION
