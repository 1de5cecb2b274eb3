"""The worker pool under sweeps and time-limited runs (eqbench.workers): workers never outlive
their parent, even where the kernel's parent-death signal is not available."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import live_processes

from eqbench.errors import ConfigError
from eqbench.workers import ProgressLines, WorkerPool, check_time_limit

POOL_SCRIPT = textwrap.dedent("""
    import sys, time
    from eqbench.workers import WorkerPool

    if __name__ == "__main__":
        pool = WorkerPool(2, pdeathsig=sys.argv[1] == "pdeathsig")
        print("ready", flush=True)
        list(pool.imap_unordered(time.sleep, [60, 60]))
""")


def _children(pid: int) -> list[int]:
    return [child for child, _, ppid, _ in live_processes() if ppid == pid]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] not in "ZX"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table from /proc")
@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog"])
def test_workers_die_with_a_killed_parent(tmp_path, mode):
    """SIGKILL of the parent: the workers go at once (Linux's parent-death signal), or within a
    second by their parent-pid watchdog (the fallback elsewhere, forced here)."""
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while time.time() < deadline and len(_children(proc.pid)) < 3:  # two workers and the resource tracker
        time.sleep(0.1)
    children = _children(proc.pid)
    assert len(children) == 3
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 5
    while time.time() < deadline and any(map(_alive, children)):
        time.sleep(0.05)
    assert not [pid for pid in children if _alive(pid)]


def test_check_time_limit():
    assert check_time_limit(None) is None
    assert check_time_limit("2.5") == 2.5 and check_time_limit(3) == 3.0
    for bad in (0, -1, "-1", float("nan"), float("inf"), "soon", True):
        with pytest.raises(ConfigError, match="positive number of seconds"):
            check_time_limit(bad)


def test_progress_lines_report_each_cell_and_beat_in_between(capsys):
    with ProgressLines("sweep t", 3, interval=0.2) as lines:
        lines.update(True)
        time.sleep(0.5)
        lines.update(False)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("sweep t: 1/3 cells done, 0 failed, elapsed 0:00:00")
    assert len([line for line in err if line.startswith("sweep t: 1/3")]) >= 2  # life signs while nothing finishes
    assert err[-1].startswith("sweep t: 2/3 cells done, 1 failed")
    with ProgressLines("quiet", 1, enabled=False) as lines:
        lines.update(True)
    assert capsys.readouterr().err == ""


def test_a_pool_reports_how_each_call_ended():
    with WorkerPool(2) as pool:
        outcomes = {o.item: o for o in pool.imap_unordered(abs, [-1, -2])}
        assert {k: (o.kind, o.value) for k, o in outcomes.items()} == {-1: ("ok", 1), -2: ("ok", 2)}
        error = pool.call(int, "x")
        assert error.kind == "error" and isinstance(error.value, ValueError)
        died = pool.call(os._exit, 3)
        assert (died.kind, died.value, died.alone) == ("died", 3, True)
        assert pool.call(abs, -5).value == 5  # a fresh worker took the dead one's place
