"""Planning: a task profile plus overrides becomes cells, each with an identity and a settings key.

The layer between the tasks and whatever runs cells (:mod:`eqbench.runner`, :mod:`eqbench.sweep`,
:mod:`eqbench.cost`): it resolves names and settings, refuses invalid requests before any work,
and says what a cell *is* (its config: names, profile, seed, settings, code versions), so two
cells that differ only in their seed share one settings key, the unit of aggregation everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqbench.components import get_system, validate_model_config
from eqbench.config import apply_overrides, check_training_settings, expand_grid, resolve_per_model
from eqbench.errors import ConfigError
from eqbench.records import cell_id, settings_key
from eqbench.registry import MODELS, SYSTEMS, TASKS
from eqbench.tasks.base import REFERENCE_MODEL, Task
from eqbench.versions import eqbench_code_version, object_code_version

__all__ = ["CellPlan", "NoCellsError", "check_data_for", "check_sample_counts", "code_versions", "default_results_dir",
           "plan_cells", "seed_list"]


@dataclass(frozen=True)
class CellPlan:
    """One cell to run: its identity (``config``: names, profile, seed, settings, code versions)
    and, not part of the identity, what the pre-flight check learnt about the model."""

    task: str
    model: str
    system: str
    profile: str
    seed: int
    params: Mapping[str, Any]
    #: Versions of the code that computes the cell (:func:`code_versions`); part of its id.
    code: Mapping[str, str] = field(default_factory=dict)
    #: Facts about the model from :func:`preflight` (capabilities, density kind, parameters).
    model_info: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def config(self) -> dict[str, Any]:
        config = {"task": self.task, "model": self.model, "system": self.system, "profile": self.profile,
                  "seed": self.seed, "params": dict(self.params)}
        if self.code:
            config["code"] = dict(self.code)
        return config

    @property
    def cell_id(self) -> str:
        return cell_id(self.config)

    @property
    def settings_key(self) -> str:
        """The cell's identity without its seed: cells that differ only in seed share it."""
        return settings_key(self.config)


def code_versions(task: str, model: str | None) -> dict[str, str]:
    """``{"eqbench": ...}`` plus ``"model"`` / ``"task"`` where those come from other code
    (a plugin, a ``module:attr`` path): see :mod:`eqbench.versions`. ``model=None``: a cell that
    runs no model code (a model-independent reference, :meth:`~eqbench.tasks.base.Task.reference_params`)."""
    versions = {"eqbench": eqbench_code_version()}
    sources = [("task", type(TASKS.get(task)))]
    if model is not None:
        sources.insert(0, ("model", MODELS.get(model)))
    for kind, obj in sources:
        version = object_code_version(obj)
        if version != versions["eqbench"]:
            versions[kind] = version
    return versions


def default_results_dir(profile: str) -> Path:
    """``results/<profile>``: one directory per profile, so cells of different profiles never
    meet in one table by accident (a smoke cell is not a seed of a quick cell)."""
    return Path("results") / profile


class NoCellsError(ConfigError):
    """A valid request that selects no cell of one (model, system): the task drops every grid
    point for this model (``augment = [true]`` only, on an equivariant model). :func:`plan_cells`
    refuses it with the reason; a sweep lists such pairs as skipped and runs the others."""


def seed_list(params: Mapping[str, Any], seed: int | None) -> list[int]:
    """The seeds to run: ``[seed]``, else the ``seeds`` setting; an empty list is refused."""
    if seed is not None:
        seeds: Any = [seed]
    else:
        seeds = params.get("seeds", [0])
        seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds:
        raise ConfigError("seeds is an empty list, so no cell would run; give at least one seed, "
                          "e.g. --set seeds=[0] (or --seed 0, --seeds K)")
    for value in seeds:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"seeds must be non-negative integers, got {value!r}")
    return list(seeds)


def _check_axes(params: Mapping[str, Any], axes: Sequence[str]) -> None:
    """An empty list under a grid axis selects no cell: refuse it rather than run nothing."""
    for axis in axes:
        value = params.get(axis)
        if isinstance(value, list | tuple) and not value:
            raise ConfigError(f"{axis} is an empty list, so no cell would run; give it at least one value")


def check_sample_counts(task: Task, params: Mapping[str, Any], system: Any) -> None:
    """Refuse a sample count larger than the reference-data split it is drawn from
    (:attr:`~eqbench.tasks.base.Task.data_splits`; ``system`` a ParticleSystem, whose data
    protocol gives the split sizes, so no data is generated or read to find out)."""
    for key, split in task.data_splits.items():
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            continue  # absent, or not a count: the task's own validate judges it
        size = system.data_protocol.size(split)
        if value > size:
            raise ConfigError(f"{key} = {value} is more than the {system.name} {split} split holds "
                              f"({size} configurations); valid: 1 to {size}")


def _check_model_config(model: str, system: str, params: Mapping[str, Any], checked: set[str]) -> None:
    """Refuse invalid model settings before any work, by the check the model's builder declares
    (:func:`eqbench.components.validate_model_config`); a builder that declares none (a plugin)
    has its settings judged by the pre-flight, in the process that runs its cells."""
    config = params.get("model_config", {})
    if not isinstance(config, Mapping):
        raise ConfigError(f"model_config must be a table of model settings, got {config!r}")
    key = json.dumps(config, sort_keys=True, default=repr)
    if key not in checked:
        validate_model_config(model, system, config)
        checked.add(key)


def plan_cells(
    task: str,
    model: str,
    system: str,
    profile: str = "smoke",
    *,
    seed: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[CellPlan]:
    """Resolve names and settings and list the cells to run; raises before any work if invalid.

    Every setting is checked here, in the calling process, before anything runs or is written:
    the task's own (:meth:`~eqbench.tasks.base.Task.validate`), sample counts against the
    reference-data splits they are drawn from (:attr:`~eqbench.tasks.base.Task.data_splits`),
    and ``model_config`` by the check the model's builder declares
    (:func:`eqbench.components.validate_model_config`; no model is built). A request that
    selects no cell (an empty list of seeds or under a grid axis, or grid points the task drops
    for this model) is a :class:`~eqbench.errors.ConfigError` saying why, never an empty run
    (:class:`NoCellsError` when the task dropped them).

    A cell the task declares model-independent (:meth:`~eqbench.tasks.base.Task.reference_params`)
    is planned with model :data:`~eqbench.tasks.base.REFERENCE_MODEL`, the task's reference
    settings and no model code version: the same cell, with the same id, for every ``model``.
    """
    if model == REFERENCE_MODEL:
        raise ConfigError(f"{REFERENCE_MODEL!r} names the model-independent reference cells of a task, "
                          "not a model; choose another model name")
    task_obj: Task = TASKS.get(task)
    SYSTEMS.get(system)
    MODELS.get(model)
    task_obj.check_supported(system, model)
    params = apply_overrides(task_obj.profile(profile), overrides or {}, f"task {task} profile {profile}")
    params = resolve_per_model(params, model, MODELS.names())
    if task_obj.trains:
        check_training_settings(params)
    seeds = seed_list(params, seed)
    if task_obj.max_seed is not None and any(not 0 <= s < task_obj.max_seed for s in seeds):
        raise ConfigError(f"task {task} takes seeds in [0, {task_obj.max_seed}) (it derives its Metropolis seeds "
                          f"from them); got {seeds}")
    params.pop("seeds", None)
    _check_axes(params, task_obj.grid_axes)
    code = code_versions(task, model)
    system_obj = get_system(system)
    checked: set[str] = set()
    plans = []
    dropped = None
    for point in expand_grid(params, task_obj.grid_axes):
        task_obj.validate(point)
        cells = task_obj.expand_cell(point, model, system)
        if not cells:
            dropped = point
        for cell_params in cells:
            check_sample_counts(task_obj, cell_params, system_obj)
            shared = task_obj.reference_params(cell_params)
            if shared is not None:
                ref_code = code_versions(task, None)
                plans.extend(CellPlan(task, REFERENCE_MODEL, system, profile, s, shared, ref_code) for s in seeds)
            else:
                _check_model_config(model, system, cell_params, checked)
                plans.extend(CellPlan(task, model, system, profile, s, cell_params, code) for s in seeds)
    if not plans:
        reason = task_obj.no_cells_reason(dropped if dropped is not None else params, model, system)
        raise NoCellsError(f"no cells to run: {reason}")
    return plans


def check_data_for(plans: Sequence[CellPlan]) -> None:
    """Refuse before any work when the reference data these cells read are missing or corrupt
    in a cache that cannot be written (a read-only shared cache): one
    :class:`~eqbench.errors.DataError` naming every data set and the fix. A writable cache passes
    (missing data are generated on first use). Reference cells and tasks name the splits they read
    (:meth:`eqbench.tasks.base.Task.splits_read`)."""
    from eqbench.components import get_system
    from eqbench.data.store import check_data_available

    needed: dict[str, set[str]] = {}
    for plan in plans:
        needed.setdefault(plan.system, set()).update(TASKS.get(plan.task).splits_read())
    for system, splits in needed.items():
        check_data_available([get_system(system)], tuple(sorted(splits)))
