"""The data cache under faults and bad input: a read-only cache, truncated or mislabelled pools,
JSONs without their diagnostics and unusable ``EQBENCH_CACHE`` values give one line (a
:class:`DataError`, exit 2 from the command line), never a traceback and never silently wrong data.

The small ``harmonic`` system stands in for the real ones: its data sets are copied from the user's
cache (generated once), so nothing here regenerates LJ-13.

Read-only: the tests may run as root, for whom ``chmod a-w`` blocks nothing. The command-line
tests then run the subprocess with ``CAP_DAC_OVERRIDE`` dropped from its capability bounding set
(``setpriv``), so the permissions are really enforced; the in-process tests make ``os.access``
report the copy as read-only and check that nothing was written.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import eqbench
from eqbench.cli import main
from eqbench.data import diagnostics as diag
from eqbench.data import store
from eqbench.errors import DataError
from tests.conftest import REPO, run_cli

HARMONIC = eqbench.get_system("harmonic")
TRAIN_ROWS = HARMONIC.data_protocol.size("train")


def _copy_cache(target: Path, splits: tuple[str, ...] = store.SPLITS) -> Path:
    """A cache directory holding verified copies of harmonic's data sets (no lock files)."""
    (target / "data").mkdir(parents=True)
    for split in splits:
        store.ensure_dataset(HARMONIC, split)  # the user's cache: generated once, then reused
        for path in store.dataset_paths(HARMONIC, split):
            shutil.copy(path, target / "data" / path.name)
    return target


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _set_writable(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture
def read_only(monkeypatch):
    """``make(root)``: chmod -R a-w ``root``; as root, ``os.access`` also reports it unwritable
    (root's writes are not blocked by modes). Restores write access at teardown (for tmp cleanup)."""
    made = []

    def make(root: Path) -> Path:
        _set_writable(root, False)
        made.append(root)
        if os.geteuid() == 0:
            real_access = os.access

            def access(path, mode, *args, **kwargs):
                inside = Path(os.path.abspath(path)).is_relative_to(root)
                return False if inside and mode & os.W_OK else real_access(path, mode, *args, **kwargs)

            monkeypatch.setattr(os, "access", access)
        return root

    yield make
    for root in made:
        _set_writable(root, True)


@pytest.fixture(scope="module")
def enforcing_prefix(tmp_path_factory):
    """A command prefix under which a read-only directory really refuses writes: none for a normal
    user; for root, ``setpriv`` dropping CAP_DAC_OVERRIDE. Skips when neither works here."""
    probe = tmp_path_factory.mktemp("probe")
    probe.chmod(0o555)
    candidates = [[]]
    if shutil.which("setpriv"):
        candidates.append(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"])
    try:
        for k, prefix in enumerate(candidates):
            works = subprocess.run([*prefix, "true"], capture_output=True).returncode == 0
            denied = subprocess.run([*prefix, "touch", str(probe / f"x{k}")], capture_output=True).returncode != 0
            if works and denied:
                return prefix
    finally:
        probe.chmod(0o755)
    pytest.skip("running as root without setpriv: a read-only directory cannot be enforced here")


def _run_enforced(prefix: list[str], *args: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, EQBENCH_CACHE=str(cache))
    return subprocess.run([*prefix, sys.executable, "-m", "eqbench", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _rewrite(path: Path, samples: np.ndarray) -> None:
    """Replace a data set's array and make its JSON agree with it (sha256, shape, sample count)."""
    meta_path = path.with_suffix(".json")
    np.save(path, samples)
    meta = json.loads(meta_path.read_text())
    meta.update(sha256=diag.sha256_file(path), shape=list(samples.shape), n_samples=int(samples.shape[0]))
    meta_path.write_text(json.dumps(meta))


# ----------------------------------------------------------------------------------- read-only cache
def test_read_only_cache_with_valid_data_loads_without_writing(tmp_path, monkeypatch, read_only):
    cache = read_only(_copy_cache(tmp_path / "cache"))
    monkeypatch.setenv("EQBENCH_CACHE", str(cache))
    before = _snapshot(cache)

    def no_lock(path):
        raise AssertionError("reading a verified data set took the generation lock")

    monkeypatch.setattr(store, "_exclusive", no_lock)
    x = eqbench.load_data("harmonic", "test", n=5, seed=1)
    assert x.shape == (5, *HARMONIC.event_shape)
    assert all(store.verify_dataset(HARMONIC, split)[0] == "ok" for split in store.SPLITS)
    store.check_data_available([HARMONIC])  # nothing to generate: no complaint about the cache
    _, d = store.ensure_dataset(HARMONIC, "train")
    assert d["path"] == str(store.dataset_paths(HARMONIC, "train")[0])  # where it is now, not where made
    assert _snapshot(cache) == before  # no lock file, no temp file, nothing rewritten


def test_read_only_cache_missing_data_is_one_line_error(tmp_path, monkeypatch, read_only, capsys):
    cache = read_only(_copy_cache(tmp_path / "cache", splits=("train", "test")))
    monkeypatch.setenv("EQBENCH_CACHE", str(cache))
    with pytest.raises(DataError) as caught:
        eqbench.load_data("harmonic", "val", n=5)
    message = _one_line(str(caught.value))
    assert "harmonic val reference data is missing" in message
    assert str(cache / "data") in message and "not writable" in message
    assert "python -m eqbench data harmonic" in message and "EQBENCH_CACHE" in message
    with pytest.raises(DataError, match=r"harmonic val \(missing\).*not writable"):
        store.check_data_available([HARMONIC])  # refused before any work
    capsys.readouterr()
    assert main(["data", "harmonic"]) == 2
    captured = capsys.readouterr()
    assert not captured.out  # refused before printing the sets that are there
    assert "harmonic val (missing)" in _one_line(captured.err) and str(cache / "data") in captured.err
    assert main(["data", "harmonic", "--verify"]) == 2
    captured = capsys.readouterr()
    assert "harmonic val: missing" in captured.out and "not writable" in _one_line(captured.err)
    store.check_data_available([HARMONIC], splits=("train", "test"))
    with pytest.raises(DataError, match="not writable"):
        store.ensure_datasets([HARMONIC], jobs=2)  # refused before a worker starts


def test_read_only_cache_cli_enforced(tmp_path, enforcing_prefix):
    """The measured failure: with a valid read-only cache every cell failed with PermissionError
    on the .lock file. Here the permissions are really enforced (see the module docstring): the
    cell runs, and nothing in the cache changes."""
    cache = _copy_cache(tmp_path / "cache")
    _set_writable(cache, False)
    try:
        before = _snapshot(cache)
        run = ["run", "--task", "test-nll", "--model", "gaussian", "--set", "n_test=100", "--no-plot",
               "--no-artifacts"]
        out = _run_enforced(enforcing_prefix, *run, "--system", "harmonic", "--results", str(tmp_path / "ok"),
                            cache=cache)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "(0 failed)" in out.stdout
        assert _snapshot(cache) == before
    finally:
        _set_writable(cache, True)


@pytest.mark.parametrize("entry", ["run", "sweep", "evaluate"])
def test_run_on_read_only_cache_missing_data_is_refused_before_any_work(tmp_path, monkeypatch, read_only, entry):
    """A run, sweep or evaluation whose data are missing from a read-only cache is refused before
    any cell runs or anything is written, in one line naming the data set and the fix."""
    from eqbench.sweep import sweep

    cache = read_only(_copy_cache(tmp_path / "cache", splits=()))
    monkeypatch.setenv("EQBENCH_CACHE", str(cache))
    results = tmp_path / "results"
    calls = {
        "run": lambda: eqbench.run("test-nll", "gaussian", "dw2", "smoke", overrides={"n_test": 100},
                                   results_dir=results, progress=False, artifacts=False),
        "sweep": lambda: sweep("test-nll", ["gaussian"], ["dw2"], "smoke", overrides={"n_test": 100},
                               results_dir=results, progress=False),
        "evaluate": lambda: eqbench.evaluate("gaussian", "dw2", results_dir=results),
    }
    with pytest.raises(DataError) as info:
        calls[entry]()
    message = str(info.value)
    assert "\n" not in message and "dw2" in message and "not writable" in message
    assert not (results / "cells").exists()


# ------------------------------------------------------------------------- pools that do not fit
def test_truncated_pool_with_consistent_json_is_caught(tmp_path, monkeypatch, capsys):
    """A 50-row training pool whose JSON agrees with it (sha256, shape) used to pass --verify and
    be used silently; the protocol requires 10,000 rows. Caught by --verify and by every load,
    and a writable cache regenerates it bit for bit."""
    cache = _copy_cache(tmp_path / "cache")
    monkeypatch.setenv("EQBENCH_CACHE", str(cache))
    path = store.dataset_paths(HARMONIC, "train")[0]
    original = json.loads(path.with_suffix(".json").read_text())["sha256"]
    _rewrite(path, np.load(path)[:50])
    state, detail = store.verify_dataset(HARMONIC, "train")
    assert state == "corrupt" and f"requires ({TRAIN_ROWS}, 4, 3)" in detail and "(50, 4, 3)" in detail
    capsys.readouterr()
    assert main(["data", "harmonic", "--verify"]) == 2
    captured = capsys.readouterr()
    assert "harmonic train: corrupt" in captured.out and "harmonic test: ok" in captured.out
    assert "harmonic train" in _one_line(captured.err)
    with pytest.raises(DataError, match="requires"):
        store.load_pool(HARMONIC, "train", regenerate="never")
    with pytest.warns(UserWarning, match="corrupt"):
        x = eqbench.load_data("harmonic", "train")
    assert x.shape == (TRAIN_ROWS, 4, 3)
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == original
    assert store.verify_dataset(HARMONIC, "train")[0] == "ok"


def test_truncated_pool_in_read_only_cache_is_one_line_error(tmp_path, monkeypatch, read_only):
    cache = tmp_path / "cache"
    _copy_cache(cache)
    path = store.dataset_paths(HARMONIC, "train")[0]
    _rewrite(cache / "data" / path.name, np.load(path)[:50])
    read_only(cache)
    monkeypatch.setenv("EQBENCH_CACHE", str(cache))
    with pytest.raises(DataError) as caught:
        eqbench.load_data("harmonic", "train", n=10)
    message = _one_line(str(caught.value))
    assert "harmonic train reference data is corrupt" in message and "(50, 4, 3)" in message
    assert "not writable" in message and "EQBENCH_CACHE" in message


@pytest.mark.parametrize("fault", ["json shape", "json count", "dtype", "particles", "system"])
def test_verify_checks_shape_count_dtype_against_json_and_protocol(tmp_path, monkeypatch, fault):
    cache = _copy_cache(tmp_path / "cache", splits=("val",))
    monkeypatch.setenv("EQBENCH_CACHE", str(cache))
    path = store.dataset_paths(HARMONIC, "val")[0]
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    pool = np.load(path)
    if fault == "json shape":
        meta["shape"] = [len(pool), 5, 3]
        meta_path.write_text(json.dumps(meta))
        expected = "its JSON records shape"
    elif fault == "json count":
        meta["n_samples"] = 10
        meta_path.write_text(json.dumps(meta))
        expected = "10 samples"
    elif fault == "dtype":
        _rewrite(path, pool.astype(np.float32))
        expected = "float32"
    elif fault == "particles":
        _rewrite(path, pool[:, :3])
        expected = "requires (2000, 4, 3)"
    else:
        meta["system"] = "dw4"
        meta_path.write_text(json.dumps(meta))
        expected = "records system 'dw4'"
    state, detail = store.verify_dataset(HARMONIC, "val")
    assert state == "corrupt" and expected in detail, detail
    with pytest.raises(DataError, match="corrupt"):
        store.load_pool(HARMONIC, "val", regenerate="never")


@pytest.mark.parametrize("content", ['{"sha256": "0"}', "[1, 2]", '{"shape": [2000, 4, 3]', ""])
def test_json_without_diagnostics_is_one_line(tmp_path, monkeypatch, read_only, capsys, content):
    cache = _copy_cache(tmp_path / "cache", splits=("val",))
    monkeypatch.setenv("EQBENCH_CACHE", str(cache))
    store.dataset_paths(HARMONIC, "val")[1].write_text(content)
    state, detail = store.verify_dataset(HARMONIC, "val")
    assert state == "corrupt" and "\n" not in detail
    read_only(cache)
    with pytest.raises(DataError) as caught:
        store.load_pool(HARMONIC, "val")
    assert "harmonic val reference data is corrupt" in _one_line(str(caught.value))
    capsys.readouterr()
    assert main(["data", "harmonic"]) == 2
    assert "harmonic val (corrupt)" in _one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------- unusable EQBENCH_CACHE
@pytest.mark.parametrize("where", ["a file", "under a file"])
@pytest.mark.parametrize("verify", [False, True])
def test_cache_that_is_a_file_is_exit_2_one_line(tmp_path, monkeypatch, capsys, where, verify):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    monkeypatch.setenv("EQBENCH_CACHE", str(afile if where == "a file" else afile / "sub"))
    capsys.readouterr()
    assert main(["data", "harmonic", *(["--verify"] if verify else [])]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{afile} is a file, not a directory" in line and "EQBENCH_CACHE" in line
    with pytest.raises(DataError, match="is a file, not a directory"):
        eqbench.load_data("harmonic", "val", n=3)


def test_cache_that_is_a_file_cli_subprocess(tmp_path):
    """The same through ``python -m eqbench``: exit 2 and one line, no traceback."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    out = run_cli("data", "harmonic", env={"EQBENCH_CACHE": str(afile)})
    assert out.returncode == 2
    assert f"{afile} is a file, not a directory" in _one_line(out.stderr)


def test_cache_whose_parent_cannot_be_created_is_exit_2_one_line(tmp_path, monkeypatch, read_only, capsys):
    parent = read_only(_copy_cache(tmp_path / "cache", splits=()))
    monkeypatch.setenv("EQBENCH_CACHE", str(parent / "new" / "cache"))
    if os.geteuid() == 0:  # root's mkdir ignores the mode: make it fail as it would for a user
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self.is_relative_to(parent):
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    capsys.readouterr()
    assert main(["data", "harmonic"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "cannot be created" in line and "Permission denied" in line and "EQBENCH_CACHE" in line
    with pytest.raises(DataError, match="cannot be created"):
        eqbench.load_data("harmonic", "val", n=3)
    # Verifying writes nothing: what is not there is reported missing, exit 2, with the fix.
    assert main(["data", "harmonic", "--verify"]) == 2
    captured = capsys.readouterr()
    assert captured.out.count(": missing") == 3 and "EQBENCH_CACHE" in _one_line(captured.err)


def test_read_only_cache_must_regenerate_is_exit_2_one_line(tmp_path, monkeypatch, read_only, capsys):
    cache = read_only(_copy_cache(tmp_path / "cache"))
    monkeypatch.setenv("EQBENCH_CACHE", str(cache))
    capsys.readouterr()
    assert main(["data", "harmonic", "--regenerate"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "must be regenerated" in line and "not writable" in line
