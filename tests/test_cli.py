"""The command line: listing without torch, run/collect end to end, and bad input (exit code 2)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from eqbench.cli import main
from tests.conftest import REPO, run_cli


def test_list_shows_origin_without_importing_torch():
    # Listing loads plugin targets to show their descriptions (and a plugin may import torch), so
    # installed plugins (e.g. examples/zuko_spline) are hidden here: built-ins must stay unimported.
    code = textwrap.dedent("""
        import importlib.metadata, sys
        _entry_points = importlib.metadata.entry_points
        importlib.metadata.entry_points = lambda **kw: (
            importlib.metadata.EntryPoints(()) if str(kw.get("group", "")).startswith("eqbench.")
            else _entry_points(**kw))
        from eqbench.cli import main
        assert main(["list"]) == 0
        assert "torch" not in sys.modules, "eqbench list imported torch"
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for name in ("dw2", "dw4", "lj13", "gaussian", "test-nll", "eqbench"):
        assert name in out.stdout


def test_describe_states_conventions(capsys):
    assert main(["describe", "lj13"]) == 0
    text = capsys.readouterr().out
    assert "ORDERED pairs" in text and "33.082" in text
    assert main(["describe", "test-nll"]) == 0
    assert "smoke" in capsys.readouterr().out
    assert main(["describe", "gaussian"]) == 0


def test_run_writes_cells_and_rerun_skips_them(tmp_path, capsys):
    results = tmp_path / "results"
    args = ["run", "--task", "test-nll", "--model", "gaussian", "--system", "dw4", "--results", str(results),
            "--set", "n_train=[10,100]", "--set", "n_test=500"]
    assert main(args) == 0
    table = pd.read_csv(results / "results.csv")
    assert set(table["metric"]) >= {"nll_train", "nll_test", "n_parameters"}
    assert sorted(table["n_train"].unique()) == [10, 100]
    assert (table["status"] == "ok").all()
    cells = sorted((results / "cells" / "test-nll").glob("*.json"))
    assert len(cells) == 2
    mtimes = [c.stat().st_mtime_ns for c in cells]
    capsys.readouterr()
    assert main(args) == 0
    assert [c.stat().st_mtime_ns for c in cells] == mtimes  # finished cells were not rerun
    assert np.isfinite(table["value"]).all()


def test_collect_reports_failed_cells(tmp_path):
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text(textwrap.dedent("""
        from eqbench.flows.gaussian import IsotropicGaussian

        class Broken(IsotropicGaussian):
            def fit_closed_form(self, x):
                raise RuntimeError("boom")

        def build(system, config):
            return Broken(system)
    """))
    results = tmp_path / "results"
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    out = run_cli("run", "--task", "test-nll", "--model", "broken_plugin:build", "--system", "dw2",
                  "--results", str(results), "--set", "n_test=100", env=env)
    assert out.returncode == 1, out.stderr
    assert "FAILED" in out.stdout and "boom" in out.stdout
    ok = run_cli("run", "--task", "test-nll", "--model", "gaussian", "--system", "dw2",
                 "--results", str(results), "--set", "n_test=100", env=env)
    assert ok.returncode == 0, ok.stderr
    collected = run_cli("collect", "--results", str(results), env=env)
    assert collected.returncode == 0
    assert "failed cell" in collected.stdout and "boom" in collected.stdout
    table = pd.read_csv(results / "results.csv")
    assert set(table.status) == {"ok", "failed"}
    assert table.loc[table.status == "failed", "metric"].tolist() == ["cell_failed"]


BAD_INPUTS = [
    (["run", "--task", "test-nll", "--model", "gaussian", "--system", "lj31"], "unknown system 'lj31'", "lj13"),
    (["run", "--task", "test-nll", "--model", "gausian", "--system", "dw4"], "unknown model 'gausian'", "gaussian"),
    (["run", "--task", "tst-nll", "--model", "gaussian", "--system", "dw4"], "unknown task 'tst-nll'", "test-nll"),
    (["run", "--task", "test-nll", "--model", "gaussian", "--system", "dw4", "--profile", "huge"],
     "unknown profile 'huge'", "smoke, quick, paper"),
    (["run", "--task", "test-nll", "--model", "gaussian", "--system", "dw4", "--set", "n_train"],
     "malformed --set", "key=value"),
    (["run", "--task", "test-nll", "--model", "gaussian", "--system", "dw4", "--set", "n_trian=5"],
     "unknown setting 'n_trian'", "n_train"),
    (["run", "--task", "test-nll", "--model", "gaussian", "--system", "dw4", "--set", "n_train=-5"],
     "positive integer", "-5"),
    (["run", "--task", "test-nll", "--model", "gaussian", "--system", "dw4", "--device", "cuda:0"],
     "device", "valid"),
    (["describe", "nothing"], "unknown system, model or task 'nothing'", "dw4"),
]


@pytest.fixture(scope="module")
def finished_results(tmp_path_factory):
    """A results directory holding one finished cell, to check that bad input loses nothing."""
    results = tmp_path_factory.mktemp("results")
    assert main(["run", "--task", "test-nll", "--model", "gaussian", "--system", "dw2",
                 "--results", str(results), "--set", "n_test=100"]) == 0
    return results


@pytest.mark.parametrize("argv, problem, valid", BAD_INPUTS, ids=[" ".join(a[-2:]) for a, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(finished_results, capsys, argv, problem, valid):
    results = finished_results
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    capsys.readouterr()
    args = argv + (["--results", str(results)] if argv[0] == "run" else [])
    code = main(args)
    err = capsys.readouterr().err
    if "cuda" in " ".join(argv) and code != 2:
        pytest.skip("CUDA is available here, so --device cuda:0 is valid")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert problem in lines[0] and valid in lines[0], lines[0]
    after = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    assert after == before


def test_data_verify_reports_corrupt_cache_with_exit_2(tmp_path):
    import eqbench
    from eqbench.data import store

    system = eqbench.get_system("dw2")
    (tmp_path / "data").mkdir()
    for split in store.SPLITS:  # a copy of the verified cache, so nothing is regenerated
        for path in store.dataset_paths(system, split):
            if not path.exists():
                store.ensure_dataset(system, split)
            shutil.copy(path, tmp_path / "data" / path.name)
    env = {"EQBENCH_CACHE": str(tmp_path)}
    npy = sorted((tmp_path / "data").glob("dw2-train-*.npy"))[0]
    npy.write_bytes(npy.read_bytes()[:-16])
    out = run_cli("data", "dw2", "--verify", env=env)
    assert out.returncode == 2
    assert "corrupt" in out.stdout
    # The test split stays intact: nothing else was touched.
    assert "dw2 test: ok" in out.stdout


def test_community_file_of_wrong_shape_exit_2(tmp_path):
    bad = tmp_path / "DEM"
    bad.mkdir()
    for name in ("train_split_DW4.npy", "val_split_DW4.npy", "test_split_DW4.npy"):
        np.save(bad / name, np.zeros((5, 3)))
    out = run_cli("data", "dw4", "--source", "community", env={"EQBENCH_REFERENCE_DATA": str(tmp_path)})
    assert out.returncode == 2
    line = out.stderr.strip()
    assert "shape (5, 3)" in line and "(n, 8)" in line and len(line.splitlines()) == 1


def test_help_teaches():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "examples:" in out.stdout and "describe lj13" in out.stdout
