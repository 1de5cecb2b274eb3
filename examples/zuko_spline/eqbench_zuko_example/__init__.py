"""An eqbench model plugin: a zuko neural spline flow on the CoM-free coordinates.

Why it exists: to show, end to end, how a flow from a library that acts on flat vectors becomes
an eqbench model. zuko's ``NSF`` (monotonic rational-quadratic splines, Durkan et al., "Neural
Spline Flows", NeurIPS 2019) models the ``(N - 1) D`` coordinates of the centre-of-mass-free
subspace (Köhler, Klein & Noé, ICML 2020, §5 and A.3); :func:`eqbench.flows.flat.flat_flow_builder`
does the rest: coordinates, the CoM-free prior and its constant, declared capabilities, settings
validation and the ``checkpoint`` setting. Like the paper's nODE and real NVP baselines (§7.3,
B.2), it is not equivariant; train it with augmentation to compare it with the equivariant flows.

zuko's splines transform ``[-5, 5]`` and are the identity outside it; the benchmark's systems
(DW-4, LJ-13) have coordinates well inside that range.
"""

from __future__ import annotations

from typing import Any

from eqbench.errors import ConfigError
from eqbench.flows.flat import flat_flow_builder

__all__ = ["build", "make_nsf"]

#: Default settings (``model_config`` keys of :func:`build`, besides ``checkpoint`` and ``dtype``).
DEFAULTS: dict[str, Any] = {"transforms": 3, "hidden": [64, 64], "bins": 8, "passes": 2}


def _positive_int(config: dict[str, Any], key: str, minimum: int = 1) -> int:
    value = config.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"zuko-nsf setting {key} must be an integer >= {minimum}, got {value!r}")
    return value


def make_nsf(n_features: int, config: dict[str, Any]) -> Any:
    """A zuko ``NSF`` on ``n_features`` flat coordinates, from the settings in ``config``.

    Example:
        >>> make_nsf(6, {"transforms": 2, "hidden": [16]}).base().event_shape
        torch.Size([6])
    """
    import zuko

    hidden = config.get("hidden", DEFAULTS["hidden"])
    if not isinstance(hidden, list | tuple) or not hidden or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
        raise ConfigError(f"zuko-nsf setting hidden must be a non-empty list of positive integers, got {hidden!r}")
    passes = config.get("passes", DEFAULTS["passes"])
    if passes not in (0, 2):
        raise ConfigError(f"zuko-nsf setting passes must be 2 (coupling) or 0 (fully autoregressive), got {passes!r}")
    return zuko.flows.NSF(
        n_features,
        transforms=_positive_int(config, "transforms"),
        bins=_positive_int(config, "bins", minimum=2),
        hidden_features=list(hidden),
        passes=passes or None,
    )


build = flat_flow_builder(
    make_nsf,
    name="zuko-nsf",
    description="zuko neural spline flow on the (N-1)·D CoM-free coordinates (example plugin; not equivariant)",
    settings=DEFAULTS,
)
