"""Training snapshots: a cell killed mid-training resumes where it stopped, bit for bit.

An E(n) CNF trained on LJ-13 with the λ-mix protocol runs for hours on a CPU core, longer than a
batch job or a time limit may allow. :func:`eqbench.train.fit` therefore writes, every
``every_s`` seconds, everything its next iteration depends on: the parameters, the optimiser's
moments, the data-sampling generator, torch's global random state (Hutchinson probes, reverse-KL
samples, augmentation draws), the loss history, the validation curve and the best checkpoint so
far. A rerun of the same cell (same cell id, so the same settings and code) finds the snapshot
and continues from it: every later random draw is the one the uninterrupted run would have made,
so the scored model and every number of the cell are the ones an uninterrupted run gives (the
tests compare both bit for bit). Only wall-clock records differ: a resumed fit counts the
training seconds of every run that contributed (``wall_s``), and the cell says it was resumed
(``provenance["resumed"]``).

A fit that ran at least ``every_s`` seconds also leaves a *final* snapshot with the returned
(selected) parameters, so a cell killed later, while scoring or in a second training phase
(bg-reweighting's λ-mix after its maximum-likelihood phase), does not train that phase again.
The snapshots of a cell live in ``<results>/cells/<task>/.snapshots/<cell_id>/``
(:meth:`eqbench.records.CellStore.snapshot_dir`), one file per :func:`~eqbench.train.fit` call in
the order the task makes them, and are removed once the cell is stored as finished.

A snapshot is used only when its fingerprint (the training settings and a digest of the
training and validation data) matches the fit that finds it; anything else starts afresh with a
warning, never silently mixing two runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqbench.atomic import atomic_write_bytes
from eqbench.errors import ConfigError
from eqbench.workers import as_seconds

__all__ = ["DEFAULT_SNAPSHOT_EVERY_S", "SnapshotPlan", "SnapshotSlot", "check_snapshot_interval", "fingerprint",
           "load_snapshot", "save_snapshot"]

#: Seconds of training between snapshots by default: a fit shorter than this writes none, and a
#: killed one loses at most this much.
DEFAULT_SNAPSHOT_EVERY_S = 600.0


def check_snapshot_interval(value: Any) -> float | None:
    """``value`` as seconds between snapshots: ``None`` or ``"off"`` for none, else a finite
    number >= 0 (0: after every iteration), or a one-line :class:`~eqbench.errors.ConfigError`.

    Example:
        >>> check_snapshot_interval("300"), check_snapshot_interval("off"), check_snapshot_interval(0)
        (300.0, None, 0.0)
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    seconds = as_seconds(value)
    if not (math.isfinite(seconds) and seconds >= 0):
        shown = value if isinstance(value, str) else repr(value)
        raise ConfigError(f"--snapshot-every (snapshot_every_s) must be a number of seconds >= 0 or 'off', got {shown}")
    return seconds


@dataclass(frozen=True)
class SnapshotSlot:
    """Where one :func:`~eqbench.train.fit` call keeps its snapshot and how often it writes it."""

    path: Path
    #: Seconds of training between snapshots (0: after every iteration).
    every_s: float
    #: Which training call of the cell this is (0, 1, ... in the order the task trains).
    index: int = 0


@dataclass
class SnapshotPlan:
    """The snapshots of one cell: a directory and an interval; hands out one
    :class:`SnapshotSlot` per training call, numbered in the order the task trains.

    Example:
        >>> import tempfile
        >>> plan = SnapshotPlan(Path(tempfile.mkdtemp()), every_s=600.0)
        >>> [slot.path.name for slot in (plan.next_slot(), plan.next_slot())]
        ['fit-0.pt', 'fit-1.pt']
    """

    directory: Path
    every_s: float = DEFAULT_SNAPSHOT_EVERY_S
    _calls: int = field(default=0, repr=False)
    #: ``{"fit": k, "iteration": i, "of": n}`` for every training call that resumed from a snapshot.
    resumed: list[dict[str, int]] = field(default_factory=list)

    @property
    def calls(self) -> int:
        """Training calls this cell has made so far."""
        return self._calls

    def next_slot(self) -> SnapshotSlot:
        slot = SnapshotSlot(Path(self.directory) / f"fit-{self._calls}.pt", float(self.every_s), self._calls)
        self._calls += 1
        return slot

    def describe(self) -> str:
        """What was resumed, for the cell's provenance: ``""`` when nothing was."""
        return "; ".join(f"fit {r['fit']} from iteration {r['iteration']} of {r['of']}" for r in self.resumed)


def fingerprint(config: dict[str, Any], *tensors: Any) -> str:
    """A digest of the training settings and the exact bytes of the data a fit uses.

    Example:
        >>> import torch
        >>> a = fingerprint({"lr": 1e-3}, torch.zeros(3))
        >>> a == fingerprint({"lr": 1e-3}, torch.zeros(3)), a == fingerprint({"lr": 2e-3}, torch.zeros(3))
        (True, False)
    """
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none")
            continue
        values = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tuple(values.shape)} {values.dtype}".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def save_snapshot(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, plain Python) atomically: a kill mid-write keeps the last one."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_snapshot(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The snapshot at ``path`` if it exists, is readable and belongs to this fit; else ``None``
    (with a warning saying why, when a file was there)."""
    import torch

    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001  (a damaged file: start afresh, say so)
        warnings.warn(f"ignoring unreadable training snapshot {path} ({type(exc).__name__}: {exc}); training afresh",
                      stacklevel=2)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint:
        warnings.warn(f"ignoring training snapshot {path}: made by a fit with other settings or data; training afresh",
                      stacklevel=2)
        return None
    return state
