"""Faults and bad input in the results store: nothing lost, nothing orphaned, nothing silently wrong.

Each test reproduces one measured problem and fails on the old behaviour:

* a copy of a cell file under another name was collected again (rows doubled, "repeats 2, ± 0");
* a cell with status ok and no records counted as finished forever;
* an unreadable cell vanished from the report without a word;
* a truncated results.csv gave a report of part of the cells with exit 0;
* failed cells lost ``n_train`` and ``variant`` (two real-NVP cells became indistinguishable);
* an unwritable ``--results`` (a file, a read-only directory, a full disk, ``""``) failed only
  after the cell was computed, and ``collect --results <typo>`` created the misspelt directory.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import warnings
from pathlib import Path

import pandas as pd
import pytest

from eqbench.cli import main
from eqbench.errors import OutputError
from eqbench.records import (
    CELL_FAILED,
    CellResult,
    CellStore,
    SkippedCellWarning,
    check_output_file,
    check_results_dir,
    cell_id,
    now_iso,
)

RUN = ["run", "--task", "test-nll", "--model", "gaussian", "--system", "dw2", "--set", "n_train=[10,100]",
       "--set", "n_test=100", "--no-plot", "--no-artifacts"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """Two finished test-nll cells (gaussian on DW-2, n_train 10 and 100), collected."""
    root = tmp_path_factory.mktemp("finished") / "results"
    assert main([*RUN, "--results", str(root)]) == 0
    return root


@pytest.fixture
def results(finished: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`finished` to damage."""
    root = tmp_path / "results"
    shutil.copytree(finished, root)
    return root


def _cell_files(root: Path) -> list[Path]:
    return sorted((root / "cells").glob("*/*.json"))


def _quiet_collect(store: CellStore) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedCellWarning)
        return store.collect()


# -- (4) the store checks itself ----------------------------------------------------------------


def test_copy_of_a_cell_under_another_name_is_skipped_not_counted_twice(results: Path, capsys) -> None:
    store = CellStore(results)
    before = store.collect()
    first = _cell_files(results)[0]
    shutil.copy(first, first.with_name("copy of a cell.json"))
    shutil.copy(first, first.with_name("0123456789abcdef.json"))
    with pytest.warns(SkippedCellWarning, match="its name is not its content's cell id"):
        after = store.collect()
    assert len(after) == len(before), "a copied cell file must not add rows"
    assert after["cell_id"].value_counts().max() == before["cell_id"].value_counts().max()
    skipped = {Path(s.path).name: s for s in after.attrs["skipped"]}
    assert set(skipped) == {"copy of a cell.json", "0123456789abcdef.json"}
    assert all(s.cell_id == first.stem for s in skipped.values())
    assert store.skipped == after.attrs["skipped"]
    # the command line lists what it skipped, one line each
    capsys.readouterr()
    assert main(["collect", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert f"{len(before)} records from 2 cells" in out
    assert "2 cell files not used" in out and out.count("  skipped cells/test-nll/") == 2


def test_cell_in_another_tasks_directory_or_edited_is_skipped(results: Path) -> None:
    store = CellStore(results)
    first, second = _cell_files(results)
    (results / "cells" / "other-task").mkdir()
    shutil.copy(first, results / "cells" / "other-task" / first.name)  # same cell id, twice
    edited = second.read_text().replace('"n_test": 100', '"n_test": 99')
    assert edited != second.read_text()
    second.write_text(edited)  # its id is no longer the hash of its config
    with pytest.warns(SkippedCellWarning):
        table = store.collect()
    assert set(table["cell_id"]) == {first.stem}
    reasons = {s.path: s.reason for s in store.skipped}
    assert "belongs in cells/test-nll/" in reasons[f"cells/other-task/{first.name}"]
    assert "not the hash of its config" in reasons[f"cells/test-nll/{second.name}"]
    # the edited file sits at the cell's own path: not done, so the next run replaces it
    with pytest.warns(SkippedCellWarning):
        assert not store.is_done("test-nll", second.stem)


def test_ok_cell_without_records_is_not_finished_and_is_rerun(results: Path, capsys) -> None:
    store = CellStore(results)
    path = _cell_files(results)[0]
    cell = store.read("test-nll", path.stem)
    cell.records = []
    store.write(cell)
    assert not store.is_done("test-nll", path.stem)
    with pytest.warns(SkippedCellWarning, match="status ok but no records"):
        table = store.collect()
    assert path.stem not in set(table["cell_id"])
    assert [s.cell_id for s in store.skipped] == [path.stem]
    capsys.readouterr()
    assert main([*RUN, "--results", str(results)]) == 0
    rerun = store.read("test-nll", path.stem)
    assert rerun.status == "ok" and rerun.records, "the empty cell was run again"
    assert "2 cells (0 failed)" in capsys.readouterr().out


def test_unreadable_cell_is_listed_in_the_report(results: Path, capsys) -> None:
    from eqbench import report

    broken = _cell_files(results)[0]
    broken.write_text(broken.read_text()[:50])
    loaded = report.load_results(results)
    assert [Path(s.path).name for s in loaded.skipped] == [broken.name]
    html = report.render_report(results, loaded=loaded)
    section = html.split('id="skipped-cells"')[1].split("</section>")[0]
    assert broken.name in section and "unreadable (JSONDecodeError" in section
    claims = html.split('id="claims"')[1].split("</section>")[0]
    assert "1 cell file could not be used" in claims
    capsys.readouterr()
    assert main(["report", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert f"skipped cells/test-nll/{broken.name}: unreadable" in out


def test_truncated_results_csv_is_rebuilt_from_the_cells(results: Path, capsys) -> None:
    from eqbench import report

    csv = results / "results.csv"
    full = csv.read_text()
    lines = full.splitlines(keepends=True)
    csv.write_text("".join(lines[:3]))  # the header and two rows of one cell
    loaded = report.load_results(results)
    assert loaded.table["cell_id"].nunique() == 2 and len(loaded.table) == len(lines) - 1
    assert "disagrees with the cell files (it holds 1 cells, 2 rows" in loaded.note
    html = report.render_report(results, loaded=loaded)
    assert "2 cells," in html and "disagrees with the cell files" in html
    capsys.readouterr()
    assert main(["report", "--results", str(results)]) == 0
    assert "note: " in capsys.readouterr().out and csv.read_text() == "".join(lines[:3]), "report writes no table"
    # an up-to-date table gives no note; a table alone (no cells/) is read and said to be alone
    assert main(["collect", "--results", str(results)]) == 0
    assert csv.read_text() == full and report.load_results(results).note == ""
    shutil.rmtree(results / "cells")
    alone = report.load_results(results)
    assert alone.source == "results.csv" and len(alone.table) == len(lines) - 1
    assert "Built from <code>results.csv</code> alone" in report.render_report(results, loaded=alone)


def test_failed_cells_keep_their_settings(tmp_path: Path) -> None:
    """Two failed real-NVP cells that differ in n_train (and one in variant) stay apart."""
    store = CellStore(tmp_path)
    for n_train, variant in ((10, ""), (1000, ""), (1000, "aug")):
        config = {"task": "density-estimation", "model": "real-nvp", "system": "dw4", "profile": "quick", "seed": 0,
                  "params": {"n_train": n_train, "variant": variant, "augment": bool(variant)}}
        store.write(CellResult(task="density-estimation", cell_id=cell_id(config), config=config, status="failed",
                               reason="RuntimeError: NaN loss", started_at=now_iso(), duration_s=1.0))
    table = store.collect()
    assert (table["metric"] == CELL_FAILED).all() and len(table) == 3
    assert sorted(zip(table["n_train"], table["variant"])) == [(10, ""), (1000, ""), (1000, "aug")]
    assert table["settings_key"].nunique() == 3 and (table["profile"] == "quick").all()
    back = pd.read_csv(tmp_path / "results.csv", keep_default_na=False, na_values=[""])
    assert sorted(back["n_train"]) == [10, 1000, 1000] and sorted(back["variant"].fillna("")) == ["", "", "aug"]


# -- (6) output locations, checked before any work ----------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Any cell, model check or sweep plan that starts fails the test."""
    import eqbench.evaluation
    import eqbench.runner
    import eqbench.sweep

    def started(*args, **kwargs):
        raise AssertionError("work started before the output location was checked")

    monkeypatch.setattr(eqbench.runner, "preflight", started)
    monkeypatch.setattr(eqbench.runner, "run_cell", started)
    monkeypatch.setattr(eqbench.sweep, "plan_sweep", started)
    monkeypatch.setattr(eqbench.evaluation, "_source", started)


COMMANDS = {
    "run": RUN,
    "sweep": ["sweep", "--task", "test-nll", "--model", "gaussian", "--system", "dw2", "--no-plot"],
    "evaluate": ["evaluate", "--model", "gaussian", "--system", "dw2", "--no-plot"],
}


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_results_that_is_a_file_is_refused_before_any_work(command, tmp_path, capsys, no_work) -> None:
    target = tmp_path / "results.txt"
    target.write_text("not a directory\n")
    err = _one_line_exit_2(capsys, [*COMMANDS[command], "--results", str(target)])
    assert "is a file, not a results directory" in err
    assert target.read_text() == "not a directory\n"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_empty_results_is_refused_and_nothing_lands_in_the_working_directory(command, tmp_path, capsys,
                                                                            monkeypatch, no_work) -> None:
    monkeypatch.chdir(tmp_path)
    err = _one_line_exit_2(capsys, [*COMMANDS[command], "--results", ""])
    assert "--results is empty" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_read_only_results_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch, no_work) -> None:
    """Simulated with ``os.access`` (as root, chmod does not stop writes; the real chmod case is below)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked and mode & os.W_OK
                        else real_access(p, mode, **kw))
    for target in (locked, locked / "results" / "quick"):  # the directory, or one to be made in it
        err = _one_line_exit_2(capsys, [*COMMANDS[command], "--results", str(target)])
        assert "is not writable" in err and str(locked) in err
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="as root, a read-only mode does not stop writes (the os.access test covers the check)")
def test_chmod_read_only_results_is_refused(tmp_path, capsys, no_work) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        err = _one_line_exit_2(capsys, [*RUN, "--results", str(locked)])
        assert "is not writable" in err
    finally:
        locked.chmod(stat.S_IRWXU)


def test_full_disk_is_refused_before_any_work(tmp_path, capsys, monkeypatch, no_work) -> None:
    import eqbench.records

    monkeypatch.setattr(eqbench.records.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    err = _one_line_exit_2(capsys, [*RUN, "--results", str(tmp_path / "results")])
    assert "no space left" in err
    assert not (tmp_path / "results").exists()


def test_full_disk_during_a_run_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch) -> None:
    """The disk fills up while the cell's result is written: one line, exit 2, no temp file left."""
    import eqbench.atomic

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file is being written")
    results = tmp_path / "results"
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(results / "cells")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(eqbench.atomic.os, "fsync", fsync)
    err = _one_line_exit_2(capsys, [*RUN, "--results", str(results)])
    assert "cannot write the cell" in err and "No space left on device" in err
    left = [p for p in results.rglob("*") if p.is_file()]
    assert left == [], f"partial files left behind: {left}"


@pytest.mark.parametrize("command", ["collect", "report", "plot"])
def test_reading_commands_with_a_misspelt_results_dir_create_nothing(command, finished, tmp_path, capsys) -> None:
    typo = finished.parent / "resluts"
    err = _one_line_exit_2(capsys, [command, "--results", str(typo)])
    assert f"no results directory at {typo}" in err and f"did you mean {finished}?" in err
    assert not typo.exists()
    err = _one_line_exit_2(capsys, [command, "--results", ""])
    assert "--results is empty" in err


def test_collect_out_and_report_out_are_checked(finished, tmp_path, capsys) -> None:
    before = (finished / "results.csv").read_bytes()
    err = _one_line_exit_2(capsys, ["collect", "--results", str(finished), "--out", str(tmp_path)])
    assert "is a directory; name a file" in err
    (tmp_path / "file").write_text("")
    err = _one_line_exit_2(capsys, ["report", "--results", str(finished), "--out", str(tmp_path / "file" / "r.html")])
    assert "is a file, so no directory can be made under it" in err
    assert (finished / "results.csv").read_bytes() == before


def test_collect_leaves_an_archived_table_alone(tmp_path, finished, capsys) -> None:
    shutil.copy(finished / "results.csv", tmp_path / "results.csv")
    err = _one_line_exit_2(capsys, ["collect", "--results", str(tmp_path)])
    assert "no cells under" in err
    assert (tmp_path / "results.csv").read_bytes() == (finished / "results.csv").read_bytes()


def test_check_results_dir_api(tmp_path) -> None:
    assert check_results_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists(), "the check creates nothing"
    with pytest.raises(OutputError, match="empty"):
        check_results_dir("")
    with pytest.raises(OutputError, match="no results directory"):
        check_results_dir(tmp_path / "missing", read=True)
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        check_results_dir(tmp_path / "f", write=False)
    with pytest.raises(OutputError, match="is a directory"):
        check_output_file(tmp_path)
    assert check_output_file(tmp_path / "out" / "r.csv") == tmp_path / "out" / "r.csv"


def test_api_run_and_sweep_refuse_a_file_before_planning(tmp_path, no_work) -> None:
    from eqbench.runner import run
    from eqbench.sweep import sweep

    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(OutputError, match="is a file"):
        run("test-nll", "gaussian", "dw2", "smoke", results_dir=target)
    with pytest.raises(OutputError, match="is a file"):
        sweep("test-nll", ["gaussian"], ["dw2"], "smoke", results_dir=target)
