"""Sweeps (issue 6): executors agree with single runs, failures stay in their cell, kills resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from html import escape as html_escape
from pathlib import Path

import pytest
from conftest import live_processes

import eqbench
from eqbench.errors import ConfigError
from eqbench.records import CellStore
from eqbench.sweep import plan_sweep, sweep

OVERRIDES = {"iterations": 3, "n_test": 50}
TIMING_METRICS = {"fit_wall_s"}


def _values(results):
    return sorted((r.model, r.system, r.seed, r.metric, r.value) for cell in results for r in cell.records
                  if r.metric not in TIMING_METRICS)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    results = []
    for model in ("gaussian", "kernel-flow"):
        results += eqbench.run("test-nll", model, "dw4", "smoke", overrides=OVERRIDES, results_dir=root, progress=False)
    return _values(results)


def test_local_pool_matches_single_runs(single_runs, tmp_path):
    plan, results = sweep("test-nll", ["gaussian", "kernel-flow"], ["dw4"], overrides=OVERRIDES, jobs=2,
                          threads=1, results_dir=tmp_path, progress=False)
    assert len(results) == len(plan.todo) == 2 and all(r.status == "ok" for r in results)
    assert _values(results) == single_runs
    again, rerun = sweep("test-nll", ["gaussian", "kernel-flow"], ["dw4"], overrides=OVERRIDES, results_dir=tmp_path,
                         progress=False)
    assert rerun == [] and len(again.done) == 2  # finished cells are not run twice


def test_dask_local_cluster_matches_single_runs(single_runs, tmp_path):
    pytest.importorskip("dask.distributed")
    _, results = sweep("test-nll", ["gaussian", "kernel-flow"], ["dw4"], overrides=OVERRIDES, executor="dask",
                       jobs=2, threads=1, results_dir=tmp_path, progress=False)
    assert all(r.status == "ok" for r in results)
    assert _values(results) == single_runs


def test_submitit_local_executor_runs_a_cell(tmp_path):
    pytest.importorskip("submitit")
    from eqbench.executors import SlurmOptions

    _, results = sweep("test-nll", ["gaussian"], ["dw4"], overrides=OVERRIDES, executor="slurm",
                       slurm=SlurmOptions(cluster="local", timeout_min=5), results_dir=tmp_path, progress=False)
    assert [r.status for r in results] == ["ok"]
    assert CellStore(tmp_path).is_done("test-nll", results[0].cell_id)


def test_crash_and_timeout_become_failed_cells_and_the_rest_finishes(tmp_path):
    _, results = sweep("test-nll", ["gaussian", "sweep_models:killed", "sweep_models:sleepy"], ["dw4"],
                       overrides=OVERRIDES, jobs=2, threads=1, time_limit_s=3, results_dir=tmp_path, progress=False)
    by_model = {r.config["model"]: r for r in results}
    assert by_model["gaussian"].status == "ok"
    assert by_model["sweep_models:killed"].status == "failed"
    assert "worker process died" in by_model["sweep_models:killed"].reason
    assert by_model["sweep_models:sleepy"].status == "failed"
    assert "time limit" in by_model["sweep_models:sleepy"].reason
    table = CellStore(tmp_path).collect()
    assert set(table.loc[table["metric"] == "cell_failed", "model"]) == {"sweep_models:killed", "sweep_models:sleepy"}
    # ... and the report lists both with their reasons beside the finished cell's results
    from eqbench.report import render_report

    html = render_report(tmp_path)
    failed_section = html[html.index('id="failed-cells"'):]
    failed_section = failed_section[:failed_section.index("</section>")]
    for model in ("sweep_models:killed", "sweep_models:sleepy"):
        cell = by_model[model]
        assert cell.cell_id in failed_section and model in failed_section
        assert html_escape(cell.reason.splitlines()[0][:40]) in failed_section
    assert "2 failed cells" in failed_section


def _session_members(sid: int) -> list[str]:
    """Live processes of session ``sid``: ``pid command`` each."""
    return [f"{pid} {command}" for pid, command, _, session in live_processes() if session == sid]


def _wait_until_empty(sid: int, seconds: float = 10) -> list[str]:
    deadline = time.time() + seconds
    while (members := _session_members(sid)) and time.time() < deadline:
        time.sleep(0.1)
    return members


# What kills a sweep: the OOM killer or `kill -9` (SIGKILL, the parent only: its workers are not
# told), `timeout` / `docker stop` / `scancel` (SIGTERM), a terminal's Ctrl-C (SIGINT to the group).
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize("signum, group, exit_code", [(signal.SIGKILL, False, -signal.SIGKILL), (signal.SIGTERM, False, 143),
                                                      (signal.SIGINT, True, 130)], ids=["SIGKILL", "SIGTERM", "Ctrl-C"])
def test_killed_sweep_resumes_with_every_cell_exactly_once(tmp_path, signum, group, exit_code):
    args = [sys.executable, "-m", "eqbench", "sweep", "--task", "test-nll", "--model", "gaussian", "kernel-flow",
            "--system", "dw4", "dw2", "--set", "iterations=3", "--set", "n_test=50", "--seeds", "3",
            "--threads", "1", "--jobs", "2", "--results", str(tmp_path), "--no-plot"]
    # Twelve cells: enough that the sweep is still running when the first cell file appears.
    expected = len(plan_sweep("test-nll", ["gaussian", "kernel-flow"], ["dw4", "dw2"], seeds=3,
                              overrides=OVERRIDES, results_dir=tmp_path).todo)
    # SIGINT back to its default in the child: a test run started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python keeps an inherited SIG_IGN.
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    cells = tmp_path / "cells" / "test-nll"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cells.glob("*.json"))) < 1:
        time.sleep(0.2)
    assert len(_session_members(proc.pid)) >= 4  # the sweep, its two workers and the resource tracker
    if group:
        os.killpg(proc.pid, signum)  # as a terminal's Ctrl-C: the parent and its workers
    else:
        os.kill(proc.pid, signum)  # the parent alone
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == exit_code, stderr
    if exit_code > 0:
        assert "Finished cells are stored" in stderr and "run the same command again" in stderr
    # Nothing outlives the sweep: no worker finishing more cells, no resource tracker.
    assert _wait_until_empty(proc.pid) == []
    finished = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    assert 0 < len(finished) < expected
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    files = sorted(cells.glob("*.json"))
    assert len(files) == expected
    # Every cell exactly once: the resumed sweep ran only the missing ones, the finished ones are untouched.
    left = expected - len(finished)
    assert f"{left} cells to run, {len(finished)} already finished" in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json") if p.name in finished} == finished
    # Off a terminal, the sweep says how far it is, cell by cell.
    assert f"sweep test-nll: {left}/{left} cells done, 0 failed, elapsed " in done.stderr
    assert not [p for p in cells.iterdir() if p.name.startswith(".") and p.is_file()]  # no temp files left
    assert not list(cells.glob(".running/*"))  # no claims of the killed run left
    store = CellStore(tmp_path)
    assert all(store.read("test-nll", p.stem).status == "ok" for p in files)


def test_a_time_limit_that_fires_during_an_import_does_not_poison_the_next_cell(tmp_path, monkeypatch):
    """The limit fires in the middle of a lazy import (as torch's of sympy); the worker is replaced,
    so the next cell, which in the old worker met ``module 'poison_pkg' has no attribute 'core'``,
    runs in a fresh one."""
    monkeypatch.setenv("EQBENCH_TEST_SLOW_IMPORT_FLAG", str(tmp_path / "imported-once"))
    _, results = sweep("test-nll", ["sweep_models:lazy_import"], ["dw4"], seeds=2, overrides=OVERRIDES, jobs=1,
                       threads=1, time_limit_s=3, results_dir=tmp_path / "results", progress=False)
    assert sorted((r.status, r.reason) for r in results) == [("failed", "cell exceeded its time limit of 3 s"),
                                                            ("ok", "")]


def test_a_cell_that_keeps_the_alarm_out_is_killed_by_the_parent(tmp_path, monkeypatch):
    import eqbench.workers

    monkeypatch.setattr(eqbench.workers, "HARD_KILL_GRACE_S", 1.0)
    _, results = sweep("test-nll", ["sweep_models:stubborn", "gaussian"], ["dw4"], overrides=OVERRIDES, jobs=1,
                       threads=1, time_limit_s=2, results_dir=tmp_path, progress=False)
    by_model = {r.config["model"]: r for r in results}
    assert by_model["sweep_models:stubborn"].reason == "cell exceeded its time limit of 2 s"
    assert by_model["gaussian"].status == "ok"
    store = CellStore(tmp_path)
    assert store.read("test-nll", by_model["sweep_models:stubborn"].cell_id).status == "failed"
    assert not list((tmp_path / "cells" / "test-nll").glob(".running/*"))


@pytest.mark.parametrize("command", ["sweep", "run"])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "soon"])
def test_a_bad_time_limit_is_refused_up_front(tmp_path, capsys, command, value):
    from eqbench.cli import main

    model = ["--model", "gaussian"]
    code = main([command, "--task", "test-nll", *model, "--system", "dw4", "--results", str(tmp_path),
                 "--time-limit", value])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "--time-limit" in err and "positive number of seconds" in err
    assert not (tmp_path / "cells").exists()
    with pytest.raises(ConfigError, match="positive number of seconds"):
        (sweep if command == "sweep" else eqbench.run)("test-nll", ["gaussian"] if command == "sweep" else "gaussian",
                                                       ["dw4"] if command == "sweep" else "dw4",
                                                       time_limit_s=float(value) if value != "soon" else value,
                                                       results_dir=tmp_path)


def test_run_has_a_time_limit_too(tmp_path, capsys):
    """``run --time-limit``: the cell over its limit fails with the reason (here in the cell, after
    the model check), the command says so and exits 1; off a terminal it reports each cell."""
    from eqbench.cli import main

    code = main(["run", "--task", "test-nll", "--model", "sweep_models:sleepy_cell", "--system", "dw4", "--seed", "0",
                 "--set", "iterations=3", "--set", "n_test=50", "--results", str(tmp_path), "--no-plot",
                 "--time-limit", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "cell exceeded its time limit of 2 s" in out
    assert "run test-nll sweep_models:sleepy_cell dw4: 1/1 cells done, 1 failed, elapsed " in err
    # In the Python API alike, and a model check that runs past the limit fails the cells the same way.
    cells = eqbench.run("test-nll", "sweep_models:sleepy", "dw4", seed=0, overrides=OVERRIDES, results_dir=tmp_path,
                        time_limit_s=2, progress=False)
    assert [(c.status, c.reason) for c in cells] == [("failed", "cell exceeded its time limit of 2 s")]
    fine = eqbench.run("test-nll", "gaussian", "dw4", seed=0, overrides=OVERRIDES, results_dir=tmp_path,
                       time_limit_s=60, progress=False)
    assert [c.status for c in fine] == ["ok"]


def test_unsupported_pairs_are_set_aside_and_bad_names_refused(tmp_path):
    plan = plan_sweep("test-nll", ["gaussian"], ["dw4"], results_dir=tmp_path)
    assert len(plan.todo) == 1 and not plan.unsupported
    with pytest.raises(ConfigError, match="valid"):
        sweep("test-nll", ["gaussian"], ["dw4"], executor="spark", results_dir=tmp_path)
    with pytest.raises(ConfigError, match="seeds"):
        plan_sweep("test-nll", ["gaussian"], ["dw4"], seeds=0, results_dir=tmp_path)


def test_a_sweep_without_models_runs_the_builtin_models_only(tmp_path, monkeypatch):
    """Without --model a sweep runs eqbench's own models (the paper's and the Gaussian baseline);
    an installed plugin (here a stand-in entry point) runs only when named."""
    from eqbench.registry import MODELS, Entry

    MODELS.names()  # entry-point discovery first, so the stand-in is not overwritten by it
    monkeypatch.setitem(MODELS._plugins, "my-plugin-flow",
                        Entry("my-plugin-flow", "eqbench.flows.gaussian:build", "plugin my-flows"))
    builtin = {e.name for e in MODELS.entries() if e.origin == "eqbench"}
    assert {"kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "gaussian"} <= builtin
    assert "my-plugin-flow" in MODELS.names() and "my-plugin-flow" not in builtin
    plan = plan_sweep("test-nll", None, ["dw4"], results_dir=tmp_path)
    assert {c.model for c in plan.todo} | {m for m, _, _ in plan.unsupported} == builtin
    named = plan_sweep("test-nll", ["gaussian", "my-plugin-flow"], ["dw4"], results_dir=tmp_path)
    assert sorted(c.model for c in named.todo) == ["gaussian", "my-plugin-flow"]


@pytest.mark.parametrize("executor, module, extra", [("dask", "dask.distributed", "dask"), ("slurm", "submitit", "slurm")])
def test_a_missing_executor_extra_names_its_install_command(monkeypatch, tmp_path, executor, module, extra):
    from eqbench.executors import make_executor

    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(ConfigError, match=rf"pip install -c constraints.txt 'eqbench\[{extra}\]'"):
        make_executor(executor, jobs=1, results_dir=tmp_path)
