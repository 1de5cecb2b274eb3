"""What a task is: a protocol with profiles that turns (model, system, parameters) into records.

A task declares the systems it supports and refuses unsupported combinations before any work
(with the reason). Its profile parameters come from ``tasks/<name>.toml``; keys listed in
``grid_axes`` expand into separate cells, each stored and resumed on its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from eqbench.config import load_profiles
from eqbench.errors import ConfigError
from eqbench.records import Record

__all__ = ["CellContext", "Task"]


@dataclass
class CellContext:
    """What a task needs to run one cell; built by :mod:`eqbench.runner`, never from argparse."""

    task: str
    model: str
    system: Any  # ParticleSystem (kept untyped so this module does not import torch)
    params: Mapping[str, Any]
    seed: int
    device: str = "cpu"
    progress: bool | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def record(self, metric: str, value: float, unit: str = "", **fields: Any) -> Record:
        """A record of this cell with the identifying columns filled in."""
        fields.setdefault("n_train", self.params.get("n_train"))
        fields.setdefault("seed", self.seed)
        fields.setdefault("variant", self.params.get("variant", ""))
        return Record(task=self.task, system=self.system.name, model=self.model, metric=metric,
                      value=value, unit=unit, **fields)


class Task(ABC):
    """Base class of registered tasks."""

    name: str = ""
    #: One line for ``eqbench list``; the class docstring is the long description.
    summary: str = ""
    #: Systems the protocol is defined for; ``None`` means every registered system.
    systems: tuple[str, ...] | None = None
    #: Profile keys whose list values expand into one cell per element.
    grid_axes: tuple[str, ...] = ()

    def profiles(self) -> dict[str, dict[str, Any]]:
        """Profiles from ``tasks/<name>.toml``; plugin tasks may override this."""
        return load_profiles(self.name)

    def profile(self, name: str) -> dict[str, Any]:
        profiles = self.profiles()
        if name not in profiles:
            raise ConfigError(f"unknown profile {name!r} for task {self.name}; valid: {', '.join(profiles)}")
        return dict(profiles[name])

    def check_supported(self, system: str, model: str) -> None:
        """Raise :class:`ConfigError` saying why, when the combination cannot run."""
        if self.systems is not None and system not in self.systems:
            raise ConfigError(
                f"task {self.name} does not support system {system!r}; supported: {', '.join(self.systems)}"
            )

    def validate(self, params: Mapping[str, Any]) -> None:
        """Check resolved cell parameters before any work (override to add checks)."""

    @abstractmethod
    def run_cell(self, ctx: CellContext) -> list[Record]:
        """Run one cell and return its records."""
