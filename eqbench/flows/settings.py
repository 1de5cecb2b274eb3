"""Model settings checked without building the model: a small schema per builder.

Why: a sweep's settings must be refused before any work, in the process that plans it, with
one line naming what is wrong and what is valid. Building a model to find out costs seconds
(and for a plugin means running its code in the sweep's parent), so each built-in builder
declares the settings it takes as a :data:`Schema` (name -> :class:`Setting`: a check and the
words for what is valid) and validates a ``model_config`` against it before it builds anything
(:func:`check_settings`). The same function is declared with the builder
(``eqbench.model_builder(validate=...)``), so planning calls exactly the check the builder
applies; a value is never truncated or coerced (``steps = 2.7`` is refused, not run as 2).

Torch-free on purpose: the checks look at plain TOML values (numbers, strings, lists).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from eqbench.errors import ConfigError

__all__ = ["DTYPE_NAMES", "Schema", "Setting", "check_settings", "choice", "dtype_setting", "integer", "number",
           "widths"]

#: Values of the ``dtype`` setting (a builder maps them to torch dtypes).
DTYPE_NAMES = ("float32", "float64")


@dataclass(frozen=True)
class Setting:
    """One model setting: ``check(value)`` says whether a value is valid, ``valid`` says in
    words what is (shown in the error)."""

    check: Callable[[Any], bool]
    valid: str


#: A builder's settings: name -> :class:`Setting`. Keys not in it are refused.
Schema = Mapping[str, Setting]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(minimum: int) -> Setting:
    """An integer >= ``minimum`` (a float such as 2.7 or 20.0 is refused, never truncated)."""
    return Setting(lambda v: _is_int(v) and v >= minimum,
                   "a positive integer" if minimum == 1 else f"an integer >= {minimum}")


def number(*, above: float | None = None, at_least: float | None = None) -> Setting:
    """A finite number ``> above`` or ``>= at_least``."""
    if above is not None:
        return Setting(lambda v: _is_real(v) and math.isfinite(v) and v > above,
                       "positive (a finite number > 0)" if above == 0 else f"a finite number > {above:g}")
    low = -math.inf if at_least is None else at_least
    return Setting(lambda v: _is_real(v) and math.isfinite(v) and v >= low,
                   "a finite number" + (f" >= {at_least:g}" if at_least is not None else ""))


def choice(*values: str, valid: str = "") -> Setting:
    """One of ``values``."""
    return Setting(lambda v: isinstance(v, str) and v in values, valid or f"one of {', '.join(values)}")


def dtype_setting() -> Setting:
    """``"float32"`` or ``"float64"`` (or those torch dtypes, in Python)."""
    def ok(value: Any) -> bool:
        if isinstance(value, str):
            return value in DTYPE_NAMES
        return type(value).__name__ == "dtype" and str(value).removeprefix("torch.") in DTYPE_NAMES

    return Setting(ok, f"one of {', '.join(DTYPE_NAMES)}")


def widths() -> Setting:
    """A non-empty list of positive integer layer widths, e.g. ``[64, 64]``."""
    return Setting(lambda v: isinstance(v, list | tuple) and len(v) > 0 and all(_is_int(h) and h >= 1 for h in v),
                   "a non-empty list of positive integer widths, e.g. [64, 64]")


def check_settings(config: Any, model: str, schema: Schema) -> None:
    """Refuse a ``model_config`` that is not a table, names a setting ``schema`` lacks (the error
    lists the valid ones) or holds an invalid value (the error says what is valid).

    Example:
        >>> check_settings({"steps": 2.7}, "kernel-flow", {"steps": integer(1)})
        Traceback (most recent call last):
        ...
        eqbench.errors.ConfigError: kernel-flow setting steps must be a positive integer; got 2.7
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"model_config of {model} must be a table of settings, got {config!r}")
    unknown = sorted(str(key) for key in config if key not in schema)
    if unknown:
        raise ConfigError(f"unknown {model} settings: {', '.join(unknown)}; valid: {', '.join(sorted(schema))}")
    for key, value in config.items():
        setting = schema[key]
        if not setting.check(value):
            raise ConfigError(f"{model} setting {key} must be {setting.valid}; got {value!r}")
