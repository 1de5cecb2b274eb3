"""Command line: ``python -m eqbench {list,describe,data,log-z,run,collect}``.

A thin layer over :mod:`eqbench.api`. Invalid input (an unknown name, a malformed ``--set``, a
corrupt data file) prints one line naming what is wrong and what is valid, and exits with 2;
``list`` and ``describe`` of systems/tasks work without importing torch.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eqbench import catalog  # noqa: F401  (registers the built-ins)
from eqbench import components
from eqbench.config import TRAINING_DEFAULTS, TRAINING_HELP
from eqbench.errors import EqbenchError, UnknownNameError
from eqbench.registry import MODELS, SYSTEMS, TASKS, Registry
from eqbench.snapshots import DEFAULT_SNAPSHOT_EVERY_S, check_snapshot_interval
from eqbench.workers import check_time_limit

EXAMPLES = """\
examples:
  python -m eqbench list                                  # systems, models, tasks and their origin
  python -m eqbench list models --params                  # with parameter counts as built
  python -m eqbench describe lj13                         # energy and conventions of a system
  python -m eqbench data dw4 lj13                         # generate/verify reference data, print diagnostics
  python -m eqbench data dw4 --source community           # diagnostics of the public DEM/EFM files
  python -m eqbench log-z dw4 lj13                        # log Z on U by AIS (cached), <u>, H(p), diagnostics
  python -m eqbench run --task test-nll --model gaussian --system dw4 --profile smoke
  python -m eqbench run --task test-nll --model gaussian --system lj13 --set n_train=[10,1000]
  python -m eqbench collect                               # results/cells/* -> results/results.csv
  python -m eqbench report --results results              # one self-contained HTML page: claims, plots, tables
  python -m eqbench demo                                  # every claim of the paper from 3 seeds, ~15 min on 2 cores
"""

KINDS: dict[str, Registry[Any]] = {"systems": SYSTEMS, "models": MODELS, "tasks": TASKS}


def _print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------------------------------- list
def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    for index, kind in enumerate(kinds):
        if index:
            print()
        print(f"{kind}:")
        if kind == "models" and args.params:
            rows = [(e.name, e.origin, *_parameter_counts(e.name), e.description) for e in KINDS[kind].entries()]
            _print_table(rows, ("name", "origin", "params dw4", "params lj13", "description"))
        else:
            rows = [(e.name, e.origin, e.description) for e in KINDS[kind].entries()]
            _print_table(rows, ("name", "origin", "description"))
    return 0


def _parameter_counts(model: str) -> list[str]:
    """Trainable parameters of the model's default configuration on dw4 and lj13, as built."""
    from eqbench.api import build_model

    counts = []
    for system in ("dw4", "lj13"):
        try:
            counts.append(f"{build_model(model, system).n_parameters:,}")
        except Exception as exc:  # a broken plugin must not break the listing
            counts.append(f"error: {type(exc).__name__}")
    return counts


# ------------------------------------------------------------------------------------ describe
def cmd_describe(args: argparse.Namespace) -> int:
    name = args.name
    found = False
    if name in SYSTEMS:
        from eqbench.api import get_system

        print(get_system(name).describe())
        found = True
    if name in TASKS:
        task = TASKS.get(name)
        print(f"task {name}: {task.summary}")
        print(f"  systems: {', '.join(task.systems) if task.systems else 'any'}; models: "
              + (f"those with capabilities {', '.join(task.requires)}" if task.requires else "any registered")
              + (f"; grid axes: {', '.join(task.grid_axes)}" if task.grid_axes else "") + "\n")
        module_doc = sys.modules[type(task).__module__].__doc__ or ""
        print(textwrap.dedent(module_doc).strip() or textwrap.dedent(type(task).__doc__ or "").strip())
        print("\nprofiles:")
        for profile in task.profiles():
            params = {k: v for k, v in task.profile(profile).items() if k not in TRAINING_DEFAULTS}
            print(f"  {profile}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        if task.trains:
            print("\ntraining settings (every profile; the paper's protocol unless a profile sets them; --set KEY=VALUE,"
                  " or a per-model table --set 'lr={default=5e-3, real-nvp=1e-3}'):")
            for key, value in TRAINING_DEFAULTS.items():
                shown = {p: task.profile(p)[key] for p in task.profiles()}
                values = ", ".join(f"{p}={v}" for p, v in shown.items()) if len(set(map(str, shown.values()))) > 1 \
                    else str(value if not shown else next(iter(shown.values())))
                print(f"  {key} = {values}: {TRAINING_HELP[key]}")
        found = True
    if name in MODELS:
        entry = MODELS.entry(name)
        builder = MODELS.get(name)
        module = sys.modules.get(getattr(builder, "__module__", ""), None)
        print(f"model {name} ({entry.origin}, {entry.target}): {entry.description}\n")
        print(textwrap.dedent((module.__doc__ if module else None) or builder.__doc__ or "").strip())
        found = True
    if not found:
        raise UnknownNameError("system, model or task", name, [*SYSTEMS.names(), *MODELS.names(), *TASKS.names()])
    return 0


# ---------------------------------------------------------------------------------------- data
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_eqbench_diagnostics(name: str, split: str, d: dict[str, Any]) -> None:
    checks = d.get("checks", {})
    failed = [k for k, ok in checks.items() if not ok]
    print(f"{name} {split}: {d['n_samples']} samples  ({'all checks pass' if not failed else 'FAILED: ' + ', '.join(failed)})")
    rows = [
        ("acceptance", _fmt(d["acceptance"])),
        ("configurational temperature", f"{d['configurational_temperature']:.4f} ± "
                                        f"{d['configurational_temperature_stderr']:.4f}  (must be 1 ± 0.03)"),
        ("mean energy", f"{d['energy_mean']:.4f} ± {d['energy_stderr']:.4f}  (kT, ± s.e. by "
                        f"{d.get('energy_stderr_method', 'batch means over chains')})"),
        ("autocorrelation time", f"energy {d['autocorrelation_time']:.1f}, mean distance "
                                 f"{d['autocorrelation_time_mean_distance']:.1f} steps  (stride "
                                 f"{d['protocol']['stride']} = {d['stride_over_autocorrelation']:.1f}x the larger)"),
        ("burn-in", f"{d['protocol']['burn_in']} steps = "
                    f"{d.get('burn_in_over_autocorrelation', float('nan')):.1f}x the larger autocorrelation time"),
        ("drift (2nd - 1st half)", f"energy {d['energy_drift_z']:.2f} s.e., mean distance "
                                   f"{d.get('mean_distance_drift_z', float('nan')):.2f} s.e."),
        ("duplicate rows", f"{d['duplicate_rows']}  (dropped while generating: {d['duplicate_rows_dropped']})"),
        ("chains x samples, step", f"{d.get('n_chains', d['protocol']['n_chains'])} x "
                                   f"{d.get('samples_per_chain', '?')}, {d['protocol']['step_size']}"),
        ("seed", d["seed"]),
        ("generation wall time", f"{d['wall_s']:.1f} s"),
        ("sha256", d.get("sha256", "")[:16] + "..."),
        ("file", d.get("path", "")),
    ]
    for key, value in rows:
        print(f"  {key:<31} {value}")


def _print_on_request_note() -> None:
    """Say which registered systems a bare ``eqbench data`` / ``log-z`` leaves out, and how to make them."""
    skipped = [name for name in components.DATA_ON_REQUEST if name in SYSTEMS.names()]
    if skipped:
        print(f"(not covered without arguments: {', '.join(skipped)}; name them to make theirs, e.g. "
              f"`python -m eqbench data {skipped[0]}`)")


def cmd_data(args: argparse.Namespace) -> int:
    from eqbench.components import get_system
    from eqbench.data import diagnostics as diag
    from eqbench.data import external, store

    systems = args.systems or components.default_data_systems()
    if not args.systems and not args.json:
        _print_on_request_note()
    exit_code = 0
    report: dict[str, Any] = {}
    unverified: dict[str, list[str]] = {}
    regenerate = "always" if args.regenerate else "auto"
    if args.source == "eqbench" and not args.verify:  # a read-only cache lacking data: refuse up front
        store.check_data_available([get_system(name) for name in systems])
    if args.jobs > 1 and args.source == "eqbench" and not args.verify:
        store.ensure_datasets([get_system(name) for name in systems], jobs=args.jobs, regenerate=regenerate,
                              on_done=lambda label, seconds: print(f"{label}: ready ({seconds:.0f} s)",
                                                                   file=sys.stderr, flush=True))
        regenerate = "auto"  # made just now: the loop below only reads and prints them
    for name in systems:
        system = get_system(name)
        if args.source == "community":
            result = external.reference_report(system) if external.reference_splits(system) else None
            if result is None:
                print(f"{name}: no community reference data")
                continue
            report[name] = result
            if not args.json:
                print(f"{name} community data ({result['source']}):")
                for split, d in result["splits"].items():
                    print(f"  {split}: {d['n_samples']} rows, {d['unique_rows']} unique ({d['duplicate_rows']} repeated), "
                          f"max |CoM| before removal {d['max_abs_com_before_removal']:.3g}, "
                          f"T_conf {d['configurational_temperature']:.4f}, "
                          f"<u> {d['energy_mean']:.4f} ± {d['energy_stderr_naive']:.4f} (naive s.e.)")
                for pair, count in result["overlap_rows"].items():
                    print(f"  overlap {pair}: {count} rows")
            continue
        arrays = {}
        for split in store.SPLITS:
            if args.verify:
                state, detail = store.verify_dataset(system, split)
                print(f"{name} {split}: {state} ({detail})")
                exit_code = exit_code or (0 if state == "ok" else 2)
                if state != "ok":
                    unverified.setdefault(name, []).append(split)
                continue
            path, d = store.ensure_dataset(system, split, regenerate=regenerate)
            report.setdefault(name, {})[split] = d
            arrays[split] = store.load_pool(system, split)[0]
            if not args.json:
                _print_eqbench_diagnostics(name, split, d)
        if len(arrays) > 1:
            splits = list(arrays)
            for k, first in enumerate(splits):
                for second in splits[k + 1:]:
                    overlap = diag.count_overlapping_rows(arrays[first], arrays[second])
                    report[name][f"{first}_{second}_overlap_rows"] = overlap
                    if not args.json:
                        print(f"{name} {first}/{second} overlap: {overlap} rows")
            if not args.json:
                print()
    if unverified:
        listing = ", ".join(f"{name} {' '.join(splits)}" for name, splits in unverified.items())
        print(f"eqbench: error: reference data {listing} missing or corrupt; {store.repair_hint(' '.join(unverified))}",
              file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    return exit_code


# --------------------------------------------------------------------------------------- log-z
def cmd_log_z(args: argparse.Namespace) -> int:
    """log Z on U by annealed importance sampling, ⟨u⟩ and H(p) per system (computed once, cached)."""
    from eqbench.components import get_system
    from eqbench.data import log_z

    systems = [get_system(name) for name in (args.systems or components.default_data_systems())]  # bad names fail first
    if not args.systems and not args.json:
        _print_on_request_note()
    compute = "always" if args.recompute else ("never" if args.cached_only else "auto")
    report: dict[str, Any] = {}
    for system in systems:
        record = log_z.load_log_z(system, compute=compute)
        report[system.name] = record
        if args.json:
            continue
        fwd = record["forward"]
        settings = record["settings"]
        smc = settings.get("n_groups") is not None
        method, units = ("SMC", f"{settings.get('n_groups')} populations") if smc else ("AIS", "chains")
        rows = [
            (f"log Z (forward {method})",
             f"{record['log_z']:.4f} ± {record['log_z_stderr']:.4f}  (bootstrap over {units}; "
             + (f"spread over populations {fwd['group_stderr']:.4f}; {fwd.get('resamplings', 0)} resamplings)" if smc
                else f"10-group spread {fwd['group_stderr']:.4f})")),
        ]
        if "reverse" in record:
            rev = record["reverse"]
            rows.append((f"log Z (reverse {method})",
                         f"{rev['log_z']:.4f} ± {rev['log_z_stderr']:.4f}  (from the test data; "
                         f"upper - lower bound {record['bidirectional_gap']:+.4f}, ESS {rev['ess_fraction']:.3f} "
                         f"of {units})"))
        if system.n_particles == 2:  # a known answer: 1-D radial quadrature on U
            from eqbench.free_energy import pair_log_z_quadrature

            exact = pair_log_z_quadrature(system)
            rows.append(("log Z (quadrature)", f"{exact:.4f}  (exact; forward AIS - exact = "
                                               f"{record['log_z'] - exact:+.4f})"))
        rows += [
            ("<u>_p (test data)", f"{record['mean_energy']:.4f} ± {record['mean_energy_stderr']:.4f}  (batch means)"),
            ("H(p) = <u> + log Z", f"{record['entropy']:.4f} ± {record['entropy_stderr']:.4f}  nats; "
                                   f"KL(p||q) = test NLL - H(p)"),
            ("ESS of the weights", f"{fwd['ess_fraction']:.4f} of {settings['n_groups']} populations' estimates "
                                   f"(their std {fwd['log_weight_std']:.3g} nats)" if smc else
                                   f"{fwd['ess_fraction']:.4f} of {fwd['n_chains']} chains "
                                   f"(log-weight std {fwd['log_weight_std']:.3g})"),
            ("acceptance (MALA)", f"min {fwd['acceptance_min']:.3f}, mean {fwd['acceptance_mean']:.3f}, "
                                  f"max {fwd['acceptance_max']:.3f} over {fwd['n_temperatures']} temperatures "
                                  f"(target {settings['target_acceptance']})"),
            ("settings", f"{settings['n_chains']} chains, {settings['n_temperatures']} temperatures "
                         f"beta=(t/K)^{settings['schedule_power']:g}, base sigma {settings['base_scale']:g}, "
                         f"{settings['n_steps']} MALA step(s), seed {settings['seed']}"
                         + (f", resampled below ESS {settings['resample_ess']} in {settings['n_groups']} populations"
                            if smc else "")),
            ("wall time", f"{record['wall_s']:.1f} s (forward {fwd['wall_s']:.1f} s)"),
            ("file", record["path"]),
        ]
        print(f"{system.name}: log Z on U (dimension {system.n_dof}), {record['measure'].split(',')[0]}")
        for key, value in rows:
            print(f"  {key:<24} {value}")
    if args.json:
        slim = {name: {k: v for k, v in r.items() if k not in ("forward", "reverse")}
                | {"forward": {k: v for k, v in r["forward"].items() if k not in ("acceptance", "step_sizes")}}
                for name, r in report.items()}
        print(json.dumps(slim, indent=2))
    return 0


# ----------------------------------------------------------------------------------------- run
def _set_threads(threads: int) -> None:
    """``--threads`` of every command that runs cells: torch threads per process (0 = torch's choice)."""
    if threads < 0:
        raise EqbenchError(f"--threads must be >= 0 (0 = torch's choice), got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _seed_overrides(args: argparse.Namespace, overrides: dict[str, Any]) -> int | None:
    """``--seed N`` (only seed N) and ``--seeds K`` (seeds 0..K-1) mean the same in every command."""
    if args.seed is not None and args.seeds is not None:
        raise EqbenchError("give --seed N (one seed) or --seeds K (seeds 0..K-1), not both")
    if args.seeds is not None:
        if args.seeds < 1:
            raise EqbenchError(f"--seeds must be a positive count, got {args.seeds}")
        overrides["seeds"] = list(range(args.seeds))
    if args.seed is not None and args.seed < 0:
        raise EqbenchError(f"--seed must be a non-negative integer, got {args.seed}")
    return args.seed


def _print_cells(results: Sequence[Any]) -> int:
    """One row per scalar record (curves and histograms summarised); returns the failed count."""
    rows = []
    failed = 0
    for cell in results:
        params = cell.config.get("params", {})
        if cell.status != "ok":
            failed += 1
            rows.append((cell.cell_id, params.get("n_train", ""), params.get("variant", ""), cell.config["seed"], "FAILED", "",
                         cell.reason))
            continue
        series: dict[str, int] = {}
        for r in cell.records:
            if r.step is not None:  # curves and histograms: one summary line, the values are in the CSV
                series[r.metric] = series.get(r.metric, 0) + 1
                continue
            rows.append((cell.cell_id, r.n_train if r.n_train is not None else "", r.variant, r.seed, r.metric,
                         _fmt(r.value), r.unit))
        for metric, count in series.items():
            rows.append((cell.cell_id, params.get("n_train", ""), params.get("variant", ""), cell.config["seed"], metric,
                         f"[{count} points]", ""))
    _print_table(rows, ("cell", "n_train", "variant", "seed", "metric", "value", "unit"))
    return failed


def _finish(args: argparse.Namespace, task: str, results: Sequence[Any]) -> int:
    from eqbench.records import CellStore

    failed = _print_cells(results)
    table = CellStore(args.results).collect()
    print(f"\n{len(results)} cells ({failed} failed); all results: {Path(args.results) / 'results.csv'} ({len(table)} rows)")
    if not args.no_plot:
        from eqbench.plots import write_task_plots

        for path in write_task_plots(task, args.results, table=table):
            print(f"plot: {path}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from eqbench.api import run
    from eqbench.config import parse_overrides

    time_limit = check_time_limit(args.time_limit)
    every = check_snapshot_interval(args.snapshot_every)
    overrides = parse_overrides(args.set or [])
    seed = _seed_overrides(args, overrides)
    _set_threads(args.threads)
    results = run(args.task, args.model, args.system, args.profile, seed=seed, device=args.device,
                  overrides=overrides, results_dir=args.results, rerun=args.rerun, artifacts=not args.no_artifacts,
                  time_limit_s=time_limit, snapshot_every_s=every)
    return _finish(args, args.task, results)


# ------------------------------------------------------------------------------------ evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from eqbench.api import evaluate
    from eqbench.config import parse_overrides

    overrides = parse_overrides(args.set or [])
    model_config = overrides.pop("model_config", None)
    seed = _seed_overrides(args, overrides)
    if (args.model is None) == (args.cell is None):
        raise EqbenchError("name what to score: --model M --system S [--checkpoint FILE], or --cell DIR "
                           "(a cell's kept model: RESULTS/artifacts/<task>/<cell id>)")
    if args.model is not None and args.system is None:
        raise EqbenchError("--model needs --system (the system the flow models)")
    if args.cell is not None and args.checkpoint is not None:
        raise EqbenchError("--checkpoint goes with --model; a --cell brings its own kept model")
    _set_threads(args.threads)
    results = evaluate(args.model, args.system, args.profile, checkpoint=args.checkpoint, cell=args.cell,
                       model_config=model_config, samples=args.samples, seed=seed, overrides=overrides,
                       results_dir=args.results, device=args.device, rerun=args.rerun,
                       artifacts=not args.no_artifacts)
    return _finish(args, "evaluate", results)


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _price_total(plan: Any, prices: dict[str, Any], jobs: int) -> str:
    """One line: the priced cells' total cell time and wall time on ``jobs`` workers, and how
    many cells are unpriced."""
    from eqbench.cost import wall_seconds

    known = [prices[c.cell_id].seconds for c in plan.todo if prices[c.cell_id].seconds is not None]
    unknown = len(plan.todo) - len(known)
    return (f"{_hms(sum(known))} of cell time, about {_hms(wall_seconds(known, jobs))} wall time with --jobs {jobs}"
            + (f"; {unknown} cells unpriced (nothing comparable has finished: run them in a smaller profile "
               f"first)" if unknown else ""))


def _dry_run(args: argparse.Namespace, plan: Any) -> int:
    """Print the cells a sweep would run with their estimated cost, per cell and in total."""
    from eqbench.sweep import price_plan

    calibration = args.calibrate or [args.results]
    prices = price_plan(plan.todo, calibration, device=args.device)
    rows = [(c.cell_id, c.model, c.system, c.params.get("variant", ""), c.params.get("n_train", ""), c.seed,
             _hms(prices[c.cell_id].seconds), prices[c.cell_id].basis) for c in plan.todo]
    if not args.summary:
        _print_table(rows, ("cell", "model", "system", "variant", "n_train", "seed", "estimate", "basis"))
    groups: dict[tuple[str, str], list[float | None]] = {}
    for c in plan.todo:
        groups.setdefault((c.model, c.system), []).append(prices[c.cell_id].seconds)
    summary = [(model, system, len(v), sum(x is not None for x in v), _hms(sum(x for x in v if x is not None)))
               for (model, system), v in groups.items()]
    if len(summary) > 1 or args.summary:
        print()
        _print_table(summary, ("model", "system", "cells", "priced", "cell time"))
    print(f"\n{len(plan.todo)} cells to run, {len(plan.done)} already finished; priced from "
          f"{', '.join(map(str, calibration))}: {_price_total(plan, prices, args.jobs)}")
    for model, system, reason in plan.unsupported:
        print(f"  skipped {model} on {system}: {reason}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from eqbench.config import parse_overrides
    from eqbench.executors import SlurmOptions
    from eqbench.records import CellStore
    from eqbench.sweep import plan_sweep, sweep

    time_limit = check_time_limit(args.time_limit)
    every = check_snapshot_interval(args.snapshot_every)
    if args.threads < 0:  # the workers set it; the parent only checks it
        raise EqbenchError(f"--threads must be >= 0 (0 = cores / jobs), got {args.threads}")
    overrides = parse_overrides(args.set or [])
    seed = _seed_overrides(args, overrides)
    if seed is not None:
        overrides["seeds"] = [seed]
    common = dict(overrides=overrides, results_dir=args.results, rerun=args.rerun)
    if args.dry_run:
        return _dry_run(args, plan_sweep(args.task, args.model, args.system, args.profile, **common))
    slurm = SlurmOptions(partition=args.partition, gpus_per_job=args.gpus_per_job, timeout_min=args.slurm_minutes,
                         array_parallelism=args.jobs, cpus_per_job=max(1, args.threads))
    def announce(plan: Any) -> None:
        """Before any cell starts: what will run and, where finished cells allow, for how long."""
        from eqbench.sweep import price_plan

        prices = price_plan(plan.todo, args.calibrate or [args.results], device=args.device)
        priced = any(e.seconds is not None for e in prices.values())
        price = f"; estimated {_price_total(plan, prices, args.jobs)}" if priced else ""
        print(f"{len(plan.todo)} cells to run, {len(plan.done)} already finished{price}", file=sys.stderr)

    plan, results = sweep(args.task, args.model, args.system, args.profile, executor=args.executor, jobs=args.jobs,
                          threads=args.threads or None, device=args.device, time_limit_s=time_limit,
                          address=args.address, slurm=slurm, on_plan=announce, artifacts=not args.no_artifacts,
                          snapshot_every_s=every, **common)
    for model, system, reason in plan.unsupported:
        print(f"skipped {model} on {system}: {reason}")
    failed = [r for r in results if r.status != "ok"]
    table = CellStore(args.results).collect()
    print(f"{len(results)} cells run ({len(failed)} failed), {len(plan.done)} already finished; "
          f"all results: {Path(args.results) / 'results.csv'} ({len(table)} rows)")
    for r in failed:
        print(f"  failed {r.cell_id} ({r.config.get('model')}, {r.config.get('system')}): {r.reason}")
    if not args.no_plot:
        from eqbench.plots import write_task_plots

        for path in write_task_plots(args.task, args.results, table=table):
            print(f"plot: {path}")
    return 1 if failed else 0


def cmd_price_check(args: argparse.Namespace) -> int:
    from eqbench.cost import check_prices

    checks = check_prices(args.results, args.calibrate, tasks=args.task)
    if not checks:
        raise EqbenchError(f"no finished cells under {args.results}" + (f" for {', '.join(args.task)}" if args.task else ""))
    rows = [(c.cell.cell_id, c.cell.task, c.cell.config.get("model"), c.cell.config.get("system"),
             c.cell.config.get("params", {}).get("variant", ""), c.cell.config.get("params", {}).get("n_train", ""),
             _hms(c.cell.duration_s), _hms(c.estimate.seconds), f"{c.ratio:.2f}" if c.ratio is not None else "?",
             c.estimate.basis) for c in checks]
    _print_table(rows, ("cell", "task", "model", "system", "variant", "n_train", "measured", "estimate",
                        "est/meas", "basis"))
    priced = [c for c in checks if c.ratio is not None]
    if priced:
        measured = sum(c.cell.duration_s for c in priced)
        estimated = sum(c.estimate.seconds for c in priced)
        print(f"\n{len(priced)} of {len(checks)} cells priced: measured {_hms(measured)}, estimated {_hms(estimated)} "
              f"(total est/meas {estimated / measured:.2f}; per cell {min(c.ratio for c in priced):.2f} .. "
              f"{max(c.ratio for c in priced):.2f})")
    return 0


def _results_to_read(args: argparse.Namespace, *, writes_inside: bool) -> Path:
    """The results directory of ``collect``, ``report`` and ``plot``, checked before any work:
    it must exist (a misspelt name creates nothing), and take what the command writes there."""
    from eqbench.records import check_output_file, check_results_dir

    root = check_results_dir(args.results, read=True, write=writes_inside)
    if getattr(args, "out", None) is not None:
        check_output_file(args.out)
    if not (root / "cells").is_dir() and not (root / "results.csv").is_file():
        raise EqbenchError(f"no results table at {root / 'results.csv'} and no cells/ beside it; run a task or "
                           f"`eqbench collect --results {root}` first")
    return root


def _print_skipped(skipped: Sequence[Any]) -> None:
    """The cell files the store did not use, one line each (what ``collect``, ``report`` and
    ``plot`` left out, and why)."""
    if skipped:
        print(f"{len(skipped)} cell file{'' if len(skipped) == 1 else 's'} not used:")
    for skip in skipped:
        print(f"  skipped {skip.path}: {skip.reason}")


def _failed_label(row: Any) -> str:
    settings = [f"{key} {row[key]}" for key in ("variant", "n_train") if str(row.get(key, "")) not in ("", "nan", "<NA>")]
    return ", ".join([str(row["task"]), str(row["model"]), str(row["system"]), *settings])


def cmd_plot(args: argparse.Namespace) -> int:
    import warnings

    from eqbench.plots import write_task_plots
    from eqbench.records import CellStore, SkippedCellWarning
    from eqbench.registry import TASKS

    tasks = args.task or [entry.name for entry in TASKS.entries()]
    if args.task:
        for name in tasks:
            TASKS.get(name)  # unknown task names fail with the valid choices
    root = _results_to_read(args, writes_inside=True)
    store = CellStore(root)
    table = None
    if store.cells_dir.is_dir():  # the cells, not a results.csv that may be stale or truncated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedCellWarning)
            table, _ = store.table()
    written = [path for name in tasks for path in write_task_plots(name, root, table=table)]
    for path in written:
        print(path)
    print(f"{len(written)} files written under {root / 'plots'}")
    _print_skipped(store.skipped)
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    import warnings

    from eqbench.records import CellStore, SkippedCellWarning

    root = _results_to_read(args, writes_inside=args.out is None)
    out = Path(args.out) if args.out else None
    store = CellStore(root)
    if not store.cells_dir.is_dir():  # an archived results.csv alone: collecting would empty it
        raise EqbenchError(f"no cells under {store.cells_dir}: nothing to collect ({root / 'results.csv'} is left as it is)")
    with warnings.catch_warnings():  # listed below, one line each
        warnings.simplefilter("ignore", SkippedCellWarning)
        table = store.collect(out)
    failed = table[table["status"] == "failed"]
    print(f"{len(table)} records from {table['cell_id'].nunique()} cells -> {out or root / 'results.csv'}")
    for _, row in failed.iterrows():
        print(f"  failed cell {row['cell_id']} ({_failed_label(row)}): {row['reason']}")
    _print_skipped(store.skipped)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the self-contained HTML report of a results directory (see :mod:`eqbench.report`)."""
    import warnings

    from eqbench.report import BaselinesWarning, load_results, write_report

    root = _results_to_read(args, writes_inside=args.out is None)
    loaded = load_results(root)
    with warnings.catch_warnings(record=True) as unread:  # unreadable published numbers: one line, the page says so
        warnings.simplefilter("always", BaselinesWarning)
        out = write_report(root, args.out, loaded=loaded)
    for warning in unread:
        if issubclass(warning.category, BaselinesWarning):
            print(f"eqbench: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    print(f"report: {out}")
    if loaded.note:
        print(f"note: {loaded.note}")
    _print_skipped(loaded.skipped)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Every claim of the paper from three seeds: the demo's quick cells, the report, the headline."""
    import warnings

    from eqbench.demo import DEMO_STEPS, headline_rows, plan_demo, run_demo
    from eqbench.records import CellStore, check_results_dir
    from eqbench.report import evaluate_claims, load_results, write_report

    if args.jobs < 1:
        raise EqbenchError(f"--jobs must be a positive number of workers, got {args.jobs}")
    if args.threads < 1:
        raise EqbenchError(f"--threads must be a positive number of torch threads per worker, got {args.threads}")
    root = check_results_dir(args.results)  # before any work
    plans = plan_demo(root, rerun=args.rerun)
    todo = sum(len(p.todo) for p in plans)
    for step, plan in zip(DEMO_STEPS, plans):
        settings = ", ".join(f"{k}={v}" for k, v in step.overrides.items())
        print(f"{step.task}: {' '.join(step.models)} on {' '.join(step.systems)}, {len(plan.todo)} to run, "
              f"{len(plan.done)} finished ({settings}) -> {', '.join(step.claims)}", file=sys.stderr)
    if args.dry_run:
        return 0
    print(f"{todo} cells to run with {args.jobs} workers of {args.threads} thread(s)", file=sys.stderr)
    results = run_demo(root, jobs=args.jobs, threads=args.threads, rerun=args.rerun,
                       artifacts=not args.no_artifacts)
    failed = [r for r in results if r.status != "ok"]
    for r in failed:
        print(f"  failed {r.cell_id} ({r.config.get('model')}, {r.config.get('system')}): {r.reason}")
    CellStore(root).collect()
    loaded = load_results(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = write_report(root, None, loaded=loaded)
        verdicts = evaluate_claims(loaded.table)
    print()
    _print_table(headline_rows(verdicts), ("claim", "paper", "verdict", "measured (mean ± std over seeds)", "paper"))
    print(f"\nreport: {out}")
    return 1 if failed else 0


# -------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eqbench",
        description="Benchmark equivariant flows on many-particle Boltzmann densities "
                    "(Köhler, Klein & Noé, ICML 2020).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("list", help="list registered systems, models and tasks with their origin")
    p.add_argument("kind", nargs="?", choices=list(KINDS), help="only this kind")
    p.add_argument("--params", action="store_true",
                   help="also build each model for dw4 and lj13 and show its parameter count (imports torch)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("describe", help="describe a system (energy, conventions), model or task (profiles)")
    p.add_argument("name")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("data", help="generate or verify reference data and print its diagnostics",
                       description="Generate (once, cached in $EQBENCH_CACHE or ~/.cache/eqbench) and check "
                                   "the MCMC reference data of SPEC §3 (splits train, val, test: disjoint chains, "
                                   "own seeds), or inspect the community data files. Without SYSTEM: every registered "
                                   "system except " + ", ".join(components.DATA_ON_REQUEST) + " (not needed by the test "
                                   "suite or `make data`; its data are made when named, e.g. `eqbench data "
                                   + components.DATA_ON_REQUEST[0] + "`, or on first use by a task).")
    p.add_argument("systems", nargs="*", metavar="SYSTEM",
                   help="systems (default: every registered system except " + ", ".join(components.DATA_ON_REQUEST)
                        + ", whose data are made only when named: `eqbench data "
                        + " ".join(components.DATA_ON_REQUEST) + "`)")
    p.add_argument("--source", choices=("eqbench", "community"), default="eqbench",
                   help="eqbench's own MCMC data (default) or the public DEM/EFM files")
    p.add_argument("--regenerate", action="store_true", help="regenerate even if a verified copy is cached")
    p.add_argument("--verify", action="store_true", help="only check the cached files' checksums (exit 2 if not ok)")
    p.add_argument("--json", action="store_true", help="print the diagnostics as JSON")
    p.add_argument("--jobs", type=int, default=1,
                   help="generate missing data sets N at a time in separate processes (one thread each; "
                        "on 2 cores, --jobs 2 halves the time of a fresh cache)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("log-z", help="log Z on the CoM-free subspace by AIS, <u>, H(p) and diagnostics",
                       description="log Z = log ∫_U exp(-u) dx (the measure of every eqbench NLL) by annealed "
                                   "importance sampling (Neal 2001) with production settings, a reverse-AIS "
                                   "cross-check from the test data, <u>_p from the test data and H(p) = <u> + "
                                   "log Z, so that KL(p||q) = NLL - H(p). Computed once (minutes; LJ-13 ~10 min "
                                   "on one core) and cached beside the reference data; `eqbench data` never "
                                   "computes it.")
    p.add_argument("systems", nargs="*", metavar="SYSTEM",
                   help="systems (default: as for `eqbench data`: every registered system except "
                        + ", ".join(components.DATA_ON_REQUEST) + ")")
    p.add_argument("--recompute", action="store_true", help="compute again even if a cached value exists")
    p.add_argument("--cached-only", action="store_true",
                   help="only print cached values; a missing one is an error (exit 2), nothing is computed")
    p.add_argument("--json", action="store_true", help="print the records as JSON (per-temperature lists left out)")
    p.set_defaults(func=cmd_log_z)

    p = sub.add_parser("run", help="run a task for one model on one system",
                       description="Run every cell of a task profile; finished cells are skipped, each cell "
                                   "is written atomically to RESULTS/cells/ and collected into RESULTS/results.csv.")
    p.add_argument("--task", required=True, help="task id (see `list tasks`)")
    p.add_argument("--model", required=True, help="model id (see `list models`) or a module:builder path")
    p.add_argument("--system", required=True, help="system id (see `list systems`)")
    _cell_arguments(p, time_limit=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="run a task over many models x systems x grid points x seeds, resumable",
                       description="Expand the task's profile for every model and system (default: all that the "
                                   "task supports; for a task of any system, every registered one except "
                                   + ", ".join(components.DATA_ON_REQUEST) + ", which runs when named), skip finished cells and run the rest on an executor. Killed "
                                   "sweeps resume: run the same command again.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n"
                              "  python -m eqbench sweep --task density-estimation --model kernel-flow node "
                              "--system dw4 --profile quick --jobs 2\n"
                              "  python -m eqbench sweep --task density-estimation --profile paper --dry-run "
                              "--calibrate results/quick   # priced from quick runs\n"
                              "  python -m eqbench sweep --task timing --profile paper --executor slurm "
                              "--partition gpu --gpus-per-job 1 --device auto")
    p.add_argument("--task", required=True, help="task id (see `list tasks`)")
    p.add_argument("--model", nargs="+", help="model ids or module:builder paths (default: eqbench's built-in "
                   "models the task supports; plugins run only when named)")
    p.add_argument("--system", nargs="+", help="system ids (default: every system the task supports)")
    _cell_arguments(p, sweep=True, time_limit=True)
    p.add_argument("--executor", default="local", choices=("local", "dask", "slurm"),
                   help="local process pool (default), dask.distributed, or SLURM via submitit")
    p.add_argument("--jobs", type=int, default=1, help="concurrent cells (local/dask workers, SLURM array cap)")
    p.add_argument("--address", default=None, help="dask scheduler address (default: a LocalCluster)")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--gpus-per-job", type=int, default=0, help="SLURM GPUs per cell")
    p.add_argument("--slurm-minutes", type=int, default=60, help="SLURM time limit per cell, minutes")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells to run with their estimated cost (from finished cells, any profile); run nothing")
    p.add_argument("--calibrate", action="append", metavar="DIR",
                   help="results directories whose finished cells price the plan (repeatable; default: "
                        "--results); run the calibrate profile first to price the paper grid")
    p.add_argument("--summary", action="store_true",
                   help="with --dry-run: only the totals per model and system, not every cell")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="score a flow trained elsewhere (checkpoint, a cell's kept model) without training it",
                       description="Score an already-trained flow by the protocol of the tasks, never training it: "
                                   "NLL on the train / val / test splits, then samples with exact log q reweighted "
                                   "against MCMC (ESS, mean energies, energy histograms, W2s; the DW-2 free energy). "
                                   "Cells land in the same results store and report as every task "
                                   "(`eqbench describe evaluate` lists the profile sizes).",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n"
                              "  python -m eqbench evaluate --model zuko-nsf --system dw4 --checkpoint nsf_dw4.pt "
                              "--profile quick\n"
                              "  python -m eqbench evaluate --cell results/quick/artifacts/bg-reweighting/<cell id> "
                              "--samples saved   # re-score kept samples, no retraining, no resampling")
    p.add_argument("--model", default=None, help="model id or module:builder path (with --system)")
    p.add_argument("--system", default=None, help="system id the flow models")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="state to load into the built model: an eqbench model.pt or a torch.save(state_dict) file")
    p.add_argument("--cell", default=None, metavar="PATH",
                   help="a cell's kept model: RESULTS/artifacts/<task>/<cell id> (or its model.pt, or the cell's JSON)")
    p.add_argument("--samples", default="draw", choices=("draw", "saved"),
                   help="draw new samples (default) or re-score the samples the --cell kept")
    _cell_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("price-check", help="how good are --dry-run prices? estimate finished cells from other cells",
                       description="Prices every finished cell of RESULTS from the finished cells of the --calibrate "
                                   "directories (leaving the cell itself out), as `sweep --dry-run` would have before "
                                   "it ran, and prints estimate beside measured duration.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: how well the calibrate runs priced the paper cells that ran\n"
                              "  python -m eqbench price-check --results results/paper --calibrate results/calibrate")
    p.add_argument("--results", required=True, help="results directory with the finished cells to check")
    p.add_argument("--calibrate", action="append", required=True, metavar="DIR",
                   help="results directories whose cells price them (repeatable)")
    p.add_argument("--task", action="append", help="only this task (repeatable)")
    p.set_defaults(func=cmd_price_check)

    p = sub.add_parser("plot", help="redraw task figures (PNG + SVG) from RESULTS/results.csv",
                       description="Each task draws its figures from the long table only, into RESULTS/plots/<task>/.")
    p.add_argument("--task", action="append", help="task id (repeatable; default: every task with results)")
    p.add_argument("--results", default=None, help="results directory (default: the only results/<profile> there is, "
                   "else name one)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("collect", help="concatenate the per-cell records into one long CSV")
    p.add_argument("--results", default=None, help="results directory (default: the only results/<profile> there is, "
                   "else name one)")
    p.add_argument("--out", default=None, help="output CSV (default: RESULTS/results.csv)")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("report", help="write one self-contained HTML report (claims, plots, tables, provenance)",
                       description="Build one HTML file from RESULTS/results.csv and baselines/published.csv: a "
                                   "verdict per claim of the paper, each task's figures (inline SVG), measured "
                                   "numbers beside the published ones, failed cells and provenance. Needs no "
                                   "network access to view.")
    p.add_argument("--results", default=None, help="results directory (default: the only results/<profile> there is, "
                   "else name one)")
    p.add_argument("--out", default=None, help="output HTML file (default: RESULTS/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="judge every claim of the paper from three seeds in one short run, then report",
                       description="Run the demo's quick-profile cells (eqbench.demo.DEMO_STEPS: the paper's models "
                                   "on DW-2/DW-4, three seeds, narrowed quick settings that every cell records) in "
                                   "one pool, write RESULTS/report.html and print each claim's verdict with its "
                                   "measured numbers beside the paper's. Rerunning skips finished cells.")
    p.add_argument("--results", default="results/demo", help="results directory (default: results/demo)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--rerun", action="store_true", help="run finished cells again")
    p.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    p.add_argument("--no-artifacts", action="store_true", help="keep no model.pt / samples.npz per cell")
    p.set_defaults(func=cmd_demo)
    return parser


def _cell_arguments(p: argparse.ArgumentParser, *, sweep: bool = False, time_limit: bool = False) -> None:
    """The flags of every command that runs cells, with one meaning each (run, sweep, evaluate)."""
    p.add_argument("--profile", default="smoke",
                   help="smoke (seconds per cell), quick (minutes: the paper's effects), paper (the full protocol) "
                        "or calibrate (prices paper cells)")
    p.add_argument("--seed", type=int, default=None, help="run only seed N")
    p.add_argument("--seeds", type=int, default=None, help="run seeds 0..K-1 (default: the profile's seeds)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a profile setting (TOML value), e.g. --set n_train=[10,100], --set lr=1e-3, "
                        "--set 'lr={default=5e-3, real-nvp=1e-3}' (per model); repeatable")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto" + (" (one GPU per worker)" if sweep else ""))
    p.add_argument("--results", default=None, help="results directory (default: results/<profile>, one per profile)")
    p.add_argument("--rerun", action="store_true", help="run cells again even if finished")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process running cells (default 1: these small tensors ran up to 10x "
                        "slower with 2 threads on 2 shared cores; 0 = " + ("cores / jobs)" if sweep else "torch's choice)"))
    p.add_argument("--no-artifacts", action="store_true",
                   help="keep only the records, not each cell's trained model and samples (RESULTS/artifacts/)")
    p.add_argument("--no-plot", action="store_true", help="do not redraw the task's figures afterwards")
    if time_limit:
        p.add_argument("--time-limit", type=str, default=None, metavar="SECONDS",
                       help="a cell running longer becomes a failed cell \"cell exceeded its time limit of N s\" "
                            "(a positive number; local and SLURM workers, not dask); the worker it ran in is "
                            "replaced" + ("" if sweep else ". With a limit, cells run in a worker process"))
        p.add_argument("--snapshot-every", type=str, default=str(int(DEFAULT_SNAPSHOT_EVERY_S)), metavar="SECONDS",
                       help="save each cell's training state this often (default %(default)s; 0 = every iteration, "
                            "'off' = never), so a cell stopped by --time-limit or a killed run continues its "
                            "training when run again, with the numbers an uninterrupted run gives; --rerun "
                            "starts afresh")


def _default_results(args: argparse.Namespace) -> str:
    """``results/<profile>`` for commands that run cells; for commands that read them, the one
    results directory under ``results/`` (one per profile), or an error naming the choices."""
    from eqbench.runner import default_results_dir

    if getattr(args, "profile", None):
        return str(default_results_dir(args.profile))
    root = Path("results")
    found = sorted(str(d) for d in root.glob("*") if (d / "cells").is_dir() or (d / "results.csv").is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise EqbenchError("no results under results/ (one directory per profile, e.g. results/quick); "
                           "run a task first or pass --results DIR")
    raise EqbenchError(f"several results directories, one per profile; pass --results with one of: {', '.join(found)}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, ``scancel``, ``kill``), handled like Ctrl-C: the
    running cells and their workers stop, the finished ones stay stored; exit code 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the clean-up finish
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if getattr(args, "results", "") is None:
            args.results = _default_results(args)
        return args.func(args)
    except EqbenchError as exc:
        print(f"eqbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        print(f"\neqbench: {'terminated (SIGTERM)' if terminated else 'interrupted'}. Finished cells are stored "
              "(each written whole or not at all); run the same command again to run only the missing ones.",
              file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
