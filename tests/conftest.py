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


def pytest_configure(config):
    """One torch thread per test process: the suite's tensors are small, and two threads on a
    2-core machine shared with anything else slow them down up to 10x (measured)."""
    import torch

    torch.set_num_threads(1)
