"""Build hook: ship the top-level task profiles and published baselines inside the package.

``tasks/*.toml`` and ``baselines/published.csv`` stay at the repository's top level (DESIGN), one
hand-edited copy each. A wheel (and ``pip install .``) must still work from any directory, so the
build copies them into ``eqbench/_shipped/`` of the build tree; ``eqbench.resources`` reads the
checkout's files when it runs from a checkout and these copies when it is installed. Everything
else about the project is declared in ``pyproject.toml``; MANIFEST.in puts the two directories in
the sdist so a wheel built from it carries them too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Same table as ``eqbench.resources.SHIPPED_FILES`` (this build cannot import the package it
#: builds); tests/test_install.py checks that a wheel carries what that table names.
SHIPPED_DIR = "_shipped"
SHIPPED_FILES = {"tasks": "*.toml", "baselines": "published.csv"}


def _shipped_sources() -> dict[str, Path]:
    """``{path inside the eqbench package: source file}`` of every file to ship."""
    found = {}
    for directory, pattern in SHIPPED_FILES.items():
        files = sorted((ROOT / directory).glob(pattern))
        if not files:
            raise SystemExit(f"eqbench build: no {directory}/{pattern} under {ROOT}; "
                             "build from a checkout or an sdist (MANIFEST.in includes them)")
        for path in files:
            found[f"{SHIPPED_DIR}/{directory}/{path.name}"] = path
    return found


class BuildPyWithShippedData(build_py):
    """``build_py`` that also copies the top-level profiles and baselines into the built package.

    Skipped for editable installs: those run from the checkout, where ``eqbench.resources`` reads
    the top-level files themselves, and a copy would only go stale.
    """

    def _targets(self) -> dict[Path, Path]:
        package = Path(self.build_lib) / "eqbench"
        return {package / rel: src for rel, src in _shipped_sources().items()}

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        shipped = Path(self.build_lib) / "eqbench" / SHIPPED_DIR
        if shipped.exists():  # a reused build/ must not keep a profile deleted from tasks/
            shutil.rmtree(shipped)
        for target, src in self._targets().items():
            target.parent.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(src), str(target), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + [str(target) for target in self._targets()]


setup(cmdclass={"build_py": BuildPyWithShippedData})
