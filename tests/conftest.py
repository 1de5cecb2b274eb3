"""Shared fixtures. Reference data come from the user's cache (generated once, then reused)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m eqbench ARGS`` in a subprocess and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "eqbench", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=1200)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def dw4():
    """The DW-4 system (paper §6), shared by the model and training tests."""
    import eqbench

    return eqbench.get_system("dw4")


@pytest.fixture(scope="session")
def lj13():
    """The LJ-13 system (paper §6)."""
    import eqbench

    return eqbench.get_system("lj13")


def pytest_configure(config):
    """One torch thread per test process: the suite's tensors are small, and two threads on a
    2-core machine shared with anything else slow them down up to 10x (measured)."""
    import torch

    torch.set_num_threads(1)


def run_task_smoke(task: str, model: str, system: str, results_dir: Path, *, overrides: dict | None = None,
                   expect_metrics: tuple[str, ...] = ()):
    """Run a task's ``smoke`` profile and check what every task must deliver (issue 4):
    every cell ok, records of this task/model/system with finite values and the expected metrics,
    a collected long table with exactly the schema's columns, and the task's plots as PNG + SVG."""
    import math

    import eqbench
    from eqbench.plots import write_task_plots
    from eqbench.records import RECORD_COLUMNS, CellStore
    from eqbench.tasks.base import REFERENCE_MODEL

    results = eqbench.run(task, model, system, "smoke", overrides=overrides, results_dir=results_dir, progress=False)
    assert results, "the smoke profile planned no cells"
    for cell in results:
        assert cell.status == "ok", cell.reason
        assert cell.records, "an ok cell must produce records"
        # A model-independent reference cell (metastable-states' training set and MCMC) carries
        # the marker REFERENCE_MODEL instead of the model: it is shared by every model.
        owner = cell.config["model"]
        assert owner in (model, REFERENCE_MODEL), owner
        for record in cell.records:
            assert (record.task, record.model, record.system) == (task, owner, system)
            assert math.isfinite(record.value), record
    metrics = {r.metric for cell in results for r in cell.records}
    missing = set(expect_metrics) - metrics
    assert not missing, f"missing metrics {sorted(missing)}; got {sorted(metrics)}"
    table = CellStore(results_dir).collect()
    assert list(table.columns) == list(RECORD_COLUMNS)
    assert (table["task"] == task).all()
    plots = write_task_plots(task, results_dir, table=table)
    suffixes = sorted(p.suffix for p in plots)
    assert plots and suffixes.count(".png") == suffixes.count(".svg") >= 1, plots
    assert all(p.stat().st_size > 0 for p in plots)
    return results, table


def live_processes() -> list[tuple[int, str, int, int]]:
    """``(pid, command, parent pid, session id)`` of every live process (zombies are dead), read
    from /proc (Linux); processes that exit while being read are skipped."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, ppid, _pgid, session = text[text.rindex(")") + 2:].split()[:4]
        if state not in ("Z", "X"):
            found.append((int(stat.parent.name), text[text.index("(") + 1:text.rindex(")")], int(ppid), int(session)))
    return found


def centred_icosahedron(radius: float):
    """Centred icosahedron ``[1, 13, 3]`` (float64): one particle at the origin, 12 at the cyclic
    permutations of (0, ±1, ±φ) scaled to ``radius``; relaxes to the LJ-13 global minimum."""
    from eqbench.systems.lennard_jones import mackay_icosahedron

    return mackay_icosahedron(1, radius)


def report_cell(task: str, model: str, system: str, profile: str, seed: int, values: list[tuple], *,
                caps: str = "cnf;equivariant;trainable", variant: str = "", n_train: int | None = 1000,
                third: str = "step", **params) -> list[dict]:
    """Long-table rows of one ok cell for report tests: ``values`` are ``(metric, value[, x])``
    where the optional ``x`` is the row's ``third`` column ("step" or "unit"); ``params`` go into
    the cell's config (and so into its settings key)."""
    from eqbench.records import canonical_json, cell_id

    params = {"variant": variant, "n_train": n_train, "iterations": 5 if profile == "smoke" else 500, **params}
    config = {"task": task, "model": model, "system": system, "profile": profile, "seed": seed,
              "params": params, "code": {"eqbench": "test"}}
    key = cell_id({k: v for k, v in config.items() if k != "seed"})
    rows = []
    for metric, value, *rest in values:
        row = {"cell_id": cell_id(config), "task": task, "system": system, "model": model, "variant": variant,
               "n_train": n_train, "seed": seed, "metric": metric, "value": value, "unit": "", "step": None,
               "profile": profile, "settings_key": key, "capabilities": caps, "code_version": "eqbench=test",
               "status": "ok", "reason": "", "duration_s": 1.0, "config_json": canonical_json(config)}
        if rest:
            row[third] = rest[0]
        rows.append(row)
    return rows


def write_results(tmp_path: Path, *cells: list[dict]) -> Path:
    """``results.csv`` of the given cells' rows in ``tmp_path``; returns ``tmp_path``."""
    import pandas as pd

    pd.DataFrame([r for c in cells for r in c]).to_csv(tmp_path / "results.csv", index=False)
    return tmp_path
