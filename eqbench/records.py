"""Results store: one record per measured value, one file per cell, one long table at the end.

Why this shape (DESIGN "One run, as data flows", steps 5-6):

* Long format (one row per value, numeric ``value`` column, metric names that carry their
  meaning) so plots and reports group and filter instead of parsing wide, formatted tables.
* One JSON file per cell, named by a hash of the cell's canonical config, written atomically
  (temp file in the same directory, fsync, ``os.replace``): a sweep killed at any moment leaves
  only whole files, a rerun skips cells that are done, and workers never share a file.
* Provenance (git sha, library versions, device, threads, host) travels with every row, so a
  number in ``results.csv`` can always be traced back to the code and machine that produced it.
* The store checks itself: a cell file counts only where the store would have written it (its
  name is its content's cell id, that id is the hash of its config, it sits in its task's
  directory), each cell id once, and an ``ok`` cell only with records. Anything else is skipped
  with a :class:`SkippedCellWarning` and listed (:meth:`CellStore.scan`), never silently dropped
  or counted twice; a skipped file at a cell's own path is rerun.
* Output locations are checked before any work (:func:`check_results_dir`), and a write that
  fails (a full disk) is one :class:`~eqbench.errors.OutputError` line, leaving no partial file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform as _platform
import re
import shutil
import socket
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.atomic import atomic_write_text, remove_orphaned_temps
from eqbench.errors import OutputError

if TYPE_CHECKING:  # pandas is only needed by collect(); keep `import eqbench.records` light
    import pandas

__all__ = [
    "RECORD_COLUMNS",
    "PROVENANCE_KEYS",
    "CELL_FAILED",
    "Record",
    "CellResult",
    "CellStore",
    "SkippedCell",
    "SkippedCellWarning",
    "check_output_file",
    "check_results_dir",
    "provenance",
    "canonical_json",
    "cell_id",
    "settings_key",
    "now_iso",
]

#: Keys returned by :func:`provenance`, in column order.
PROVENANCE_KEYS: tuple[str, ...] = (
    "git_sha",
    "eqbench_version",
    "torch_version",
    "python_version",
    "numpy_version",
    "device",
    "threads",
    "hostname",
    "platform",
)

#: Columns of the collected long table, in order.
RECORD_COLUMNS: tuple[str, ...] = (
    (
        "cell_id",
        "task",
        "system",
        "model",
        "variant",
        "n_train",
        "seed",
        "metric",
        "value",
        "unit",
        "step",
    )
    + ("profile", "settings_key", "capabilities", "density", "code_version", "status", "reason", "duration_s")
    + PROVENANCE_KEYS
    + ("started_at", "config_json")
)

#: Metric of the single row a failed cell contributes, so failures stay visible in the table.
CELL_FAILED = "cell_failed"

_STATUSES = ("ok", "failed")
_SORT_KEYS = ["task", "system", "model", "variant", "n_train", "seed", "metric", "step"]
_INT_COLUMNS = ("n_train", "seed", "step", "threads")
_FLOAT_COLUMNS = ("value", "duration_s")


@dataclass(frozen=True)
class Record:
    """One measured value; ``metric`` names its meaning (``nll_test``, ``ess_fraction``).

    ``value`` is coerced to ``float`` (NaN allowed: a diverged run is a result, not an error) and
    the integer fields to ``int``, so numpy/torch scalars from a task never reach the JSON layer.
    """

    task: str
    system: str
    model: str
    metric: str
    value: float
    unit: str = ""
    variant: str = ""
    n_train: int | None = None
    seed: int | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        if not self.metric:
            raise ValueError("Record.metric must be a non-empty name such as 'nll_test'")
        object.__setattr__(self, "value", float(self.value))
        for name in ("n_train", "seed", "step"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, int(v))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """Inverse of :meth:`to_dict`; unknown keys are ignored so newer files stay readable."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class CellResult:
    """Everything one cell (one task x system x model x config) produced, as stored on disk.

    ``status`` is ``"ok"`` or ``"failed"``; a failed cell keeps its ``reason`` (one line) and
    whatever records it had, and is rerun by the next sweep.
    """

    task: str
    cell_id: str
    config: dict[str, Any]
    status: str
    reason: str = ""
    started_at: str = ""
    duration_s: float = math.nan
    provenance: dict[str, Any] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    #: What the model is, from the runner's pre-flight check: ``capabilities`` (sorted list),
    #: ``density`` ("exact" or the estimate's description), ``n_parameters``, ``contract``.
    model_info: dict[str, Any] = field(default_factory=dict)
    #: Files kept beside the record (:mod:`eqbench.artifacts`): ``{name: {"path", "bytes", "sha256"}}``,
    #: paths relative to the results directory.
    artifacts: dict[str, Any] = field(default_factory=dict)

    @property
    def settings_key(self) -> str:
        """:func:`settings_key` of this cell's config."""
        return settings_key(self.config)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "cell_id": self.cell_id,
            "config": self.config,
            "status": self.status,
            "reason": self.reason,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "provenance": self.provenance,
            "records": [r.to_dict() for r in self.records],
            "model_info": self.model_info,
            "artifacts": self.artifacts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellResult:
        """Inverse of :meth:`to_dict`; raises KeyError/TypeError/ValueError if malformed."""
        status = data["status"]
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        duration = data.get("duration_s")
        return cls(
            task=str(data["task"]),
            cell_id=str(data["cell_id"]),
            config=dict(data["config"]),
            status=status,
            reason=str(data.get("reason") or ""),
            started_at=str(data.get("started_at") or ""),
            duration_s=math.nan if duration is None else float(duration),
            provenance=dict(data.get("provenance") or {}),
            records=[Record.from_dict(r) for r in data.get("records") or []],
            model_info=dict(data.get("model_info") or {}),
            artifacts=dict(data.get("artifacts") or {}),
        )


# -- provenance ---------------------------------------------------------------------------------


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _git_sha() -> str:
    """Sha of the checkout that holds the eqbench package, ``-dirty`` if tracked files changed.

    Asked with cwd = the package directory (never the caller's working directory), and only
    trusted when git actually tracks that directory: an installed copy inside some unrelated
    repository (a venv under a project) must report ``unknown``, not that project's sha.
    """
    pkg = Path(__file__).resolve().parent
    sha = _git(["rev-parse", "HEAD"], pkg)
    if not sha or not _git(["ls-files", "--", "."], pkg):
        return "unknown"
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], pkg)
    return f"{sha}-dirty" if dirty else sha


def _eqbench_version() -> str:
    try:
        return importlib.metadata.version("eqbench")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def provenance(device: str = "cpu") -> dict[str, Any]:
    """Where and with what a cell ran: the keys of :data:`PROVENANCE_KEYS`.

    torch and numpy are imported here, not at module import, so the CLI's listing commands stay
    fast; by the time a cell is recorded they are loaded anyway.
    """
    import numpy
    import torch

    return {
        "git_sha": _git_sha(),
        "eqbench_version": _eqbench_version(),
        "torch_version": str(torch.__version__),
        "python_version": _platform.python_version(),
        "numpy_version": str(numpy.__version__),
        "device": str(device),
        "threads": int(torch.get_num_threads()),
        "hostname": socket.gethostname(),
        "platform": _platform.platform(),
    }


def now_iso() -> str:
    """Current UTC time as ISO 8601 with offset, for ``CellResult.started_at``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- cell identity ------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    """Make the few non-JSON types that configs realistically hold canonical, refuse the rest."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "shape", None) == ():  # numpy / torch scalars
        return item()
    raise TypeError(f"cannot serialise {type(obj).__name__} in a config or record: {obj!r}")


def canonical_json(obj: Any) -> str:
    """One fixed text per value: sorted keys, no whitespace, floats as shortest round-trip repr.

    Why: the cell id is a hash of this text, so it must not depend on dict order or formatting.
    ``1`` and ``1.0`` stay different on purpose (an int seed is not a float).
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
    )


def cell_id(config: Mapping[str, Any]) -> str:
    """First 16 hex chars of sha256 of :func:`canonical_json` of the config (64 bits: ample)."""
    return hashlib.sha256(canonical_json(dict(config)).encode("utf-8")).hexdigest()[:16]


def settings_key(config: Mapping[str, Any]) -> str:
    """:func:`cell_id` of the config without its seed: the unit of aggregation everywhere.

    Two cells share a settings key exactly when they differ in nothing but the seed (same task,
    model, system, profile, every setting, code version), so averaging over the cells of one key
    is averaging over seeds and nothing else.

    Example:
        >>> a = {"task": "t", "model": "m", "system": "s", "profile": "quick", "seed": 0, "params": {"lr": 1e-3}}
        >>> settings_key(a) == settings_key({**a, "seed": 1}), settings_key(a) == settings_key({**a, "profile": "smoke"})
        (True, False)
    """
    return cell_id({k: v for k, v in config.items() if k != "seed"})


# -- the store ----------------------------------------------------------------------------------

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]+")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")

#: A results directory whose disk has less free space than this is refused before any work.
MIN_FREE_BYTES = 1 << 20


class SkippedCellWarning(UserWarning):
    """A cell file the store does not use (unreadable, misnamed, a duplicate, ok without records)."""


@dataclass(frozen=True)
class SkippedCell:
    """A file under ``cells/`` that is not used, and why (shown by ``collect`` and the report)."""

    path: str  #: relative to the results directory
    reason: str
    cell_id: str = ""  #: the id its content claims, where it could be read
    task: str = ""


class CellStore:
    """Per-cell result files under ``root/cells/<task>/<cell_id>.json`` and their collection."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.cells_dir = self.root / "cells"
        #: What the last :meth:`scan` (or :meth:`collect`) left out, with the reasons.
        self.skipped: list[SkippedCell] = []

    def __repr__(self) -> str:
        return f"CellStore({str(self.root)!r})"

    def path(self, task: str, cell_id: str) -> Path:
        """Where a cell lives. The task directory name is sanitised (a task given as a
        ``module:attr`` path must not create odd directories); the JSON inside keeps the real name.
        """
        if not _SAFE_ID.fullmatch(cell_id):
            raise ValueError(f"cell_id must match [A-Za-z0-9_-]+, got {cell_id!r}")
        task_dir = _UNSAFE_CHARS.sub("_", task).strip(".")
        if not task_dir:
            raise ValueError(f"task name {task!r} cannot be used as a directory name")
        return self.cells_dir / task_dir / f"{cell_id}.json"

    def artifact_dir(self, task: str, cell_id: str) -> Path:
        """Where a cell keeps its model and samples: ``root/artifacts/<task>/<cell_id>/``."""
        cell_file = self.path(task, cell_id)
        return self.root / "artifacts" / cell_file.parent.name / cell_id

    def snapshot_dir(self, task: str, cell_id: str) -> Path:
        """Where a running cell keeps its training snapshots (:mod:`eqbench.snapshots`):
        ``root/cells/<task>/.snapshots/<cell_id>/``, gone once the cell is stored as finished."""
        cell_file = self.path(task, cell_id)
        return cell_file.parent / ".snapshots" / cell_id

    def remove_snapshots(self, task: str, cell_id: str) -> None:
        """Forget a cell's training snapshots (it finished, or is to be run again from the start)."""
        shutil.rmtree(self.snapshot_dir(task, cell_id), ignore_errors=True)

    def write(self, cell: CellResult) -> Path:
        """Atomically write ``cell`` over any earlier result of the same cell; return its path.

        A finished cell's training snapshots are removed after it is written; a failed cell keeps
        them, so that a rerun after a time limit or a killed worker resumes its training.
        A write that fails (a full disk, a directory made read-only meanwhile) raises
        :class:`~eqbench.errors.OutputError` (one line) and leaves no partial file behind."""
        if cell.status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {cell.status!r}")
        path = self.path(cell.task, cell.cell_id)
        text = json.dumps(cell.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n"
        _write_or_explain(path, text, "cell")
        if cell.status == "ok":
            self.remove_snapshots(cell.task, cell.cell_id)
        return path

    def remove_orphaned_temps(self) -> list[Path]:
        """Remove temp files of writers that were killed mid-write (see
        :func:`eqbench.atomic.remove_orphaned_temps`); a resumed run calls this before it starts."""
        if not self.cells_dir.is_dir():
            return []
        return [p for d in sorted(self.cells_dir.iterdir()) if d.is_dir() for p in remove_orphaned_temps(d)]

    def _check(self, path: Path) -> tuple[CellResult | None, str]:
        """Parse one file and check that it is the cell the store would have written there:
        ``(cell, "")``; ``(what it holds or None, why it is not)``; ``(None, "")`` when it is gone."""
        try:
            with path.open(encoding="utf-8") as fh:
                cell = CellResult.from_dict(json.load(fh))
        except FileNotFoundError:
            return None, ""
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return None, f"unreadable ({type(exc).__name__}: {exc})".replace("\n", " ")
        try:
            expected = self.path(cell.task, cell.cell_id)
            hashed = cell_id(cell.config)
        except (ValueError, TypeError) as exc:
            return cell, f"not a valid cell ({exc})"
        if path.stem != cell.cell_id:
            return cell, (f"its name is not its content's cell id {cell.cell_id} "
                          "(a copy or a renamed file)")
        if path.parent.name != expected.parent.name:
            return cell, f"its task {cell.task!r} belongs in cells/{expected.parent.name}/, not here"
        if hashed != cell.cell_id:
            return cell, f"its cell id is not the hash of its config ({hashed}): edited, or written by other code"
        if "task" in cell.config and cell.config["task"] != cell.task:
            return cell, f"its task {cell.task!r} is not its config's task {cell.config['task']!r}"
        return cell, ""

    def _relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def _skip(self, path: Path, reason: str, *, rerun: bool, stacklevel: int = 3) -> SkippedCell:
        warnings.warn(f"ignoring cell file {path}: {reason}" + ("; it will be rerun" if rerun else ""),
                      SkippedCellWarning, stacklevel=stacklevel)
        return SkippedCell(self._relative(path), reason)

    def read(self, task: str, cell_id: str) -> CellResult | None:
        """The stored cell, or ``None`` if it is missing, unreadable or not this cell (with a
        warning; the cell is then rerun and its file atomically replaced)."""
        path = self.path(task, cell_id)
        cell, problem = self._check(path)
        if problem:
            self._skip(path, problem, rerun=True)
            return None
        return cell

    def is_done(self, task: str, cell_id: str) -> bool:
        """True only for a readable cell with status ``"ok"`` and at least one record: failed
        cells, and ``ok`` cells without records (a cell that records nothing is unfinished), are
        run again."""
        cell = self.read(task, cell_id)
        return cell is not None and cell.status == "ok" and bool(cell.records)

    def scan(self) -> tuple[list[CellResult], list[SkippedCell]]:
        """Every valid cell in sorted path order, and every ``*.json`` file under ``cells/<task>/``
        that is not used with the reason (also kept in :attr:`skipped`, each with a
        :class:`SkippedCellWarning`): unreadable, not named by its content's cell id (a copy
        under another name), in another task's directory, a cell id that is not the hash of its
        config, or a second file of one cell id. Temp files of writers are not cell files."""
        cells: list[CellResult] = []
        skipped: list[SkippedCell] = []
        seen: dict[str, Path] = {}
        if self.cells_dir.is_dir():
            for path in sorted(self.cells_dir.glob("*/*.json")):
                if path.name.startswith("."):
                    continue
                cell, problem = self._check(path)
                if not problem and cell is not None and cell.cell_id in seen:
                    problem = f"a second file of cell {cell.cell_id} (first: {self._relative(seen[cell.cell_id])})"
                if problem:
                    skip = self._skip(path, problem, rerun=problem.startswith("unreadable"), stacklevel=4)
                    skipped.append(dataclasses.replace(skip, cell_id=cell.cell_id if cell else "",
                                                       task=cell.task if cell else path.parent.name))
                elif cell is not None:
                    seen[cell.cell_id] = path
                    cells.append(cell)
        self.skipped = skipped
        return cells, skipped

    def iter_cells(self) -> Iterator[CellResult]:
        """Every valid cell (:meth:`scan`), in sorted path order; temp files are not cells, and
        broken, misnamed or duplicate files are skipped with a warning."""
        yield from self.scan()[0]

    def table(self) -> tuple[pandas.DataFrame, list[SkippedCell]]:
        """The long table of every valid cell (as :meth:`collect` writes it, without writing it)
        and the cell files left out, with the reasons (:meth:`scan`, plus ``ok`` cells without
        records: unfinished, rerun by the next run)."""
        import pandas as pd

        cells, skipped = self.scan()
        used = []
        for cell in cells:
            if cell.status == "ok" and not cell.records:
                path = self.path(cell.task, cell.cell_id)
                skip = self._skip(path, "status ok but no records: unfinished", rerun=True)
                skipped.append(dataclasses.replace(skip, cell_id=cell.cell_id, task=cell.task))
            else:
                used.append(cell)
        self.skipped = skipped
        rows = [row for cell in used for row in _rows(cell)]
        df = pd.DataFrame(rows, columns=list(RECORD_COLUMNS))
        for col in _INT_COLUMNS:
            df[col] = pd.array(df[col].tolist(), dtype="Int64")
        for col in _FLOAT_COLUMNS:
            df[col] = df[col].astype("float64")
        df = df.sort_values(_SORT_KEYS, kind="mergesort", na_position="last").reset_index(drop=True)
        return df, skipped

    def collect(self, out: Path | str | None = None) -> pandas.DataFrame:
        """Concatenate all cells into one long table with exactly :data:`RECORD_COLUMNS`.

        A failed cell contributes a single ``cell_failed`` row (value NaN, with its reason and
        every identifying setting of its config) and none of its partial records, so failures are
        visible but never mistaken for results. Each cell counts once, by cell id; the files left
        out are in :attr:`skipped` and ``df.attrs["skipped"]`` (:class:`SkippedCell`, with the
        reason). Rows are sorted deterministically and the CSV (default ``root/results.csv``) is
        written atomically, so a report never reads a half-written table.
        """
        df, skipped = self.table()
        out_path = self.root / "results.csv" if out is None else Path(out)
        _write_or_explain(out_path, df.to_csv(index=False), "results table")
        df.attrs["skipped"] = list(skipped)
        return df


def _write_or_explain(path: Path, text: str, what: str) -> None:
    """:func:`atomic_write_text`, with a failure (a full disk) as one :class:`OutputError` line;
    the atomic write has removed its temp file by then, so nothing partial is left."""
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise OutputError(f"cannot write the {what} {path}: {why}; cells finished before are stored, "
                          "so free space (or fix permissions) and run the same command again") from None


# -- output locations ---------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def _check_writable(directory: Path, label: str) -> None:
    """``directory`` (existing or to be made) can take new files: where it exists or would be
    made, writable, and with some free space on its disk."""
    probe = _nearest_existing(directory)
    if not probe.is_dir():
        raise OutputError(f"{label}: {probe} is a file, so no directory can be made under it")
    for place in (probe, directory / "cells") if probe == directory else (probe,):
        if place.is_dir() and not os.access(place, os.W_OK | os.X_OK):
            raise OutputError(f"{label}: {place} is not writable (permissions or a read-only file system); "
                              "choose another directory")
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < MIN_FREE_BYTES:
        raise OutputError(f"{label}: no space left on its disk ({free} bytes free at {probe})")


def check_results_dir(path: str | os.PathLike[str] | None, *, read: bool = False, write: bool = True,
                      what: str = "--results") -> Path:
    """Check a results directory before any work and return it as a :class:`~pathlib.Path`;
    raises :class:`~eqbench.errors.OutputError` (one line) when it cannot serve.

    Always refused: an empty name (``""`` would mean the current directory) and a path that is
    a file. ``read``: it must exist already (the commands that read results: ``collect``,
    ``report``, ``plot``), so a misspelt name is an error that creates nothing. ``write``: new
    files must be possible there (the directory, or its nearest existing parent, writable, and
    not a full disk). Runner, sweep, evaluate and the command line call this first.

    Example:
        >>> import tempfile
        >>> check_results_dir(tempfile.mkdtemp()).is_dir()
        True
        >>> check_results_dir("")
        Traceback (most recent call last):
        ...
        eqbench.errors.OutputError: --results is empty; name a results directory (e.g. results/quick)
    """
    if path is None or os.fspath(path) == "":
        raise OutputError(f"{what} is empty; name a results directory (e.g. results/quick)")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{what} {directory} is a file, not a results directory")
    if read and not directory.is_dir():
        parent = directory.parent
        near = []
        if parent.is_dir():
            import difflib

            siblings = [d.name for d in parent.iterdir() if d.is_dir()]
            near = difflib.get_close_matches(directory.name, siblings, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(str(parent / n) for n in near)}?" if near else \
            "; run a task first or pass --results DIR"
        raise OutputError(f"no results directory at {directory} (nothing to read){hint}")
    if write:
        _check_writable(directory, f"{what} {directory}")
    return directory


def check_output_file(path: str | os.PathLike[str], *, what: str = "--out") -> Path:
    """Check a file to be written (``--out``) before any work: a name, not a directory, in a
    directory that exists or can be made, writable, on a disk with space."""
    if os.fspath(path) == "":
        raise OutputError(f"{what} is empty; name a file")
    out = Path(path)
    if out.is_dir():
        raise OutputError(f"{what} {out} is a directory; name a file")
    _check_writable(out.parent, f"{what} {out}")
    return out


def _opt_int(value: Any) -> int | None:
    """Config values copied into integer columns; anything non-integral becomes missing."""
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _rows(cell: CellResult) -> list[dict[str, Any]]:
    """Flatten one cell into table rows, copying cell-level fields onto every row."""
    prov = cell.provenance
    info = cell.model_info
    common: dict[str, Any] = {
        "cell_id": cell.cell_id,
        "task": cell.task,
        "profile": str(cell.config.get("profile", "")),
        "settings_key": cell.settings_key,
        "capabilities": ";".join(info.get("capabilities", [])),
        "density": str(info.get("density", "")),
        "code_version": ";".join(f"{k}={v}" for k, v in sorted((cell.config.get("code") or {}).items())),
        "status": cell.status,
        "reason": cell.reason,
        "duration_s": cell.duration_s,
        **{key: prov.get(key) for key in PROVENANCE_KEYS},
        "started_at": cell.started_at,
        "config_json": canonical_json(cell.config),
    }
    if cell.status != "ok":
        # Every identifying setting comes from the config, as a task's records would carry it
        # (CellContext.record: ``n_train`` and ``variant`` are settings, under ``params``), so two
        # failed cells that differ in a setting stay two rows that say how they differ.
        cfg = cell.config
        params = cfg.get("params") if isinstance(cfg.get("params"), Mapping) else {}

        def setting(key: str) -> Any:
            return params.get(key, cfg.get(key))

        return [
            {
                **common,
                "system": str(cfg.get("system", "")),
                "model": str(cfg.get("model", "")),
                "variant": str(setting("variant") or ""),
                "n_train": _opt_int(setting("n_train")),
                "seed": _opt_int(cfg.get("seed")),
                "metric": CELL_FAILED,
                "value": math.nan,
                "unit": "",
                "step": None,
            }
        ]
    return [
        {**common, **{k: v for k, v in r.to_dict().items() if k != "task"}} for r in cell.records
    ]
