"""Results store: cell ids, atomic per-cell files, crash leftovers, collect schema, provenance."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from eqbench.records import (
    CELL_FAILED,
    PROVENANCE_KEYS,
    RECORD_COLUMNS,
    CellResult,
    CellStore,
    Record,
    canonical_json,
    cell_id,
    now_iso,
    provenance,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

FAKE_PROVENANCE: dict[str, Any] = {
    "git_sha": "abc123",
    "eqbench_version": "0.1.0",
    "torch_version": "2.13.0",
    "python_version": "3.11.7",
    "numpy_version": "2.4.6",
    "device": "cpu",
    "threads": 4,
    "hostname": "testhost",
    "platform": "Linux-test",
}


def make_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "task": "density-estimation",
        "system": "dw4",
        "model": "kernel-flow",
        "profile": "smoke",
        "n_train": 1000,
        "seed": 0,
        "lr": 1e-3,
    }
    config.update(overrides)
    return config


def make_cell(
    config: dict[str, Any],
    status: str = "ok",
    reason: str = "",
    values: dict[str, float] | None = None,
) -> CellResult:
    values = {"nll_test": 1.5, "ess_fraction": 0.25} if values is None else values
    records = [
        Record(
            task=config["task"],
            system=config["system"],
            model=config["model"],
            metric=metric,
            value=value,
            n_train=config["n_train"],
            seed=config["seed"],
        )
        for metric, value in values.items()
    ]
    return CellResult(
        task=config["task"],
        cell_id=cell_id(config),
        config=config,
        status=status,
        reason=reason,
        started_at=now_iso(),
        duration_s=2.5,
        provenance=dict(FAKE_PROVENANCE),
        records=records,
    )


def stray_files(root: Path) -> list[Path]:
    return [
        p for p in root.rglob("*") if p.is_file() and (p.name.startswith(".") or p.suffix == ".tmp")
    ]


# -- cell identity ------------------------------------------------------------------------------


def test_cell_id_is_stable_across_key_order_and_sensitive_to_changes() -> None:
    config = make_config(nested={"b": 2, "a": [1, 2.5]})
    reordered = dict(reversed(list(config.items())))
    reordered["nested"] = {"a": [1, 2.5], "b": 2}
    assert cell_id(config) == cell_id(reordered)
    assert len(cell_id(config)) == 16 and all(c in "0123456789abcdef" for c in cell_id(config))
    # a known value pins the canonical form: changing it would orphan every stored result
    assert canonical_json({"b": [1.0, 0.1], "a": "x"}) == '{"a":"x","b":[1.0,0.1]}'

    changed = [
        make_config(seed=1),
        make_config(lr=1e-4),
        make_config(profile="quick"),
        make_config(extra=None),
        make_config(nested={"b": 2, "a": [1, 2.5000001]}),
    ]
    ids = {cell_id(c) for c in changed}
    assert len(ids) == len(changed) and cell_id(config) not in ids


def test_cell_id_accepts_numpy_scalars_like_python_numbers() -> None:
    assert cell_id({"seed": np.int64(3), "lr": np.float64(0.1)}) == cell_id({"seed": 3, "lr": 0.1})
    with pytest.raises(TypeError, match="cannot serialise"):
        canonical_json({"x": object()})


# -- writing and reading ------------------------------------------------------------------------


def test_write_is_atomic_and_round_trips(tmp_path: Path) -> None:
    store = CellStore(tmp_path)
    cell = make_cell(make_config())
    path = store.write(cell)

    assert path == tmp_path / "cells" / "density-estimation" / f"{cell.cell_id}.json"
    assert path == store.path(cell.task, cell.cell_id)
    assert stray_files(tmp_path) == []
    assert store.read(cell.task, cell.cell_id) == cell
    assert store.is_done(cell.task, cell.cell_id)
    assert store.read(cell.task, "0" * 16) is None
    assert not store.is_done(cell.task, "0" * 16)


def test_failed_cell_is_not_done(tmp_path: Path) -> None:
    store = CellStore(tmp_path)
    cell = make_cell(make_config(), status="failed", reason="NaN loss at step 12")
    store.write(cell)
    assert store.read(cell.task, cell.cell_id) is not None
    assert not store.is_done(cell.task, cell.cell_id)
    with pytest.raises(ValueError, match="status"):
        store.write(make_cell(make_config(), status="done"))


def test_killed_writer_leftovers_do_not_break_is_done_or_collect(tmp_path: Path) -> None:
    store = CellStore(tmp_path)
    good = make_cell(make_config(seed=0))
    store.write(good)

    # a writer killed mid-write: its temp file stays behind ...
    task_dir = store.path(good.task, good.cell_id).parent
    (task_dir / f".{good.cell_id}.json.abcd1234.tmp").write_text('{"task": "density-est')
    # ... and, on a filesystem without atomic rename, a truncated file at a final path
    broken = make_cell(make_config(seed=1))
    truncated = store.path(broken.task, broken.cell_id)
    truncated.write_text(store.path(good.task, good.cell_id).read_text()[:40])

    with pytest.warns(UserWarning, match=str(truncated.name)):
        assert not store.is_done(broken.task, broken.cell_id)
    with pytest.warns(UserWarning, match="ignoring cell file .*: unreadable"):
        df = store.collect()
    assert list(df["cell_id"].unique()) == [good.cell_id]

    # the rerun overwrites the broken file atomically and is then picked up
    store.write(broken)
    assert store.is_done(broken.task, broken.cell_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(store.collect()["cell_id"]) == {good.cell_id, broken.cell_id}


def test_same_config_overwrites_instead_of_duplicating(tmp_path: Path) -> None:
    store = CellStore(tmp_path)
    config = make_config()
    store.write(make_cell(config, status="failed", reason="killed"))
    store.write(make_cell(config, values={"nll_test": 1.0}))
    store.write(make_cell(dict(reversed(list(config.items()))), values={"nll_test": 0.5}))

    df = store.collect()
    assert len(df) == 1
    assert df.loc[0, "value"] == 0.5 and df.loc[0, "status"] == "ok"
    assert len(list(store.iter_cells())) == 1


# -- collect ------------------------------------------------------------------------------------


def test_collect_schema_failed_rows_and_nan(tmp_path: Path) -> None:
    store = CellStore(tmp_path)
    ok = make_cell(make_config(seed=0), values={"nll_test": 1.25, "ess_fraction": math.nan})
    failed = make_cell(
        make_config(seed=1),
        status="failed",
        reason="RuntimeError: CUDA out of memory",
        values={"nll_test": 9.0},
    )
    other_task = make_cell(
        make_config(task="sampling", model="real-nvp", seed=0), values={"wall_s": 3.0}
    )
    for cell in (failed, other_task, ok):
        store.write(cell)

    df = store.collect()
    assert tuple(df.columns) == RECORD_COLUMNS
    assert (
        len(df) == 2 + 1 + 1
    )  # a failed cell contributes exactly one row, not its partial records

    failed_rows = df[df["status"] == "failed"]
    assert len(failed_rows) == 1
    row = failed_rows.iloc[0]
    assert row["metric"] == CELL_FAILED and math.isnan(row["value"])
    assert row["reason"] == "RuntimeError: CUDA out of memory"
    assert (row["cell_id"], row["system"], row["model"], row["seed"]) == (
        failed.cell_id,
        "dw4",
        "kernel-flow",
        1,
    )

    ess = df[df["metric"] == "ess_fraction"]
    assert len(ess) == 1 and math.isnan(ess["value"].iloc[0])  # NaN is a value, kept as NaN

    nll = df[(df["metric"] == "nll_test") & (df["status"] == "ok")].iloc[0]
    assert nll["value"] == 1.25 and nll["n_train"] == 1000 and nll["profile"] == "smoke"
    assert nll["config_json"] == canonical_json(ok.config)
    assert nll["duration_s"] == 2.5 and nll["started_at"] == ok.started_at
    assert all(nll[key] == FAKE_PROVENANCE[key] for key in PROVENANCE_KEYS)

    # deterministic order: task first, then seed, then metric
    assert list(df["task"]) == ["density-estimation"] * 3 + ["sampling"]
    assert list(df["metric"][:3]) == ["ess_fraction", "nll_test", CELL_FAILED]

    # the CSV written beside the cells is the same table (integers stay integers)
    csv_path = tmp_path / "results.csv"
    assert stray_files(tmp_path) == []
    back = pd.read_csv(csv_path, keep_default_na=False, na_values=[""])
    assert tuple(back.columns) == RECORD_COLUMNS
    assert list(back["metric"]) == list(df["metric"])
    assert back["value"].isna().sum() == 2
    assert "1000" in csv_path.read_text() and "1000.0" not in csv_path.read_text()


def test_collect_is_deterministic_and_honours_out(tmp_path: Path) -> None:
    store = CellStore(tmp_path / "results")
    for seed in (2, 0, 1):
        store.write(make_cell(make_config(seed=seed)))
    first = store.collect(tmp_path / "a.csv")
    second = store.collect(tmp_path / "b.csv")
    pd.testing.assert_frame_equal(first, second)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert list(first["seed"]) == [0, 0, 1, 1, 2, 2]
    assert not (tmp_path / "results" / "results.csv").exists()


def test_collect_of_empty_store_has_schema(tmp_path: Path) -> None:
    df = CellStore(tmp_path).collect()
    assert tuple(df.columns) == RECORD_COLUMNS and df.empty
    assert (tmp_path / "results.csv").read_text().strip() == ",".join(RECORD_COLUMNS)


def test_task_given_as_module_path_gets_a_safe_directory(tmp_path: Path) -> None:
    store = CellStore(tmp_path)
    cell = make_cell(make_config(task="mypkg.tasks:run"))
    path = store.write(cell)
    assert path.parent.name == "mypkg.tasks_run"
    assert store.read("mypkg.tasks:run", cell.cell_id) == cell
    with pytest.raises(ValueError):
        store.path("x", "../escape")


def test_record_coerces_scalars() -> None:
    record = Record(
        "t", "dw4", "m", "nll_test", np.float32(1.5), n_train=np.int64(10), seed=np.int32(0)
    )
    assert type(record.value) is float and type(record.n_train) is int and type(record.seed) is int
    assert Record.from_dict({**record.to_dict(), "future_field": 1}) == record
    with pytest.raises(ValueError):
        Record("t", "dw4", "m", "", 1.0)


# -- provenance ---------------------------------------------------------------------------------


def test_provenance_has_all_keys_with_sensible_types() -> None:
    import torch

    prov = provenance(device="cuda:0")
    assert tuple(prov) == PROVENANCE_KEYS
    assert prov["device"] == "cuda:0"
    assert prov["torch_version"] == str(torch.__version__)
    assert prov["numpy_version"] == np.__version__
    assert prov["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert isinstance(prov["threads"], int) and prov["threads"] >= 1
    assert isinstance(prov["eqbench_version"], str) and prov["eqbench_version"]
    assert prov["hostname"] and prov["platform"]
    sha = prov["git_sha"]
    assert sha == "unknown" or (len(sha.removesuffix("-dirty")) == 40 and int(sha[:40], 16) >= 0)


def test_atomic_files_get_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    """Results and reports are shared: not the temp file's private 0600."""
    import os
    import stat

    from eqbench.atomic import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    atomic_write_text(atomic, "x")
    assert stat.S_IMODE(os.stat(atomic).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_orphaned_temp_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    """SIGKILL mid-write leaves a temp file no writer can clean; the next run removes it, but never
    the temp file of a writer that is still alive, nor one of another host still fresh."""
    import os
    import subprocess
    import time

    from eqbench import atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = atomic._HOST
    cells = tmp_path / "cells" / "test-nll"
    cells.mkdir(parents=True)
    orphan = cells / f".abc.json.{host}.{dead.pid}.x1y2z3.tmp"
    live = cells / f".def.json.{host}.{os.getpid()}.q9w8e7.tmp"
    foreign_fresh = cells / ".ghi.json.otherhost.12345.aaaa.tmp"
    foreign_stale = cells / ".jkl.json.otherhost.12345.bbbb.tmp"
    finished = cells / "abc.json"
    for path in (orphan, live, foreign_fresh, foreign_stale, finished):
        path.write_text("{")
    old = time.time() - 2 * 86400
    os.utime(foreign_stale, (old, old))
    removed = CellStore(tmp_path).remove_orphaned_temps()
    assert sorted(removed) == sorted([orphan, foreign_stale])
    assert live.exists() and foreign_fresh.exists() and finished.exists()


def test_atomic_temp_names_carry_the_writers_host_and_pid(tmp_path: Path) -> None:
    import os

    from eqbench import atomic

    seen = []
    atomic.atomic_write(tmp_path / "x.json", lambda handle: seen.append(Path(handle.name).name))
    match = atomic._TEMP_NAME.match(seen[0])
    assert match and match["host"] == atomic._HOST and int(match["pid"]) == os.getpid()
