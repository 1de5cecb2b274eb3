"""Run configuration: task profiles from TOML plus ``--set key=value`` overrides (DESIGN step 1).

Profiles live in ``tasks/<task>.toml`` (one table per profile: ``smoke``, ``quick``, ``paper``).
A value that is a list under a key the task declares as a grid axis (e.g. ``n_train``) expands
into one cell per element; ``seeds`` always does. Overrides are parsed as TOML values, so
``--set n_train=[10,100]`` and ``--set lr=1e-3`` mean what they look like.

Any setting may be a per-model table with a ``default`` entry, ``lr = { default = 5e-3,
real-nvp = 1e-3 }``: each model's cells get the model's entry, others the default
(:func:`resolve_per_model`), and the cell records the value it used. Tasks that train take the
training settings of :data:`TRAINING_DEFAULTS` (the paper's protocol) in every profile.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eqbench import resources
from eqbench.errors import ConfigError

__all__ = ["PROFILES", "OPTIMIZERS", "SCHEDULES", "TRAINING_DEFAULTS", "TRAINING_HELP", "tasks_dir", "load_profiles",
           "parse_overrides", "apply_overrides", "expand_grid", "resolve_per_model", "check_training_settings"]

PROFILES = ("smoke", "quick", "paper", "calibrate")

#: Optimisers a training setting may name (``torch.optim.AdamW`` / ``Adam``).
OPTIMIZERS = ("adamw", "adam")
#: Learning-rate schedules: constant, or a cosine decay to zero over the run; either after
#: ``lr_warmup`` iterations of linear warm-up from zero.
SCHEDULES = ("constant", "cosine")

#: The training settings of every task that trains, with the paper's protocol as their values
#: (C.1, C.3: AdamW, lr 5e-3, weight decay 0.01; no gradient clipping, no schedule). Profiles and
#: ``--set`` may change each; the batch sizes stay task settings (``batch_size``), beside
#: ``kl_batch_size``, the number of flow samples per reverse-KL step (paper B.3 trains with 64).
TRAINING_DEFAULTS: dict[str, Any] = {
    "optimizer": "adamw",
    "lr": 5e-3,
    "weight_decay": 0.01,
    "grad_clip": "off",
    "schedule": "constant",
    "lr_warmup": 0,
    "kl_batch_size": 64,
    "kl_energy_cut": "off",
    "micro_batch": "off",
}

#: One line per training setting, for ``eqbench describe`` and error messages.
TRAINING_HELP: dict[str, str] = {
    "optimizer": f"one of {', '.join(OPTIMIZERS)} (paper: adamw)",
    "lr": "learning rate, > 0 (paper: 5e-3)",
    "weight_decay": "decoupled (adamw) or L2 (adam) weight decay, >= 0 (paper: 0.01)",
    "grad_clip": "\"off\", the largest gradient norm (> 0), or \"dynamic\": the coupling-flow authors' guard "
                 "(clip to 2x the median norm of the last 100 steps, skip steps above 20x) (paper: off)",
    "schedule": f"one of {', '.join(SCHEDULES)} (paper: constant)",
    "lr_warmup": "iterations of linear warm-up from lr 0, >= 0 (paper: 0)",
    "kl_batch_size": "flow samples per reverse-KL step, >= 1 (paper: 64)",
    "kl_energy_cut": "\"off\" (the raw energy) or u_high in kT: the reverse-KL term's energy grows as "
                     "u_high + log(1 + u - u_high) above it (Boltzmann generators' regularisation; bgflow uses "
                     "1000) (paper: off)",
    "micro_batch": "\"off\" or rows per backward pass, >= 1: each batch's gradient is summed over chunks this "
                   "size, the same loss at a fraction of the memory (en-flow on LJ-13 holds 12-17 GB at batch 64) "
                   "(paper: off)",
}


def tasks_dir() -> Path:
    """Directory of the task TOML files: ``$EQBENCH_TASKS_DIR``, else ``tasks/`` of the checkout,
    else the copy shipped in the installed package (:func:`eqbench.resources.tasks_dir`)."""
    return resources.tasks_dir()


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


def resolve_per_model(params: Mapping[str, Any], model: str, models: Iterable[str]) -> dict[str, Any]:
    """Replace every per-model table (a table with a ``default`` entry) by ``model``'s value.

    Keys of such a table other than ``default`` must name models (``models``: the registered
    names, or a ``module:attr`` builder path), so that a typo is an error rather than a silently
    ignored setting.

    Example:
        >>> resolve_per_model({"lr": {"default": 5e-3, "real-nvp": 1e-3}, "n": 3}, "real-nvp", ["real-nvp", "node"])
        {'lr': 0.001, 'n': 3}
    """
    valid = set(models) | {model}
    resolved = dict(params)
    for key, value in params.items():
        if isinstance(value, Mapping) and "default" in value:
            unknown = sorted(k for k in set(value) - valid - {"default"} if ":" not in str(k))
            if unknown:
                raise ConfigError(f"setting {key!r} has entries for unknown models {', '.join(map(repr, unknown))}; "
                                  f"a per-model table takes 'default' and model names: {', '.join(sorted(valid))}")
            resolved[key] = value.get(model, value["default"])
    return resolved


def _number(params: Mapping[str, Any], key: str) -> float:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number, got {value!r}; {key}: {TRAINING_HELP[key]}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}; {key}: {TRAINING_HELP[key]}")
    return float(value)


def check_training_settings(params: Mapping[str, Any]) -> None:
    """Refuse a training setting out of range with a one-line error saying what is valid.

    Example:
        >>> check_training_settings({**TRAINING_DEFAULTS, "optimizer": "sgd"})
        Traceback (most recent call last):
        ...
        eqbench.errors.ConfigError: unknown optimizer 'sgd'; valid: adamw, adam
    """
    if params["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {params['optimizer']!r}; valid: {', '.join(OPTIMIZERS)}")
    if params["schedule"] not in SCHEDULES:
        raise ConfigError(f"unknown schedule {params['schedule']!r}; valid: {', '.join(SCHEDULES)}")
    if not _number(params, "lr") > 0:
        raise ConfigError(f"lr must be > 0, got {params['lr']!r}")
    if not _number(params, "weight_decay") >= 0:
        raise ConfigError(f"weight_decay must be >= 0, got {params['weight_decay']!r}")
    clip = params["grad_clip"]
    if clip not in ("off", "dynamic") and not (
            not isinstance(clip, bool) and isinstance(clip, int | float) and 0 < clip < math.inf):
        raise ConfigError(f"grad_clip must be \"off\", \"dynamic\" or a number > 0 (finite), got {clip!r}")
    cut = params.get("kl_energy_cut", "off")
    if cut != "off" and not (not isinstance(cut, bool) and isinstance(cut, int | float) and math.isfinite(cut)):
        raise ConfigError(f"kl_energy_cut must be \"off\" or a finite energy in kT, got {cut!r}")
    chunk = params.get("micro_batch", "off")
    if chunk != "off" and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ConfigError(f"micro_batch must be \"off\" or an integer >= 1, got {chunk!r}")
    for key, least in (("lr_warmup", 0), ("kl_batch_size", 1)):
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{key} must be an integer >= {least}, got {value!r}")
