"""Community reference data (``../shared/reference_data``): loaded as an alternative source.

These are the DW-4 and LJ-13 splits of equivariant flow matching as redistributed by DEM
(see the directory's README). Their known flaws are *reported*, never hidden: the DW-4 files
repeat rows (Metropolis rejections), overlap train/test by ~89 %, and keep the centre of mass;
the LJ-13 files have no training split in the snapshot. On load the CoM is removed, as eqbench
requires of every configuration (SPEC §1, §3).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eqbench.data import diagnostics as diag
from eqbench.errors import DataError
from eqbench.systems.base import ParticleSystem

__all__ = ["REFERENCE_FILES", "reference_data_dir", "load_reference_file", "reference_splits", "reference_report"]

#: (system, split) -> path relative to the reference-data directory.
REFERENCE_FILES: dict[tuple[str, str], str] = {
    ("dw4", "train"): "DEM/train_split_DW4.npy",
    ("dw4", "val"): "DEM/val_split_DW4.npy",
    ("dw4", "test"): "DEM/test_split_DW4.npy",
    ("lj13", "val"): "DEM/val_split_LJ13-1000.npy",
    ("lj13", "test"): "DEM/test_split_LJ13-1000.npy",
}


def reference_data_dir() -> Path | None:
    """``$EQBENCH_REFERENCE_DATA``, else ``shared/reference_data`` beside or inside the checkout."""
    configured = os.environ.get("EQBENCH_REFERENCE_DATA")
    if configured:
        return Path(configured).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    for candidate in (repo_root.parent / "shared" / "reference_data", repo_root / "shared" / "reference_data"):
        if candidate.is_dir():
            return candidate
    return None


def reference_splits(system: ParticleSystem) -> list[str]:
    """Splits of the community data available for ``system`` (possibly none)."""
    return [split for (name, split) in REFERENCE_FILES if name == system.name]


def _reference_path(system: ParticleSystem, split: str) -> Path:
    splits = reference_splits(system)
    if not splits:
        valid = sorted({name for name, _ in REFERENCE_FILES})
        raise DataError(f"no community reference data for system {system.name!r}; available for: {', '.join(valid)}")
    if split not in splits:
        raise DataError(f"no community {split!r} split for {system.name}; valid: {', '.join(splits)}")
    root = reference_data_dir()
    if root is None:
        raise DataError("community reference data not found; set EQBENCH_REFERENCE_DATA to the reference_data directory")
    return root / REFERENCE_FILES[(system.name, split)]


def load_reference_file(path: str | Path, system: ParticleSystem) -> tuple[np.ndarray, float]:
    """Load a ``[n, N*D]`` or ``[n, N, D]`` array as float64 ``[n, N, D]`` with the CoM removed.

    Returns the configurations and the largest |CoM| component before removal, so the caller
    can report how far the file was from CoM-free.
    """
    path = Path(path)
    try:
        raw = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"reference file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"reference file {path} is not a readable .npy array ({exc})") from None
    n_particles, n_dims = system.event_shape
    if raw.ndim == 2 and raw.shape[1] == n_particles * n_dims:
        raw = raw.reshape(-1, n_particles, n_dims)
    elif not (raw.ndim == 3 and raw.shape[1:] == (n_particles, n_dims)):
        raise DataError(
            f"reference file {path.name} has shape {raw.shape}; {system.name} expects "
            f"(n, {n_particles * n_dims}) or (n, {n_particles}, {n_dims})"
        )
    if not np.issubdtype(raw.dtype, np.floating):
        raise DataError(f"reference file {path.name} has dtype {raw.dtype}; expected floating point coordinates")
    x = raw.astype(np.float64)
    com = x.mean(axis=1, keepdims=True)
    return x - com, float(np.abs(com).max())


def load_reference(system: ParticleSystem, split: str) -> np.ndarray:
    """A community split for ``system``, CoM-free float64 ``[n, N, D]``."""
    return load_reference_file(_reference_path(system, split), system)[0]


def reference_report(system: ParticleSystem) -> dict[str, Any]:
    """Diagnostics of every community split of ``system``: the same quantities as eqbench's data.

    Standard errors here are naive (``std / sqrt(n_unique)``): the files carry no chain
    structure, so correlation between rows cannot be accounted for.
    """
    splits: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for split in reference_splits(system):
        path = _reference_path(system, split)
        x, max_com = load_reference_file(path, system)
        arrays[split] = x
        energies = system.energy(torch.from_numpy(x)).numpy()
        duplicates = diag.count_duplicate_rows(x)
        n_unique = len(x) - duplicates
        splits[split] = {
            "file": str(path),
            "sha256": diag.sha256_file(path),
            "n_samples": len(x),
            "duplicate_rows": duplicates,
            "unique_rows": n_unique,
            "max_abs_com_before_removal": max_com,
            "configurational_temperature": system.configurational_temperature(torch.from_numpy(x)),
            "energy_mean": float(energies.mean()),
            "energy_stderr_naive": float(energies.std(ddof=1) / np.sqrt(max(n_unique, 1))),
            "energy_std": float(energies.std()),
        }
    overlaps = {
        f"{a}/{b}": diag.count_overlapping_rows(arrays[a], arrays[b])
        for a, b in itertools.combinations(arrays, 2)
    }
    return {"system": system.name, "source": "community (DEM / EFM splits)", "splits": splits, "overlap_rows": overlaps}
