"""Where the data files eqbench reads at run time are: task profiles and published baselines.

The task profiles (``tasks/*.toml``) and the published numbers (``baselines/published.csv``) live
at the repository's top level, outside the ``eqbench`` package (DESIGN: profiles stay in the
top-level ``tasks/`` and ship as package data), so there is exactly one hand-edited copy of each.
A built wheel carries generated copies of them in ``eqbench/_shipped/`` (written by the build step
in ``setup.py``, never committed). This module is the one place that decides which copy a process
reads, in this order:

1. ``$EQBENCH_TASKS_DIR`` (profiles only): an explicit override, e.g. private profiles or tests;
2. the checkout that holds this package (a source tree on ``sys.path`` or an editable install), so
   an edit to ``tasks/`` or ``baselines/`` takes effect without reinstalling, and a stale generated
   copy can never shadow it;
3. the copies shipped inside the installed package (``pip install .`` or a wheel), located with
   :mod:`importlib.resources`, so an installed eqbench works from any working directory.

Bottom layer: imports nothing of eqbench but :mod:`eqbench.errors`.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import tomllib
from pathlib import Path

from eqbench.errors import ConfigError

__all__ = ["SHIPPED_DIR", "SHIPPED_FILES", "checkout_root", "shipped_dir", "tasks_dir", "baselines_path"]

#: Directory inside the package that a built wheel carries the copies in (``setup.py`` writes it).
SHIPPED_DIR = "_shipped"
#: What is shipped: ``{directory at the repository's top level: file-name pattern}``; the copy of
#: ``tasks/x.toml`` is ``eqbench/_shipped/tasks/x.toml``. ``setup.py`` keeps the same table (it
#: cannot import the package it builds); tests/test_install.py checks that the two agree.
SHIPPED_FILES: dict[str, str] = {"tasks": "*.toml", "baselines": "published.csv"}


@functools.cache
def checkout_root() -> Path | None:
    """The repository root holding this package when it runs from a checkout, else ``None``.

    A checkout is recognised by the directory above the package having eqbench's own
    ``pyproject.toml`` and a ``tasks/`` directory. Checking the project name (not merely the file)
    keeps an installed copy in ``site-packages`` from adopting some unrelated project's tree.
    Cached: the answer cannot change while the process runs.
    """
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not (pyproject.is_file() and (root / "tasks").is_dir()):
        return None
    try:
        with open(pyproject, "rb") as handle:
            name = tomllib.load(handle).get("project", {}).get("name")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return root if name == "eqbench" else None


def shipped_dir() -> Path:
    """``eqbench/_shipped`` of the installed package, as a filesystem path.

    Only a package installed as files has one (pip and wheels always install that way); a
    zip-imported eqbench is refused with one line rather than handing out a path that cannot
    be opened.
    """
    shipped = importlib.resources.files("eqbench") / SHIPPED_DIR
    if not isinstance(shipped, Path):
        raise ConfigError(f"eqbench is imported from an archive ({shipped}); install it as files "
                          "(pip install eqbench) or set EQBENCH_TASKS_DIR")
    return shipped


def tasks_dir() -> Path:
    """Directory of the task profile TOML files.

    ``$EQBENCH_TASKS_DIR`` if set, else ``tasks/`` of the checkout, else the installed copy.
    Raises :class:`~eqbench.errors.ConfigError` when none exists (a package built without the
    build step of ``setup.py``), since every task needs its profiles.
    """
    configured = os.environ.get("EQBENCH_TASKS_DIR")
    if configured:
        return Path(configured).expanduser()
    root = checkout_root()
    if root is not None:
        return root / "tasks"
    shipped = shipped_dir() / "tasks"
    if not shipped.is_dir():
        raise ConfigError(f"no task profiles: not a checkout and the installed package has no {shipped}; "
                          "reinstall eqbench from a wheel or sdist built by its setup.py, or set EQBENCH_TASKS_DIR")
    return shipped


def baselines_path() -> Path:
    """``published.csv`` of the checkout, else the installed copy.

    Not required to exist: a report of measured results must still be possible without the
    published numbers (:func:`eqbench.report.load_baselines` warns and shows measured numbers only).
    """
    root = checkout_root()
    base = root if root is not None else shipped_dir()
    return base / "baselines" / "published.csv"
