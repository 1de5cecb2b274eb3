"""Run configuration: task profiles from TOML plus ``--set key=value`` overrides (DESIGN step 1).

Profiles live in ``tasks/<task>.toml`` (one table per profile: ``smoke``, ``quick``, ``paper``).
A value that is a list under a key the task declares as a grid axis (e.g. ``n_train``) expands
into one cell per element; ``seeds`` always does. Overrides are parsed as TOML values, so
``--set n_train=[10,100]`` and ``--set lr=1e-3`` mean what they look like.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eqbench.errors import ConfigError

__all__ = ["PROFILES", "tasks_dir", "load_profiles", "parse_overrides", "apply_overrides", "expand_grid"]

PROFILES = ("smoke", "quick", "paper", "calibrate")


def tasks_dir() -> Path:
    """Directory of the task TOML files: ``$EQBENCH_TASKS_DIR`` or ``tasks/`` at the repository root."""
    configured = os.environ.get("EQBENCH_TASKS_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parents[1] / "tasks"


def load_profiles(task_name: str, path: Path | None = None) -> dict[str, dict[str, Any]]:
    """All profiles of a task as ``{profile: {key: value}}``."""
    path = path or tasks_dir() / f"{task_name}.toml"
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"task {task_name!r} has no profile file {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"profile file {path} is not valid TOML: {exc}") from None
    profiles = {name: dict(table) for name, table in data.items() if isinstance(table, dict)}
    if not profiles:
        raise ConfigError(f"profile file {path} defines no profiles; expected tables {', '.join(PROFILES)}")
    return profiles


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are TOML (numbers, booleans, lists, strings) or bare strings."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"malformed --set {item!r}; expected key=value, e.g. --set n_train=100")
        if not key.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"malformed --set key {key!r}; keys are letters, digits, '_', '-' and '.'")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        overrides[key] = value
    return overrides


def apply_overrides(params: Mapping[str, Any], overrides: Mapping[str, Any], context: str) -> dict[str, Any]:
    """Overlay ``overrides`` on ``params``; a key the profile does not define is an error."""
    merged = dict(params)
    for key, value in overrides.items():
        if key not in merged:
            raise ConfigError(f"unknown setting {key!r} for {context}; valid: {', '.join(sorted(merged))}")
        merged[key] = value
    return merged


def expand_grid(params: Mapping[str, Any], axes: Sequence[str]) -> list[dict[str, Any]]:
    """One parameter dict per point of the grid spanned by the list-valued ``axes``."""
    values = []
    for axis in axes:
        value = params.get(axis)
        values.append(list(value) if isinstance(value, (list, tuple)) else [value])
    return [dict(params, **dict(zip(axes, point))) for point in itertools.product(*values)]
