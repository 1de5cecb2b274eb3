"""What a model can be asked to do, declared by its builder without building it.

Bottom layer (imports nothing of eqbench but its errors), so that model modules, plugins and the
planning layer can all name capabilities; :mod:`eqbench.components` re-exports these names and
judges a built model by them (:func:`eqbench.components.capabilities_of`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from eqbench.errors import ConfigError

__all__ = ["CAPABILITIES", "checked_capabilities", "model_builder"]

_B = TypeVar("_B", bound=Callable[..., Any])

#: What a task or a claim may require of a model, and the phrase used when a model lacks it.
CAPABILITIES: dict[str, str] = {
    "cnf": "is not a continuous flow: it has no velocity field or divergence",
    "trainable": "is fitted in closed form: it has no gradient-based training to run",
    "equivariant": "is not equivariant (claims no rotation/permutation symmetry)",
    "exact-density": "has no exact log-density (its log_prob is an estimate)",
    "augmented": "is not an augmented flow (no auxiliary variables with an exact joint density)",
}


def checked_capabilities(capabilities: Iterable[str], what: str) -> frozenset[str]:
    """``capabilities`` as a frozenset, or a one-line error naming ``what`` and the valid keys."""
    if isinstance(capabilities, str):
        capabilities = [capabilities]
    caps = frozenset(capabilities)
    unknown = sorted(caps - set(CAPABILITIES))
    if unknown:
        raise ConfigError(f"{what} declares unknown capabilities {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(CAPABILITIES)}")
    return caps


def model_builder(*, capabilities: Iterable[str], description: str = "",
                  validate: Callable[[Any, dict[str, Any]], None] | None = None) -> Callable[[_B], _B]:
    """Declare what a builder builds, so that eqbench knows it without constructing a model.

    Why: planning a sweep needs each model's capabilities (which tasks it can run, whether an
    augmented variant means anything) before any cell runs, and a builder may need settings
    that only a cell has (a checkpoint path). ``capabilities`` are keys of
    :data:`CAPABILITIES`; the pre-flight check (:func:`eqbench.runner.preflight`) refuses a
    model whose built flow is not what its builder declared. ``description`` is what
    ``eqbench list`` shows (default: the docstring's first line).

    ``validate(system, config)``, optional, checks a ``model_config`` without building the model
    and raises :class:`~eqbench.errors.ConfigError` naming what is wrong and what is valid.
    Planning calls it (:func:`eqbench.components.validate_model_config`) for every cell before
    anything runs or is written, so a bad setting is one line and exit code 2, not a failed
    cell; a builder without one has its settings judged when the pre-flight builds it. It runs in
    the process that plans a sweep, so it must be cheap and do no model work (no torch
    computation, no training): look at the values only. The built-in builders declare theirs
    with :func:`eqbench.flows.settings.check_settings` and call it themselves before building.

    Example:
        >>> @model_builder(capabilities=["trainable", "exact-density"], description="my flow")
        ... def build(system, config):
        ...     ...
        >>> sorted(build.capabilities), build.description
        (['exact-density', 'trainable'], 'my flow')
    """
    caps = checked_capabilities(capabilities, "model_builder")
    if validate is not None and not callable(validate):
        raise ConfigError(f"model_builder validate= must be a function validate(system, config), got {validate!r}")

    def mark(builder: _B) -> _B:
        builder.capabilities = caps  # type: ignore[attr-defined]
        if description:
            builder.description = description  # type: ignore[attr-defined]
        if validate is not None:
            builder.validate_config = validate  # type: ignore[attr-defined]
        return builder

    return mark
