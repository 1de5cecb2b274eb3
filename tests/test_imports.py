"""Light imports: listing and describing must not pay for torch (issue: `eqbench list` stays instant)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("eqbench", {"torch", "numpy", "pandas"}),
        ("eqbench.registry", {"torch", "pandas"}),
        ("eqbench.records", {"torch", "pandas"}),
        ("eqbench.catalog", {"torch", "pandas"}),
        ("eqbench.cli", {"torch", "pandas"}),
    ],
)
def test_import_does_not_pull_heavy_modules(module, forbidden):
    code = f"import {module}, sys; print(sorted(set({sorted(forbidden)!r}) & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing {module} imported {result.stdout.strip()}"
