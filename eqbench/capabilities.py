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


def model_builder(*, capabilities: Iterable[str], description: str = "") -> Callable[[_B], _B]:
    """Declare what a builder builds, so that eqbench knows it without constructing a model.

    Why: planning a sweep needs each model's capabilities (which tasks it can run, whether an
    augmented variant means anything) before any cell runs, and a builder may need settings
    that only a cell has (a checkpoint path). ``capabilities`` are keys of
    :data:`CAPABILITIES`; the pre-flight check (:func:`eqbench.runner.preflight`) refuses a
    model whose built flow is not what its builder declared. ``description`` is what
    ``eqbench list`` shows (default: the docstring's first line).

    Example:
        >>> @model_builder(capabilities=["trainable", "exact-density"], description="my flow")
        ... def build(system, config):
        ...     ...
        >>> sorted(build.capabilities), build.description
        (['exact-density', 'trainable'], 'my flow')
    """
    caps = checked_capabilities(capabilities, "model_builder")

    def mark(builder: _B) -> _B:
        builder.capabilities = caps  # type: ignore[attr-defined]
        if description:
            builder.description = description  # type: ignore[attr-defined]
        return builder

    return mark
