"""Reference data: generated once by MCMC, cached with a checksum and its diagnostics (SPEC §3).

Every data set lives in the cache directory (``$EQBENCH_CACHE``, default ``~/.cache/eqbench``),
never in the working directory, as ``<key>.npy`` plus ``<key>.json`` with the diagnostics and
the sha256 of the array file. The key hashes everything that determines the samples (system
parameters, protocol, split seed, format version), so a changed protocol never reuses stale
data. A missing or corrupt file is regenerated (deterministically: same seed, same samples).

Verification (``verify_dataset``, and every load) checks the array against its JSON (sha256,
shape, sample count, dtype, the diagnostics the reports read) and against what the system and
its protocol require (``[size(split), N, D]`` float64, the protocol and seed), so a truncated or
foreign pool with a self-consistent JSON is caught, not used. Reading a verified set takes no
lock and writes nothing (files are replaced atomically), so a read-only shared cache works; only
generation locks, and a cache that cannot be written when something must be generated is a
one-line :class:`DataError` naming the cache, the data set and the fix.

The training pool, the validation set and the test set come from disjoint chains with
different seeds (paper §7.3: "an independent 10,000 trajectory"); ``load_data`` draws subsets
from a split with a seeded permutation, so the subsets for one seed are nested
(10 ⊂ 100 ⊂ 1,000). Mean energies carry batch-means standard errors over the independent chains
(each chain's mean is one batch), and the diagnostics say so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from eqbench.atomic import atomic_save_npy, atomic_write_bytes
from eqbench.data import diagnostics as diag
from eqbench.data.mcmc import run_metropolis
from eqbench.errors import ConfigError, DataError
from eqbench.geometry import pairwise_distances
from eqbench.systems.base import DATA_SPLITS, ParticleSystem

__all__ = [
    "SPLITS",
    "ensure_datasets",
    "TEMPERATURE_TOLERANCE",
    "cache_dir",
    "check_data_available",
    "data_dir",
    "dataset_paths",
    "ensure_dataset",
    "checkpoint_path",
    "generate_dataset",
    "load_pool",
    "repair_hint",
    "subset",
    "verify_dataset",
]

#: Bump when the generated bits change in a way the protocol fields do not capture. Version 2:
#: validation split, burn-in from the slowest mode, batch-means errors in the diagnostics.
DATA_FORMAT_VERSION = 2
#: ``train`` (the training pool), ``val`` (model selection), ``test``: disjoint chains, own seeds.
SPLITS = DATA_SPLITS
#: The protocol's burn-in must be at least this many integrated autocorrelation times of the
#: slowest measured mode; the protocols aim at 20 or more, so the check fails only when a
#: measured time is twice what the protocol was designed for.
MIN_BURN_IN_OVER_AUTOCORRELATION = 10.0
#: The second half of the chains may not differ from the first by more than this many standard
#: errors (mean energy, mean pair distance): a larger drift means the burn-in was too short.
MAX_DRIFT_Z = 4.0
#: SPEC §3: the configurational temperature of reference data must lie within 1 ± 0.03.
TEMPERATURE_TOLERANCE = 0.03

Regenerate = Literal["auto", "never", "always"]


def cache_dir() -> Path:
    """Root of eqbench's cache: ``$EQBENCH_CACHE`` or ``~/.cache/eqbench``."""
    root = os.environ.get("EQBENCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "eqbench"


def data_dir() -> Path:
    """Where the data sets live: ``<cache>/data``."""
    return cache_dir() / "data"


def _cache_name() -> str:
    root = os.environ.get("EQBENCH_CACHE")
    return f"EQBENCH_CACHE={root}" if root else "the default cache, EQBENCH_CACHE unset"


_MOVE_CACHE = "point EQBENCH_CACHE at a directory you can write"


def _nearest_existing(directory: Path) -> Path:
    """``directory`` or its closest ancestor that exists (``exists`` is false under a file too)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory


def _check_location(directory: Path) -> None:
    """Raise :class:`DataError` when ``directory`` cannot be a directory (it or an ancestor is a
    file) or cannot be looked into; one that does not exist yet is fine (it is made on demand)."""
    try:
        existing = _nearest_existing(directory)
        if not existing.is_dir():
            raise DataError(f"the data cache {directory} cannot be used: {existing} is a file, not a directory "
                            f"({_cache_name()}); {_MOVE_CACHE}")
    except OSError as exc:
        raise DataError(f"the data cache {directory} cannot be read ({exc.strerror or type(exc).__name__}; "
                        f"{_cache_name()}); {_MOVE_CACHE}") from exc


def _is_writable(directory: Path) -> bool:
    """Whether files can be created in ``directory``, or (when missing) it can be created."""
    try:
        existing = _nearest_existing(directory)
        return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
    except OSError:
        return False


def repair_hint(names: str) -> str:
    """How to repair the data sets of systems ``names`` in the current cache (for one-line errors)."""
    if _is_writable(data_dir()):
        return f"run `python -m eqbench data {names} --regenerate`"
    return _read_only_fix(data_dir(), names)


def _read_only_fix(directory: Path, names: str) -> str:
    return (f"the data cache {directory} is not writable ({_cache_name()}): generate the data into it with write "
            f"access (`EQBENCH_CACHE={cache_dir()} python -m eqbench data {names}`), or {_MOVE_CACHE} "
            f"(data are generated there on first use)")


def _writable_or_raise(directory: Path, need: str, names: str) -> None:
    """Make ``directory`` if missing; raise a one-line :class:`DataError` saying ``need``, the
    cache and the fix when it cannot be made or written."""
    _check_location(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{need}, but the data cache {directory} cannot be created "
                        f"({exc.strerror or type(exc).__name__}; {_cache_name()}); {_MOVE_CACHE}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DataError(f"{need}; {_read_only_fix(directory, names)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def dataset_key(system: ParticleSystem, split: str) -> str:
    """File stem naming the system, the split and a hash of everything that fixes the samples."""
    _check_split(split)
    recipe = {
        "format": DATA_FORMAT_VERSION,
        "system": repr(system),
        "protocol": dataclasses.asdict(system.data_protocol),
        "split": split,
        "seed": system.data_protocol.seed(split),
        "n": system.data_protocol.size(split),
        "chains": system.data_protocol.chains(split),
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"{system.name}-{split}-{digest}"


def dataset_paths(system: ParticleSystem, split: str) -> tuple[Path, Path]:
    """``(array_path, diagnostics_path)`` of a data set in the cache."""
    stem = cache_dir() / "data" / dataset_key(system, split)
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an advisory lock so concurrent workers generate a data set once, not twice.

    Only generation takes it; reading a verified set does not. The caller has checked that the
    directory is writable; a lock file another user left, which this one may not write, is
    locked through a read-only descriptor (``flock`` needs no write access)."""
    lock = path.with_suffix(".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError as exc:
            raise DataError(f"cannot open the lock file {lock} ({exc.strerror}); {_MOVE_CACHE}") from exc
    except OSError as exc:
        raise DataError(f"cannot create the lock file {lock} ({exc.strerror}); {_MOVE_CACHE}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


#: Below this many pair terms per batched energy evaluation, extra threads only add
#: synchronisation: torch splits elementwise work only above ~32k elements (its grain size).
_THREADED_MIN_PAIR_TERMS = 32_768


@contextlib.contextmanager
def _all_cores(system: ParticleSystem, split: str) -> Iterator[None]:
    """Generate with every core when the batch is large enough to use them.

    A data set is made once, while the caller waits on it: the test suite runs with one thread,
    which made LJ-13 generation 1.5x slower. But for small batches (DW-2, DW-4: a few thousand
    pair terms per step) a second thread never gets work and its synchronisation cost dominates:
    on a busy 2-core machine, 2 threads made DW-2 generation 10x slower (measured, 25 s vs 2.7 s),
    so those keep the caller's thread count.
    """
    n_pairs = system.n_particles * (system.n_particles - 1) // 2
    threads = torch.get_num_threads()
    if system.data_protocol.chains(split) * n_pairs >= _THREADED_MIN_PAIR_TERMS:
        threads = max(threads, os.cpu_count() or 1)
    with _threads(threads):
        yield


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Exactly ``n`` torch threads inside the block, the caller's count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        eqbench_version = version("eqbench")
    except PackageNotFoundError:
        eqbench_version = "0+unknown"
    return {"eqbench": eqbench_version, "torch": torch.__version__, "numpy": np.__version__}


def _trace_every(stride: int) -> int:
    """Autocorrelation traces keep ~250 points per stride: the stride is at least one slowest
    autocorrelation time, so that resolves it, and the trace stays small for long chains."""
    return max(1, stride // 250)


def checkpoint_path(system: ParticleSystem, split: str) -> Path:
    """``<data set>.partial.npz``: the chains' state while a data set is generated (removed once
    it is written), from which a killed ``eqbench data`` resumes."""
    return dataset_paths(system, split)[0].with_suffix(".partial.npz")


def generate_dataset(
    system: ParticleSystem, split: str, *, progress: bool | None = None, checkpoint: Path | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the system's MCMC protocol for one split; return ``(samples [n, N, D], diagnostics)``.

    Samples are ordered step-major (every chain's first stored state, then every chain's
    second, ...), so any prefix spreads over many chains. Rows equal to an earlier row (a
    chain that did not move during a whole stride) are dropped and counted. The protocol's
    stride makes them rare (DW-4: about 1 in 10,000 at stride 1,000, from chains resting in
    the narrowest minima), and each chain stores one sample more than needed so the split
    still has ``n`` rows; dropping 1e-4 of the rows biases nothing measurable.
    ``checkpoint``: the chains' state file (:func:`eqbench.data.mcmc.run_metropolis`), so that a
    killed generation resumes where it stopped, with the same bits.
    """
    _check_split(split)
    protocol = system.data_protocol
    n = protocol.size(split)
    seed = protocol.seed(split)
    n_chains = protocol.chains(split)
    per_chain = math.ceil(n / n_chains) + 1
    run = run_metropolis(
        system,
        n_chains=n_chains,
        samples_per_chain=per_chain,
        burn_in=protocol.burn_in,
        stride=protocol.stride,
        step_size=protocol.step_size,
        seed=seed,
        trace_every=_trace_every(protocol.stride),
        progress=progress,
        description=f"{system.name} {split} MCMC",
        checkpoint=checkpoint,
    )
    flat = run.samples.reshape(-1, *system.event_shape)
    hashes = diag.row_hashes(flat)
    first_seen: dict[bytes, int] = {}
    for index, h in enumerate(hashes):
        first_seen.setdefault(h, index)
    keep = np.array(sorted(first_seen.values()))
    duplicates = len(hashes) - keep.size
    if keep.size < n:
        raise DataError(
            f"{system.name} {split}: only {keep.size} distinct samples for {n} requested "
            f"({duplicates} repeated rows); the protocol's stride {protocol.stride} is too short"
        )
    samples = flat[keep[:n]]
    tau = diag.integrated_autocorrelation_time(run.trace) * run.trace_every
    tau_distance = diag.integrated_autocorrelation_time(run.distance_trace) * run.trace_every
    slowest = max(tau, tau_distance)
    # Errors by batch means over the independent chains, never std/sqrt(rows): the rows of a
    # chain are only as independent as the stride makes them.
    energy = diag.batch_means(run.energies)
    chain_distances = pairwise_distances(torch.from_numpy(run.samples)).mean(dim=-1).numpy()
    distance = diag.batch_means(chain_distances)
    x = torch.from_numpy(samples)
    temperature, temperature_stderr = configurational_temperature_with_error(system, x)
    energies = system.energy(x).numpy()
    diagnostics = {
        "system": system.name,
        "split": split,
        "source": "eqbench-mcmc",
        "n_samples": int(samples.shape[0]),
        "shape": list(samples.shape),
        "dtype": str(samples.dtype),
        "seed": seed,
        "n_chains": n_chains,
        "samples_per_chain": per_chain,
        "protocol": dataclasses.asdict(protocol),
        "acceptance": run.acceptance,
        "configurational_temperature": temperature,
        "configurational_temperature_stderr": temperature_stderr,
        "energy_mean": energy.mean,
        "energy_stderr": energy.stderr,
        "energy_stderr_method": energy.method,
        "energy_std": float(energies.std()),
        "mean_distance_mean": distance.mean,
        "mean_distance_stderr": distance.stderr,
        "autocorrelation_time": tau,
        "autocorrelation_time_mean_distance": tau_distance,
        "autocorrelation_trace": f"first {run.trace.shape[1]} chains, every {run.trace_every} steps of "
                                 f"production ({run.trace.shape[0]} trace points, Sokal window)",
        "stride_over_autocorrelation": protocol.stride / slowest,
        "burn_in_over_autocorrelation": protocol.burn_in / slowest,
        "energy_drift_z": diag.drift_z(run.energies),
        "mean_distance_drift_z": diag.drift_z(chain_distances),
        "duplicate_rows_dropped": int(duplicates),
        "duplicate_rows": diag.count_duplicate_rows(samples),
        "max_abs_com": float(np.abs(samples.mean(axis=1)).max()),
        "burn_in_mean_energy_every_100": [round(float(v), 4) for v in run.burn_in_means],
        "wall_s": run.wall_s,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    diagnostics["checks"] = quality_checks(diagnostics)
    return samples, diagnostics


def configurational_temperature_with_error(
    system: ParticleSystem, x: torch.Tensor, n_bootstrap: int = 200, seed: int = 0
) -> tuple[float, float]:
    """``⟨|∇u|²⟩ / ⟨Δu⟩`` and its bootstrap standard error over rows.

    The error says how sharp the 1 ± 0.03 check is: about 0.005 for DW-4 and LJ-13 at 10,000
    samples, but about 0.017 for DW-2, whose two degrees of freedom make |∇u|² very broad.
    """
    grad_sq = system.gradient(x).pow(2).sum(dim=(-2, -1)).numpy()
    lap = system.laplacian(x).numpy()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(lap), size=(n_bootstrap, len(lap)))
    boot = grad_sq[idx].mean(axis=1) / lap[idx].mean(axis=1)
    return float(grad_sq.mean() / lap.mean()), float(boot.std(ddof=1))


def quality_checks(d: dict[str, Any]) -> dict[str, bool]:
    """The acceptance criteria of SPEC §3 evaluated on a diagnostics dict."""
    checks = {
        "temperature_within_3pct": abs(d["configurational_temperature"] - 1.0) <= TEMPERATURE_TOLERANCE,
        "no_duplicate_rows": d["duplicate_rows"] == 0,
        "com_free": d["max_abs_com"] < 1e-10,
    }
    if "stride_over_autocorrelation" in d:
        checks["stride_at_least_autocorrelation_time"] = d["stride_over_autocorrelation"] >= 1.0
    if "burn_in_over_autocorrelation" in d:
        checks["burn_in_long_enough"] = d["burn_in_over_autocorrelation"] >= MIN_BURN_IN_OVER_AUTOCORRELATION
    for key in ("energy_drift_z", "mean_distance_drift_z"):
        if key in d:  # NaN (one sample per chain) passes: there is no second half to compare
            checks[f"{key.removesuffix('_z')}_within_{MAX_DRIFT_Z:g}_se"] = not abs(d[key]) > MAX_DRIFT_Z
    return checks


#: What every data set's JSON must record (the diagnostics eqbench's reports and checks read),
#: with the JSON type of each; a JSON lacking one is corrupt (regenerated, or an error if it cannot be).
_NUMBER = (int, float)
REQUIRED_DIAGNOSTICS: dict[str, type | tuple[type, ...]] = {
    "system": str, "split": str, "sha256": str, "n_samples": int, "shape": list, "seed": int, "protocol": dict,
    "checks": dict, "acceptance": _NUMBER, "configurational_temperature": _NUMBER,
    "configurational_temperature_stderr": _NUMBER, "energy_mean": _NUMBER, "energy_stderr": _NUMBER,
    "mean_distance_mean": _NUMBER, "mean_distance_stderr": _NUMBER, "autocorrelation_time": _NUMBER,
    "autocorrelation_time_mean_distance": _NUMBER, "stride_over_autocorrelation": _NUMBER,
    "energy_drift_z": _NUMBER, "duplicate_rows": int, "duplicate_rows_dropped": int, "wall_s": _NUMBER,
}
#: The array type of every data set (the JSON of a set generated since this check says so too).
DATA_DTYPE = np.dtype(np.float64)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an ``.npy`` header, without reading the array."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        read = readers.get(version)
        if read is None:
            raise ValueError(f"npy format version {version}")
        shape, _, dtype = read(handle)
    return tuple(shape), np.dtype(dtype)


def _shape_text(shape: Any) -> str:
    return "(" + ", ".join(str(v) for v in shape) + ")"


def _inspect(system: ParticleSystem, split: str) -> tuple[str, str, dict[str, Any] | None]:
    """``(state, detail, diagnostics)``: the checks of :func:`verify_dataset`, and the JSON when ok."""
    _check_split(split)
    array_path, meta_path = dataset_paths(system, split)
    _check_location(array_path.parent)
    try:
        have_array, have_meta = array_path.exists(), meta_path.exists()
    except OSError as exc:  # a directory that cannot be searched
        raise DataError(f"the data cache {array_path.parent} cannot be read "
                        f"({exc.strerror or type(exc).__name__}; {_cache_name()}); {_MOVE_CACHE}") from exc
    if not have_array and not have_meta:
        return "missing", f"{array_path} does not exist", None
    if not have_array or not have_meta:
        return "corrupt", f"one of {array_path.name} / {meta_path.name} is missing in {array_path.parent}", None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return "corrupt", f"{meta_path} is unreadable ({type(exc).__name__})", None
    if not isinstance(meta, dict):
        return "corrupt", f"{meta_path} holds a JSON {type(meta).__name__}, not the diagnostics", None
    lacking = [key for key, kind in REQUIRED_DIAGNOSTICS.items()
               if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool)]
    if lacking:
        more = f" and {len(lacking) - 4} more" if len(lacking) > 4 else ""
        return "corrupt", f"{meta_path} lacks its diagnostics {', '.join(lacking[:4])}{more}", None
    protocol = system.data_protocol
    required = (protocol.size(split), *system.event_shape)
    recorded = {key: meta[key] for key in ("system", "split", "seed", "protocol")}
    expected = {"system": system.name, "split": split, "seed": protocol.seed(split),
                "protocol": dataclasses.asdict(protocol)}
    wrong = [key for key in expected if recorded[key] != expected[key]]
    if wrong:
        return "corrupt", (f"{meta_path} records {', '.join(f'{k} {recorded[k]!r}' for k in wrong)}, "
                           f"expected {', '.join(f'{expected[k]!r}' for k in wrong)}"), None
    try:
        actual = diag.sha256_file(array_path)
        shape, dtype = _npy_header(array_path)
    except (OSError, ValueError) as exc:
        return "corrupt", f"{array_path} is not a readable .npy file ({type(exc).__name__}: {exc})", None
    if actual != meta["sha256"]:
        return "corrupt", f"{array_path} has sha256 {actual[:12]}..., expected {meta['sha256'][:12]}...", None
    if list(shape) != meta["shape"] or meta["n_samples"] != (shape[0] if shape else None):
        return "corrupt", (f"{array_path} holds shape {_shape_text(shape)}, its JSON records shape "
                           f"{_shape_text(meta['shape'])} and {meta['n_samples']} samples"), None
    if shape != required:
        return "corrupt", (f"{array_path} holds shape {_shape_text(shape)}; {system.name} {split} requires "
                           f"{_shape_text(required)} ({required[0]} samples of {system.n_particles} particles "
                           f"in {system.n_dims} dimensions)"), None
    if dtype != DATA_DTYPE or meta.get("dtype", DATA_DTYPE.name) != DATA_DTYPE.name:
        return "corrupt", (f"{array_path} holds {dtype} (its JSON records {meta.get('dtype', 'no dtype')}); "
                           f"reference data are {DATA_DTYPE}"), None
    return "ok", str(array_path), meta


def verify_dataset(system: ParticleSystem, split: str) -> tuple[str, str]:
    """``(state, detail)`` with state ``"ok"``, ``"missing"`` or ``"corrupt"``; never raises for bad files.

    Ok means: the array's sha256 is the one its JSON records, the JSON carries the diagnostics
    (:data:`REQUIRED_DIAGNOSTICS`) for this system, split, seed and protocol, and the array's
    shape and dtype are those the JSON records and the ones the protocol requires
    (``[size(split), N, D]``, float64). A cache location that cannot hold data (a file) raises
    :class:`DataError`.
    """
    state, detail, _ = _inspect(system, split)
    return state, detail


def ensure_dataset(
    system: ParticleSystem,
    split: str,
    *,
    regenerate: Regenerate = "auto",
    progress: bool | None = None,
    threads: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Make sure a verified data set is in the cache; return ``(array_path, diagnostics)``.

    ``regenerate="auto"`` regenerates a missing or corrupt set (with a warning for a corrupt
    one), ``"never"`` raises :class:`DataError` instead, ``"always"`` regenerates regardless.
    ``threads``: torch threads for generating; ``None`` lets a large batch use every core
    (:func:`_all_cores`). Workers of :func:`ensure_datasets` pin 1: each core already runs one.
    A verified set is read without a lock and without writing anything, so a read-only cache
    works; one that must be generated in a cache that cannot be written is a :class:`DataError`.
    """
    if regenerate not in ("auto", "never", "always"):
        raise ConfigError(f"unknown regenerate mode {regenerate!r}; valid: auto, never, always")
    array_path, meta_path = dataset_paths(system, split)
    what = f"{system.name} {split} reference data"
    state, detail, meta = ("ok", "", None) if regenerate == "always" else _inspect(system, split)
    if state == "ok" and meta is not None:
        # Files are replaced atomically, so a verified file is whole: no lock needed to read it.
        return array_path, {**meta, "path": str(array_path)}
    if regenerate == "never" and not _is_writable(array_path.parent):
        raise DataError(f"{what} is {state}: {detail}; {repair_hint(system.name)}")
    need = f"{what} must be regenerated" if regenerate == "always" else f"{what} is {state} ({detail})"
    _writable_or_raise(array_path.parent, need, system.name)
    with _exclusive(array_path):
        state, detail, meta = _inspect(system, split)  # another process may have made it meanwhile
        if state == "ok" and meta is not None and regenerate != "always":
            return array_path, {**meta, "path": str(array_path)}
        if regenerate == "never":
            raise DataError(f"{what} is {state}: {detail}; {repair_hint(system.name)}")
        if state == "corrupt":
            warnings.warn(f"{what} is corrupt ({detail}); regenerating", stacklevel=2)
        with _all_cores(system, split) if threads is None else _threads(threads):
            samples, diagnostics = generate_dataset(system, split, progress=progress,
                                                    checkpoint=checkpoint_path(system, split))
        try:
            atomic_save_npy(array_path, samples)
            diagnostics["sha256"] = diag.sha256_file(array_path)
            diagnostics["path"] = str(array_path)
            atomic_write_bytes(meta_path, (json.dumps(diagnostics, indent=2) + "\n").encode())
            checkpoint_path(system, split).unlink(missing_ok=True)
        except OSError as exc:  # e.g. a full disk, or a network file system refusing what os.access allowed
            raise DataError(f"{what} was generated but cannot be written to {array_path.parent} "
                            f"({exc.strerror or type(exc).__name__}; {_cache_name()}); {_MOVE_CACHE}") from exc
    failed = [name for name, ok in diagnostics["checks"].items() if not ok]
    if failed:
        warnings.warn(f"{system.name} {split} reference data fails checks: {', '.join(failed)}", stacklevel=2)
    return array_path, diagnostics


def check_data_available(systems: list[ParticleSystem], splits: tuple[str, ...] = SPLITS) -> None:
    """Refuse before any work when data sets are missing or corrupt and cannot be generated.

    With a writable cache this does nothing (what is missing is generated on first use); with a
    read-only one (a shared cluster cache) or an unusable ``EQBENCH_CACHE`` it raises one
    :class:`DataError` naming the cache, every data set concerned and the fix.
    """
    bad = [(system, split, state) for system in systems for split in splits
           if (state := _inspect(system, split)[0]) != "ok"]
    if bad:
        names = " ".join(dict.fromkeys(system.name for system, _, _ in bad))
        listing = ", ".join(f"{system.name} {split} ({state})" for system, split, state in bad)
        _writable_or_raise(data_dir(), f"reference data {listing} must be generated", names)


def load_pool(
    system: ParticleSystem, split: str, *, regenerate: Regenerate = "auto", progress: bool | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """The whole verified data set of a split as ``[n, N, D]`` float64, with its diagnostics."""
    path, diagnostics = ensure_dataset(system, split, regenerate=regenerate, progress=progress)
    try:
        samples = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read ({type(exc).__name__}: {exc}); "
                        f"{repair_hint(system.name)}") from exc
    required = (system.data_protocol.size(split), *system.event_shape)
    if samples.shape != required or samples.dtype != DATA_DTYPE:
        # Verified a moment ago: only a file replaced since (by hand) gets here.
        raise DataError(f"{path} holds {samples.dtype} of shape {_shape_text(samples.shape)}; "
                        f"{system.name} {split} requires {DATA_DTYPE} of shape {_shape_text(required)}; {repair_hint(system.name)}")
    return samples, diagnostics


def subset(pool: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """``n`` rows of ``pool`` chosen by a seeded permutation (nested in ``n`` for a fixed seed)."""
    if n is None:
        return pool
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ConfigError(f"sample count must be an integer, got {n!r}")
    if n < 1 or n > len(pool):
        raise ConfigError(f"sample count must be between 1 and {len(pool)} (the size of the pool), got {n}")
    order = np.random.default_rng(seed).permutation(len(pool))
    return pool[order[:n]]


def _ensure_in_worker(system: ParticleSystem, split: str, regenerate: Regenerate) -> tuple[str, float]:
    """One data set in a worker process of :func:`ensure_datasets`, on one torch thread.

    Pinned, not left to :func:`_all_cores`: two workers that each raise their batch to every
    core run 4 threads on 2 cores, and LJ-55's train and test splits (whose 25-chain batches pass
    its threshold) then had not finished after 46 CPU-minutes each, their threads mostly waiting
    at OpenMP barriers.
    """
    start = time.perf_counter()
    ensure_dataset(system, split, regenerate=regenerate, progress=False, threads=1)
    return f"{system.name} {split}", time.perf_counter() - start


def ensure_datasets(systems: list[ParticleSystem], *, jobs: int = 1, regenerate: Regenerate = "auto",
                    on_done: Callable[[str, float], None] | None = None) -> None:
    """Make sure every split of every system is cached, ``jobs`` data sets at a time.

    ``on_done(label, seconds)`` is called as each data set is ready (``"lj55 train"``, the wall
    time it took): workers show no progress bar, and an LJ-55 split takes tens of minutes.

    Why: one Metropolis run of LJ-13's small batches keeps one core busy (a second thread only
    adds synchronisation, see :func:`_all_cores`), so on a 2-core machine two splits generated
    side by side in separate processes take half the time of one after the other. Each worker is
    a spawned process with one torch thread; splits are started largest first. Generation is
    deterministic per data set, so the files are the same bits either way.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    todo = [(system, split) for system in systems for split in SPLITS
            if regenerate == "always" or verify_dataset(system, split)[0] != "ok"]
    if todo:  # refuse before starting any worker when the cache cannot take them
        names = " ".join(dict.fromkeys(system.name for system, _ in todo))
        listing = ", ".join(f"{system.name} {split}" for system, split in todo)
        _writable_or_raise(data_dir(), f"reference data {listing} must be generated", names)
    if jobs <= 1 or len(todo) <= 1:
        for system, split in todo:
            start = time.perf_counter()
            ensure_dataset(system, split, regenerate=regenerate)
            if on_done is not None:
                on_done(f"{system.name} {split}", time.perf_counter() - start)
        return
    todo.sort(key=lambda pair: -pair[0].data_protocol.size(pair[1]) * pair[0].n_particles ** 2)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_ensure_in_worker, system, split, regenerate) for system, split in todo]
        for future in as_completed(futures):
            label, seconds = future.result()
            if on_done is not None:
                on_done(label, seconds)
