"""Sweeps (issue 6): executors agree with single runs, failures stay in their cell, kills resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from html import escape as html_escape

import pytest

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


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_killed_sweep_resumes_with_every_cell_exactly_once(tmp_path, signum):
    args = [sys.executable, "-m", "eqbench", "sweep", "--task", "test-nll", "--model", "gaussian", "kernel-flow",
            "--system", "dw4", "dw2", "--set", "iterations=3", "--set", "n_test=50", "--seeds", "3",
            "--threads", "1", "--results", str(tmp_path), "--no-plot"]
    # Twelve cells: enough that the sweep is still running when the first cell file appears.
    expected = len(plan_sweep("test-nll", ["gaussian", "kernel-flow"], ["dw4", "dw2"], seeds=3,
                              overrides=OVERRIDES, results_dir=tmp_path).todo)
    # SIGINT back to its default in the child: a test run started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python keeps an inherited SIG_IGN.
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    cells = tmp_path / "cells" / "test-nll"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cells.glob("*.json"))) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signum)  # the parent and its workers (SIGKILL: no cleanup; SIGINT: as a terminal's Ctrl-C)
    assert proc.wait(timeout=60) in (-signal.SIGKILL, 130)
    assert 0 < len(list(cells.glob("*.json"))) < expected
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    files = sorted(cells.glob("*.json"))
    assert len(files) == expected
    assert not [p for p in cells.iterdir() if p.name.startswith(".") and p.is_file()]  # no temp files left
    store = CellStore(tmp_path)
    assert all(store.read("test-nll", p.stem).status == "ok" for p in files)


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
