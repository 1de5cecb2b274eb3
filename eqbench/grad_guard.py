"""The coupling-flow authors' gradient guard: clip to a multiple of the recent median gradient norm,
and skip a step whose gradient is far above it.

Why: the SE(3) augmented coupling flow's public code (Midgley et al. 2023, seed 003) trains its
LJ-13 flows, by maximum likelihood and by flow annealed importance sampling alike, with
``dynamic_grad_ignore_and_clip`` on; eqbench's protocol is the 2020 paper's, which clips nothing
(C.1). Offered as the training setting ``grad_clip = "dynamic"`` so that a run says which it used
and the difference can be measured.

The rule, as the authors' code applies it (with their configuration's factors):

1. Keep the last ``window`` (100) gradient norms. The window starts two-thirds full of a huge
   value (1e30) and one-third empty, so the median is unbounded, and no step is clipped or
   skipped, for the first third of a window (34 steps of 100).
2. Before each step, take the median ``m`` of the norms in the window (empty slots ignored; an
   even count averages the middle two, like ``numpy.nanmedian``).
3. A gradient with norm above ``skip_factor · m`` (20 m) is not applied: no parameter update, the
   optimiser's moments untouched. Otherwise it is clipped to norm ``clip_factor · m`` (2 m).
4. The step's norm enters the window either way.

One difference, eqbench's choice: the authors also skip non-finite gradients; eqbench's training
loop stops on a non-finite loss or gradient and records the reason (:mod:`eqbench.train`), with
this guard too, so that a NaN never passes silently.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GRAD_GUARD_SETTING", "GradientGuard", "GuardDecision"]

#: The value of the training setting ``grad_clip`` that turns the guard on.
GRAD_GUARD_SETTING = "dynamic"

#: The authors' constants: ``OptimizerConfig`` defaults (window 100, clip 2x, skip 20x), which
#: their LJ-13 configurations keep.
_AUTHORS = {"window": 100, "clip_factor": 2.0, "skip_factor": 20.0}
#: Stand-in for "no bound yet" in the initial window (the authors' 1e30).
_UNBOUNDED = 1e30


@dataclass(frozen=True)
class GuardDecision:
    """What the guard does with one gradient: ``skip`` it, or clip it to norm ``limit``."""

    skip: bool
    limit: float


@dataclass
class GradientGuard:
    """The rule of the module docstring; :meth:`authors` gives the authors' constants.

    Example:
        >>> guard = GradientGuard(window=6)           # a short window: starts with 4 unbounded slots
        >>> [guard.admit(1.0).limit < 1e29 for _ in range(3)]  # the median is still unbounded
        [False, False, False]
        >>> guard.admit(3.0)                         # median of (1e30, 1, 1, 1) is 1: clip to 2
        GuardDecision(skip=False, limit=2.0)
        >>> guard.admit(25.0).skip, guard.skipped    # above 20 x the median 1: not applied
        (True, 1)
    """

    window: int = _AUTHORS["window"]
    clip_factor: float = _AUTHORS["clip_factor"]
    skip_factor: float = _AUTHORS["skip_factor"]
    #: Steps not applied so far.
    skipped: int = 0
    #: The window; ``None`` marks an empty slot (the authors' NaN), ignored by the median.
    norms: deque[float | None] = field(init=False)

    def __post_init__(self) -> None:
        if self.window < 3:
            raise ValueError(f"window must be at least 3 norms, got {self.window}")
        if not 0 < self.clip_factor <= self.skip_factor:
            raise ValueError(f"need 0 < clip_factor <= skip_factor, got {self.clip_factor}, {self.skip_factor}")
        filled = int(self.window * 2 / 3)
        self.norms = deque([_UNBOUNDED] * filled + [None] * (self.window - filled), maxlen=self.window)

    @classmethod
    def authors(cls) -> GradientGuard:
        """The guard with the constants of the authors' LJ-13 configurations."""
        return cls(**_AUTHORS)

    def median(self) -> float:
        """The median gradient norm over the window's filled slots."""
        return float(statistics.median(n for n in self.norms if n is not None))

    def admit(self, norm: float) -> GuardDecision:
        """Decide on a gradient of global norm ``norm`` (finite) and add it to the window."""
        if not math.isfinite(norm):
            raise ValueError(f"the guard takes finite gradient norms, got {norm}")
        m = self.median()
        decision = GuardDecision(skip=norm > self.skip_factor * m, limit=self.clip_factor * m)
        self.norms.append(float(norm))
        self.skipped += int(decision.skip)
        return decision

    def state_dict(self) -> dict[str, Any]:
        """What a training snapshot keeps of the guard."""
        return {"norms": list(self.norms), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["norms"]) != self.window:
            raise ValueError(f"a guard of window {self.window} cannot load a window of {len(state['norms'])}")
        self.norms = deque(state["norms"], maxlen=self.window)
        self.skipped = int(state["skipped"])
