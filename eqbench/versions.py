"""What code made a cell: part of its identity, so changed code never reuses old cells silently.

A cell's id is a hash of its configuration (:func:`eqbench.records.cell_id`). If the code that
computes a number is not part of that configuration, editing a model and rerunning returns the
cached numbers of the old model: measured in practice with a plugin flow whose code changed
between two runs. So every cell config carries ``code``: a version string of eqbench and of the
model (and of the task, when the task is a plugin).

Why a hash of the source and not the version number alone: an editable install (``pip install
-e``, the way researchers develop a flow) keeps the version number while the code changes. The
hash covers the ``.py`` files of the package that defines the object; for eqbench itself, every
module of the package. Data, results and the README are not code and are not hashed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import sys
from pathlib import Path

__all__ = ["source_hash", "eqbench_code_version", "object_code_version"]

#: Hash at most this many files of one package (a guard against hashing a whole site-packages).
_MAX_FILES = 5000


def source_hash(root: Path) -> str:
    """First 12 hex chars of sha256 over the ``.py`` files under ``root`` (or of ``root`` itself,
    if it is a file), in sorted relative-path order, with their paths: renaming a file counts.

    Example:
        >>> from pathlib import Path
        >>> import eqbench
        >>> len(source_hash(Path(eqbench.__file__).parent))
        12
    """
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))[:_MAX_FILES]
    for path in files:
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(root.parent if root.is_file() else root)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@functools.cache
def eqbench_code_version() -> str:
    """``<installed version>+src.<hash of eqbench's .py files>``, computed once per process.

    Example:
        >>> eqbench_code_version().split("+src.")[1].isalnum()
        True
    """
    root = Path(__file__).resolve().parent
    return f"{_distribution_version('eqbench')}+src.{source_hash(root)}"


def _package_root(module_name: str) -> Path | None:
    """Directory of the top-level package of ``module_name`` (or the module's file)."""
    top = module_name.split(".")[0]
    module = sys.modules.get(top)
    path = getattr(module, "__file__", None) if module is not None else None
    if path is None:
        return None
    path = Path(path).resolve()
    return path.parent if path.name == "__init__.py" else path


@functools.cache
def _module_code_version(module_name: str) -> str:
    if module_name == "eqbench" or module_name.startswith("eqbench."):
        return eqbench_code_version()
    top = module_name.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top, [])
    version = f"{dists[0]} {_distribution_version(dists[0])}" if dists else f"{top} (no distribution)"
    root = _package_root(module_name)
    return f"{version} src.{source_hash(root)}" if root is not None else version


def object_code_version(obj: object) -> str:
    """Version of the code that defines ``obj`` (a model builder, a task class).

    eqbench's own objects get :func:`eqbench_code_version`; anything else gets its distribution's
    name and version (when installed as one) and a hash of its top-level package's source.

    Example:
        >>> from eqbench.flows.kernel_flow import build
        >>> object_code_version(build) == eqbench_code_version()
        True
    """
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return _module_code_version(str(module))
