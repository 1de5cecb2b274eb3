"""eqbench installed from a built wheel (not the checkout) works from any directory.

The task profiles (``tasks/*.toml``) and published baselines (``baselines/published.csv``) stay at
the repository's top level; ``setup.py`` copies them into the built package and
:mod:`eqbench.resources` finds them there when no checkout holds the package. These tests build
the sdist and, from it, the wheel (as ``pip install`` of an sdist would), check what they carry,
and run the installed copy from a directory outside the repository, with the reference data
coming from the user's cache as usual.

The fast test "installs" by unpacking the wheel (a pure-Python wheel installs as exactly those
files) and runs it with ``python -S``, so the checkout's editable install (a ``site``-activated
import hook) cannot serve ``import eqbench`` instead; the slow one installs it with pip into a
fresh virtual environment. ``make wheel-check`` does the same with every dependency installed
from scratch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from eqbench import resources
from tests.conftest import REPO

#: One smoke cell each: test-nll on DW-2 (the smallest), and density-estimation on DW-4, whose
#: report section shows published numbers (the paper's DW-4 rows) beside the measured ones.
CELLS = (("test-nll", "gaussian", "dw2"), ("density-estimation", "gaussian", "dw4"))
PUBLISHED_CAPTION = "Published numbers (baselines/published.csv)"


def _shipped_sources() -> dict[str, Path]:
    """``{path in the wheel: top-level source file}`` of everything the wheel must ship."""
    expected = {}
    for directory, pattern in resources.SHIPPED_FILES.items():
        files = sorted((REPO / directory).glob(pattern))
        assert files, f"no {directory}/{pattern} in the checkout"
        for path in files:
            expected[f"eqbench/{resources.SHIPPED_DIR}/{directory}/{path.name}"] = path
    return expected


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist) of the working tree; the wheel is built from the sdist, not the tree."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, cwd=out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("eqbench-*.whl")
    (sdist,) = out.glob("eqbench-*.tar.gz")
    return wheel, sdist


def test_wheel_ships_profiles_baselines_and_py_typed(dists):
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for inside, source in _shipped_sources().items():
            assert inside in names, f"{wheel.name} lacks {inside}"
            assert zf.read(inside) == source.read_bytes(), f"{inside} differs from {source}"
        shipped = {n for n in names if n.startswith(f"eqbench/{resources.SHIPPED_DIR}/")}
        assert shipped == set(_shipped_sources()), "the wheel ships files that are not in the checkout"
        assert "eqbench/py.typed" in names
        assert "eqbench/resources.py" in names


def test_sdist_carries_the_top_level_data_not_generated_copies(dists):
    _, sdist = dists
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for source in _shipped_sources().values():
        assert str(source.relative_to(REPO)) in names
    assert {"setup.py", "MANIFEST.in", "eqbench/py.typed"} <= names
    assert not any(n.startswith(f"eqbench/{resources.SHIPPED_DIR}") for n in names)


def test_checkout_reads_top_level_files_and_env_overrides(monkeypatch, tmp_path):
    """From the checkout the top-level files are read (edits apply without reinstalling)."""
    from eqbench.config import tasks_dir
    from eqbench.report import baselines_path

    monkeypatch.delenv("EQBENCH_TASKS_DIR", raising=False)
    assert resources.checkout_root() == REPO
    assert tasks_dir() == REPO / "tasks"
    assert baselines_path() == REPO / "baselines" / "published.csv"
    monkeypatch.setenv("EQBENCH_TASKS_DIR", str(tmp_path))
    assert tasks_dir() == tmp_path


def _python_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EQBENCH_TASKS_DIR", "PYTHONPATH", "PYTHONHOME")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _check(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _run_cells_and_report(python: list[str], env: dict[str, str], work: Path, site: Path) -> None:
    """From ``work`` (outside the repo): the package imported is the installed one, the smoke
    cells run from the shipped profiles, and the report shows the shipped published numbers."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*python, *args], capture_output=True, text=True, env=env, cwd=work, timeout=900)

    where = _check(run("-c", "import eqbench, eqbench.config as c, eqbench.report as r; "
                             "print(eqbench.__file__); print(c.tasks_dir()); print(r.baselines_path())"), "import")
    pkg, tasks, baselines = (Path(line) for line in where.stdout.split())
    shipped = site / "eqbench" / resources.SHIPPED_DIR
    assert pkg.resolve().is_relative_to(site.resolve()), f"imported {pkg}, not the installed copy in {site}"
    assert tasks.resolve() == (shipped / "tasks").resolve()
    assert baselines.resolve() == (shipped / "baselines" / "published.csv").resolve()

    results = work / "results"
    for task, model, system in CELLS:
        _check(run("-m", "eqbench", "run", "--task", task, "--model", model, "--system", system,
                   "--profile", "smoke", "--results", str(results), "--no-plot"), f"run {task} {system}")
        assert list((results / "cells" / task).glob("*.json")), f"no cell file of {task} under {results}"
    report = _check(run("-m", "eqbench", "report", "--results", str(results)), "report")
    assert "no published baselines" not in report.stderr, report.stderr
    html = (results / "report.html").read_text(encoding="utf-8")
    assert PUBLISHED_CAPTION in html and "kohler2020" in html, "the report shows no published numbers"
    assert not (work / "tasks").exists() and not (work / "baselines").exists()


@pytest.mark.slow  # `make wheel-check` (CI) runs the installed wheel from another directory
def test_unpacked_wheel_runs_from_another_directory(dists, tmp_path):
    wheel, _ = dists
    site, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    env = _python_env()
    # -S: no site-packages processing, so the checkout's editable hook is not installed; the
    # dependencies come from the test's environment, after the unpacked wheel.
    env["PYTHONPATH"] = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    python = [sys.executable, "-S"]
    _run_cells_and_report(python, env, work, site)

    # An unrelated project's tree around the installed package is not taken for a checkout.
    (site / "tasks").mkdir()
    (site / "pyproject.toml").write_text('[project]\nname = "other"\n', encoding="utf-8")
    probe = "import eqbench.resources as r; print(r.checkout_root(), r.tasks_dir())"
    out = _check(subprocess.run([*python, "-c", probe], capture_output=True, text=True, env=env, cwd=work), "probe")
    assert out.stdout.split()[0] == "None" and resources.SHIPPED_DIR in out.stdout

    # Without shipped profiles (a package built without setup.py's hook): one line, exit 2.
    for path in (site / "eqbench" / resources.SHIPPED_DIR / "tasks").iterdir():
        path.unlink()
    (site / "eqbench" / resources.SHIPPED_DIR / "tasks").rmdir()
    out = subprocess.run([*python, "-m", "eqbench", "describe", "test-nll"], capture_output=True, text=True,
                         env=env, cwd=work)
    assert out.returncode == 2, out.stderr
    assert "no task profiles" in out.stderr and "EQBENCH_TASKS_DIR" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.slow
def test_pip_installed_wheel_in_fresh_venv(dists, tmp_path):
    """pip installs the wheel (RECORD, console script) into a new venv; dependencies are made
    visible through a .pth to this environment's site-packages rather than reinstalled."""
    wheel, _ = dists
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    _check(subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True,
                          text=True), "venv")
    python = venv / "bin" / "python"
    _check(subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=600), "pip install")
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # A path in a .pth is appended after the venv's own site-packages; .pth files inside it (the
    # checkout's editable hook) are not processed, so eqbench resolves to the installed wheel.
    (site / "_eqbench_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    _run_cells_and_report([str(python)], _python_env(), work, site)
    out = _check(subprocess.run([str(venv / "bin" / "eqbench"), "describe", "test-nll"], capture_output=True,
                                text=True, env=_python_env(), cwd=work), "console script")
    assert "smoke" in out.stdout
