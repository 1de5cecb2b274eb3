"""What a task is: a protocol with profiles that turns (model, system, parameters) into records.

A task declares the systems it supports and refuses unsupported combinations before any work
(with the reason). Its profile parameters come from ``tasks/<name>.toml``; keys listed in
``grid_axes`` expand into separate cells, each stored and resumed on its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.artifacts import ArtifactWriter
from eqbench.components import CAPABILITIES
from eqbench.config import TRAINING_DEFAULTS, load_profiles
from eqbench.errors import ConfigError, EqbenchError
from eqbench.records import CellResult, Record

if TYPE_CHECKING:
    import pandas

    from eqbench.tasks.reporting import TaskSection

__all__ = ["CAPABILITIES", "REFERENCE_MODEL", "CellContext", "Task", "model_capabilities"]

#: The ``model`` of a cell that does not depend on the model (:meth:`Task.reference_params`): one
#: cell per system, settings and seed, shared by every model it is compared with. Not a model
#: name: no model may be registered under it (:func:`eqbench.planning.plan_cells` refuses it).
REFERENCE_MODEL = "reference"


def model_capabilities(model: str, system: Any) -> frozenset[str]:
    """Capabilities of ``model`` on ``system``: what its builder declares, without building it
    (:func:`eqbench.components.model_capabilities`); a builder that declares nothing is built
    with its default settings and judged by what it is, never by its name.
    """
    from eqbench.components import model_capabilities as capabilities

    try:
        return capabilities(model, system)
    except EqbenchError as exc:
        raise ConfigError(f"{exc} (a builder that needs settings to be built should declare its "
                          "capabilities with eqbench.model_builder(capabilities=...))") from exc


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
    #: Where the cell keeps its model and samples (:mod:`eqbench.artifacts`); ``None``: nothing kept.
    artifacts: ArtifactWriter | None = None
    #: Code versions of the cell (:func:`eqbench.planning.code_versions`), kept with its model.
    code: Mapping[str, str] = field(default_factory=dict)
    #: Where training saves and resumes snapshots (:class:`eqbench.snapshots.SnapshotPlan`);
    #: ``None``: training is not saved mid-way.
    snapshots: Any = None

    def keep_model(self, flow: Any, model_config: Mapping[str, Any] | None = None) -> None:
        """Keep the model this cell scored (its state and how to rebuild it), if artifacts are kept."""
        if self.artifacts is not None:
            config = self.params.get("model_config", {}) if model_config is None else model_config
            self.artifacts.save_model(flow, model=self.model, system=self.system.name, model_config=config,
                                      code=self.code)

    def keep_samples(self, x: Any, log_q: Any, **arrays: Any) -> None:
        """Keep the flow samples this cell scored with their exact ``log q`` and their energies
        (computed here, in float64, only when artifacts are kept)."""
        if self.artifacts is not None:
            import torch

            with torch.no_grad():
                energy = self.system.energy(x.detach().to("cpu", torch.float64))
            self.artifacts.save_samples(x, log_q, energy, **arrays)

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
    #: Seeds must lie in ``[0, max_seed)`` (checked at planning) for a task that derives other
    #: random streams from the cell seed and must keep them distinct; ``None``: any seed.
    max_seed: int | None = None
    #: Capabilities (keys of :data:`CAPABILITIES`) a model needs for this task.
    requires: tuple[str, ...] = ()
    #: Whether cells train a model: every profile then carries the training settings of
    #: :data:`eqbench.config.TRAINING_DEFAULTS` (the paper's protocol unless the profile says
    #: otherwise), settable with ``--set``.
    trains: bool = False
    #: Settings that are a number of configurations drawn from a reference-data split:
    #: ``{setting: split}`` (``train``, ``val``, ``test``). Planning refuses a value larger than
    #: the split holds (its size is the system's data protocol's, known without the data).
    data_splits: Mapping[str, str] = {}

    def splits_read(self) -> tuple[str, ...]:
        """The reference-data splits this task's cells read: those of :attr:`data_splits`, else
        the training pool. Override when a cell reads a split no setting sizes."""
        return tuple(sorted(set(self.data_splits.values()))) or ("train",)

    def profiles(self) -> dict[str, dict[str, Any]]:
        """Profiles from ``tasks/<name>.toml``; plugin tasks may override this."""
        return load_profiles(self.name)

    def profile(self, name: str) -> dict[str, Any]:
        profiles = self.profiles()
        if name not in profiles:
            raise ConfigError(f"unknown profile {name!r} for task {self.name}; valid: {', '.join(profiles)}")
        return {**TRAINING_DEFAULTS, **profiles[name]} if self.trains else dict(profiles[name])

    def check_supported(self, system: str, model: str) -> None:
        """Raise :class:`ConfigError` saying why, when the combination cannot run: a system the
        protocol is not defined for, or a model that lacks a required capability (declared by
        its builder, :func:`model_capabilities`). Whether the model builds for the system is not
        asked here: every paper model does (its defaults follow the system's kind and lengths,
        :mod:`eqbench.flows.defaults`), and a plugin model that does not fails the pre-flight in
        the cell's own process, so a sweep's parent never runs the model's code."""
        if self.systems is not None and system not in self.systems:
            raise ConfigError(
                f"task {self.name} does not support system {system!r}; supported: {', '.join(self.systems)}"
            )
        if self.requires:
            from eqbench.components import get_system

            caps = model_capabilities(model, get_system(system))
            for need in self.requires:
                if need not in caps:
                    raise ConfigError(f"task {self.name} cannot run model {model!r}: it {CAPABILITIES[need]}")

    def validate(self, params: Mapping[str, Any]) -> None:
        """Check resolved cell parameters before any work (override to add checks)."""

    def expand_cell(self, params: Mapping[str, Any], model: str, system: str) -> list[dict[str, Any]]:
        """The cells one grid point becomes for this model and system (default: itself).

        Override to drop points that mean nothing for a model (augmenting a model that is
        already equivariant) or to name a point's ``variant``; called after :meth:`validate`.
        """
        return [dict(params)]

    def no_cells_reason(self, params: Mapping[str, Any], model: str, system: str) -> str:
        """Why :meth:`expand_cell` made no cell of any grid point (``params``: one of them), in
        words that say what to change; :func:`eqbench.planning.plan_cells` refuses such a
        request with it rather than run nothing."""
        return f"task {self.name} makes no cell of model {model!r} on {system} with these settings"

    def reference_params(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The settings of a cell that does not depend on the model, or ``None`` (default) when it does.

        A task whose grid holds references computed without the model (metastable-states' training
        set and MCMC rows) returns, for such a cell, the settings the reference depends on, without
        any that only the model uses (its ``model_config``, its training settings, which may differ
        per model). :func:`eqbench.planning.plan_cells` then plans the cell under
        :data:`REFERENCE_MODEL` and without a model code version, so its id is the same whichever
        model asked for it: it runs once per system, settings and seed, and every model's run and
        sweep reads it back. Called on the cells :meth:`expand_cell` returned.
        """
        return None

    def cost_phases(self, params: Mapping[str, Any], system: str) -> dict[str, float]:
        """Work of each timed phase of a cell with these settings: ``{metric: work units}``.

        ``metric`` is the record in which :meth:`run_cell` stores the phase's measured seconds
        (summed over steps); work units are counts the phase's cost is proportional to (e.g.
        training iterations x batch size). :mod:`eqbench.cost` turns measured cells of any
        profile into seconds per unit and prices unrun cells with them (``sweep --dry-run``).
        The default, no phases, leaves a cell priced only by finished cells of equal settings.
        """
        return {}

    def estimate_seconds(self, params: Mapping[str, Any], model: str, system: str,
                         calibration: Sequence[CellResult]) -> float | None:
        """Predicted seconds of a cell from finished cells of the same model and system
        (``calibration``, any profile); ``None`` when they cannot price it.

        Default: :func:`eqbench.cost.phase_estimate` over :meth:`cost_phases`. Override when
        the cost is not linear in counts, e.g. when repeats adapt to a time budget.
        """
        from eqbench.tasks.pricing import phase_estimate

        return phase_estimate(self, params, system, calibration)

    @abstractmethod
    def run_cell(self, ctx: CellContext) -> list[Record]:
        """Run one cell and return its records."""

    def plot(self, table: pandas.DataFrame, out_dir: Path) -> list[Path]:
        """Draw this task's figures from its rows of the long table (only ``status == "ok"``
        rows are passed) into ``out_dir``; returns the written files (PNG and SVG per figure).

        Reads nothing but ``table``: a figure can always be redrawn from ``results.csv``.
        The rows are those of one profile (:func:`eqbench.plots.write_task_plots` calls this once
        per profile and suffixes the file names when several are present) and carry the columns
        of :func:`eqbench.tasks.reporting.with_settings`: a figure must keep rows of different
        ``settings_key`` apart (never average them); the ``settings`` column names what differs.
        """
        return []

    def report_section(self) -> TaskSection | None:
        """What :mod:`eqbench.report` shows of this task (a
        :class:`~eqbench.tasks.reporting.TaskSection`: headline metrics and how they aggregate,
        conventions, the published rows beside them and their pairing, the paper's claims these
        rows decide), or ``None`` (default) for a task the report lists only by name."""
        return None
