"""log Z, ⟨u⟩ and H(p) of a system, computed once with production settings and cached beside its data.

Why: ``KL(p‖q) = NLL - H(p)`` (:mod:`eqbench.free_energy`) needs ``log Z`` on U to a few
hundredths of a nat, which costs minutes of annealed importance sampling (AIS, Neal 2001) per
system: it is computed once, on request (``eqbench log-z``) or on first use, and cached as
``<cache>/data/<system>-logz-<key>.json`` next to the reference data (:mod:`eqbench.data.store`),
written atomically. ``make data`` never computes it.

The record holds the forward AIS estimate (a stochastic lower bound) with its bootstrap error,
the reverse AIS estimate from the reference test data (a stochastic upper bound, the
bidirectional cross-check), ``⟨u⟩_p`` from the test data with its batch-means error, ``H(p)``,
and the diagnostics: acceptance and step size per temperature, ESS of the weights, wall time,
settings, seeds and code version. The key hashes the system, the settings and the format
version, so changed settings never reuse a stale value.

Production settings (one core, measured; see :data:`PRODUCTION_SETTINGS`) aim at a standard error
below ~0.05 nats on DW-4 and ~0.2 on LJ-13 within about 10 minutes per system (DW-4: 0.006 in
under a minute; LJ-13: 0.09, but a forward/reverse gap of 0.26 is its real uncertainty). The base scale ``σ`` of
each system is the root of its measured second moment ``⟨|x|²⟩_p / k`` (DW-2 5.5, DW-4 4.6,
LJ-13 0.50 on the test data): the isotropic normal on U closest to p.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from eqbench import free_energy
from eqbench.atomic import atomic_write_bytes
from eqbench.data import diagnostics as diag
from eqbench.data import store
from eqbench.errors import ConfigError, DataError
from eqbench.free_energy import AISSettings
from eqbench.systems.base import ParticleSystem

__all__ = ["LOG_Z_FORMAT_VERSION", "PRODUCTION_SETTINGS", "compute_log_z", "load_log_z", "log_z_method",
           "log_z_path", "mean_test_energy", "production_settings"]

#: Bump when the estimate changes in a way the settings do not capture.
LOG_Z_FORMAT_VERSION = 1

#: Per system: chains, temperatures, schedule power and base scale (module docstring for σ).
#: Harmonic: the base is the target (σ = 1), so AIS is exact and a check of the plumbing.
#: Measured (one torch thread on a 2-core machine shared with a benchmark; forward s / total s
#: with the reverse run; ± bootstrap s.e.; gap = reverse - forward):
#:
#: - dw2: 7.2547 ± 0.0033, reverse 7.2619 ± 0.0035, radial quadrature 7.2604; ESS 0.90; 2.6 / 4.7 s.
#: - dw4: 29.6665 ± 0.0063, reverse 29.6632 ± 0.0061 (gap -0.003); ESS 0.72; 26 / 48 s. Twice the
#:   temperatures (4,000, seed 7): 29.6761 ± 0.0050, 1.2 combined s.e. away.
#: - lj13: 2,000 chains x 5,000 temperatures gave 59.80 ± 0.10, reverse 60.54 ± 0.09: a gap of
#:   0.74, far above the statistical error, so the bias of finite K dominates. 1,000 chains x
#:   15,000 temperatures (the setting below): 59.975 ± 0.087, reverse 60.237 ± 0.075, gap 0.26
#:   (shrinking like 1/K); ESS 0.11; 405 / 583 s (rerun, same bits; 473 / 646 s the first time,
#:   with a second AIS job beside it) while a benchmark kept the machine's load at 3 on 2 cores.
#:   The gap, not the
#:   bootstrap error, is LJ-13's honest uncertainty: log Z lies in [59.98, 60.24] up to ~0.1.
PRODUCTION_SETTINGS: dict[str, AISSettings] = {
    "harmonic": AISSettings(n_chains=1000, n_temperatures=20, base_scale=1.0),
    "dw2": AISSettings(n_chains=10_000, n_temperatures=500, base_scale=2.35, n_pilot_chains=256),
    "dw4": AISSettings(n_chains=10_000, n_temperatures=2_000, base_scale=2.1, n_pilot_chains=256),
    "lj13": AISSettings(n_chains=1_000, n_temperatures=15_000, schedule_power=4.0, base_scale=0.7,
                        n_pilot_chains=256),
    # lj13-single: lj13's setting with σ from its own data (⟨|x|²⟩/k on U: 0.907 on the test
    # split; the single-count pair energy binds the cluster half as strongly, so it is wider).
    # Measured: 39.2609 ± 0.0347, ESS 0.44; reverse AIS 38.956 ± 0.358 (its ESS 0.007 of chains:
    # consistent, but too noisy to bound anything); 220 / 325 s beside two training processes.
    "lj13-single": AISSettings(n_chains=1_000, n_temperatures=15_000, schedule_power=4.0, base_scale=0.9,
                               n_pilot_chains=256),
    # lj55: sequential Monte Carlo (module docstring of eqbench.free_energy). Plain AIS with 256
    # chains x 3,000 temperatures gave 338.8 ± 3.9 with reverse AIS 410.0 (a gap of 71 nats, ESS
    # one chain); SMC with 64 chains in 4 populations gave 374.8 / 406.3 (gap 31) at 3,000
    # temperatures and 378.9 / 386.5 (gap 7.5) at 12,000: the gap shrinks like 1/K. One pilot
    # round per temperature is enough on a schedule this dense (its steps are smoothed over
    # K/50 neighbours). σ = 1.0 from the second moment of equilibrated chains (1.01). Measured
    # with this setting: 383.83 ± 0.63, reverse 384.65 ± 0.55 (gap 0.82), 106 / 90 resamplings,
    # 815 / 461 s (one thread, beside two training processes on 2 cores).
    "lj55": AISSettings(n_chains=128, n_temperatures=30_000, schedule_power=4.0, base_scale=1.0,
                        n_pilot_chains=32, pilot_rounds=1, resample_ess=0.5, n_groups=8),
}

Compute = Literal["auto", "never", "always"]

#: What a cached record must hold, with the JSON types.
_REQUIRED = {"system": str, "format": int, "key": str, "log_z": float, "log_z_stderr": float,
             "mean_energy": float, "mean_energy_stderr": float, "entropy": float, "entropy_stderr": float,
             "forward": dict, "settings": dict}


def production_settings(system: ParticleSystem) -> AISSettings:
    """The AIS settings of :data:`PRODUCTION_SETTINGS`; other systems get the defaults (σ = 1).

    Example:
        >>> from eqbench.components import get_system
        >>> production_settings(get_system("dw4")).base_scale
        2.1
    """
    return PRODUCTION_SETTINGS.get(system.name, AISSettings())


def _key(system: ParticleSystem, settings: AISSettings) -> str:
    recipe = {"format": LOG_Z_FORMAT_VERSION, "system": repr(system), "settings": settings.key_fields()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def log_z_path(system: ParticleSystem, settings: AISSettings | None = None) -> Path:
    """``<cache>/data/<system>-logz-<key>.json``: beside the system's reference data sets.

    Example:
        >>> from eqbench.components import get_system
        >>> log_z_path(get_system("dw4")).name.startswith("dw4-logz-")
        True
    """
    settings = settings or production_settings(system)
    return store.data_dir() / f"{system.name}-logz-{_key(system, settings)}.json"


def mean_test_energy(system: ParticleSystem) -> dict[str, Any]:
    """``⟨u⟩_p`` on the reference test split with its batch-means error over the independent chains.

    Why batch means: the stored rows of a chain are only as independent as the stride makes
    them. The test pool is stored step-major (row ``r`` from chain ``r mod n_chains``, SPEC §3,
    :func:`eqbench.data.store.generate_dataset`), so the energies reshape to
    ``[samples_per_chain, chains]`` and each chain's mean is one batch; when the generator
    dropped repeated rows the chains of later rows shift by one, which the record notes.

    Example:
        >>> from eqbench.components import get_system
        >>> abs(mean_test_energy(get_system("harmonic"))["mean"] - 4.5) < 0.1
        True
    """
    from eqbench.data.loading import load_data

    x = load_data(system, "test")
    _, meta = store.ensure_dataset(system, "test")
    chains = system.data_protocol.chains("test")
    u = system.energy(x).numpy()
    per_chain = len(u) // chains
    result = diag.batch_means(u[: per_chain * chains].reshape(per_chain, chains))
    return {"mean": result.mean, "stderr": result.stderr, "method": result.method, "n": int(len(u)),
            "duplicate_rows_dropped": int(meta.get("duplicate_rows_dropped", 0)),
            "generator_energy_mean": meta.get("energy_mean"), "generator_energy_stderr": meta.get("energy_stderr")}


def _code_version() -> dict[str, str]:
    """Package versions and the sha256 of the estimator's source (eqbench/free_energy.py)."""
    source = Path(free_energy.__file__).read_bytes()
    return {**store._versions(), "free_energy_sha256": hashlib.sha256(source).hexdigest()[:16]}


def compute_log_z(system: ParticleSystem, settings: AISSettings | None = None, *,
                  reverse: bool = True) -> dict[str, Any]:
    """Run the production AIS for ``system`` and return the record that :func:`load_log_z` caches.

    Why both directions: forward AIS from the base underestimates ``log Z`` in expectation,
    reverse AIS from the reference test data (exact samples of p up to the MCMC's quality)
    overestimates it; their difference bounds the bias of both (bidirectional Monte Carlo). The
    reverse run reuses the forward run's step sizes and takes ``min(n_chains, 10,000)`` test
    rows. The reported ``log_z`` is the forward estimate (it involves no reference data).

    Example:
        >>> from eqbench.components import get_system
        >>> record = compute_log_z(get_system("harmonic"), AISSettings(n_chains=100, n_temperatures=5))
        >>> round(record["log_z"], 4), round(record["entropy"], 1)
        (8.2704, 12.8)
    """
    from eqbench.data.loading import load_data

    settings = settings or production_settings(system)
    forward = free_energy.ais_log_z(system, settings)
    energy = mean_test_energy(system)
    h = free_energy.entropy(system, forward.log_z, energy["mean"], log_z_stderr=forward.log_z_stderr,
                            mean_energy_stderr=energy["stderr"])
    record: dict[str, Any] = {
        "system": system.name, "format": LOG_Z_FORMAT_VERSION, "key": _key(system, settings),
        "measure": f"Lebesgue measure on the CoM-free subspace U, dimension (N-1)D = {system.n_dof} "
                   "(the measure of every eqbench NLL; includes 0.5 (N-1) D log 2π like the prior)",
        "log_z": forward.log_z, "log_z_stderr": forward.log_z_stderr,
        "mean_energy": energy["mean"], "mean_energy_stderr": energy["stderr"], "mean_energy_detail": energy,
        "entropy": h.entropy, "entropy_stderr": h.entropy_stderr,
        "settings": dataclasses.asdict(settings), "forward": forward.summary(),
    }
    wall = forward.wall_s
    if reverse:
        n = min(settings.n_chains, system.data_protocol.size("test"))
        samples = load_data(system, "test", n=n, seed=settings.seed)
        back = free_energy.reverse_ais_log_z(system, samples, forward.step_sizes, settings)
        record["reverse"] = back.summary()
        record["bidirectional_gap"] = back.log_z - forward.log_z
        wall += back.wall_s
    record["wall_s"] = wall
    record["versions"] = _code_version()
    return record


def _check(record: Any, system: ParticleSystem, settings: AISSettings) -> str | None:
    """``None`` when ``record`` is a complete log-Z record of this system and these settings."""
    if not isinstance(record, dict):
        return "not a JSON object"
    lacking = [k for k, kind in _REQUIRED.items() if not isinstance(record.get(k), kind)
               or isinstance(record.get(k), bool)]
    if lacking:
        return f"lacks {', '.join(lacking)}"
    if record["system"] != system.name or record["key"] != _key(system, settings):
        return f"records system {record['system']!r} key {record['key']!r}, not this system's and settings'"
    if not all(math.isfinite(record[k]) for k in ("log_z", "log_z_stderr", "entropy")):
        return "holds a non-finite log Z"
    return None


def log_z_method(record: dict[str, Any], direction: str = "forward") -> str:
    """How a cached record's log Z was estimated, for the units of the numbers built on it:
    ``"<direction> AIS"``, or ``"<direction> SMC (AIS with resampling)"`` where the record's
    forward run resampled its populations (:class:`eqbench.free_energy.AISSettings`
    ``resample_ess``; LJ-55; the reverse run uses the same settings). The forward estimate is a
    lower bound in expectation of log Z, the reverse one an upper bound.

    Example:
        >>> log_z_method({"forward": {"resamplings": 12}}), log_z_method({"forward": {}}, "reverse")
        ('forward SMC (AIS with resampling)', 'reverse AIS')
    """
    forward = record.get("forward") or {}
    return f"{direction} {'SMC (AIS with resampling)' if forward.get('resamplings') is not None else 'AIS'}"


def load_log_z(system: ParticleSystem, settings: AISSettings | None = None, *,
               compute: Compute = "auto") -> dict[str, Any]:
    """The cached log-Z record of ``system`` (:func:`compute_log_z`), computed and cached when missing.

    ``compute="auto"`` computes a missing or broken record (warning for a broken one),
    ``"never"`` raises :class:`DataError` instead, ``"always"`` recomputes. Only computing takes
    the cache's lock; a verified record is read without writing anything (a read-only cache
    works). The returned dict carries ``path``.

    Example:
        >>> from eqbench.components import get_system
        >>> round(load_log_z(get_system("harmonic"))["log_z"], 3)   # harmonic: 4.5 log 2π
        8.27
    """
    if compute not in ("auto", "never", "always"):
        raise ConfigError(f"unknown compute mode {compute!r}; valid: auto, never, always")
    settings = settings or production_settings(system)
    path = log_z_path(system, settings)

    def read() -> tuple[dict[str, Any] | None, str]:
        if not path.exists():
            return None, f"{path} does not exist"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return None, f"{path} is unreadable ({type(exc).__name__})"
        problem = _check(record, system, settings)
        return (None, f"{path} {problem}") if problem else (record, "")

    if compute != "always":
        record, detail = read()
        if record is not None:
            return {**record, "path": str(path)}
        if compute == "never":
            raise DataError(f"{system.name} log Z is not cached: {detail}; run `python -m eqbench log-z {system.name}`")
    what = f"{system.name} log Z"
    store._writable_or_raise(path.parent, f"{what} must be computed", system.name)
    with store._exclusive(path):
        if compute != "always":
            record, detail = read()  # another process may have made it meanwhile
            if record is not None:
                return {**record, "path": str(path)}
            if path.exists():
                warnings.warn(f"{what}: {detail}; recomputing", stacklevel=2)
        previous = torch.get_num_threads()
        try:
            record = compute_log_z(system, settings)
        finally:
            torch.set_num_threads(previous)
        atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    return {**record, "path": str(path)}
