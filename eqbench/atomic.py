"""Atomic file writes: readers see the old file or the new one, never a prefix.

Every result and data file eqbench writes goes through here (Standards: "writes are atomic").
A temp file in the target directory is written, flushed, fsynced and renamed over the target
with ``os.replace``; a killed writer leaves only a dot-prefixed ``*.tmp`` file, which readers
ignore.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_save_npy"]


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; best effort, not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(handle)`` on a temp file beside ``path``, then move it into place.

    The file gets the permissions a plain ``open(path, "w")`` would give (0666 minus the umask),
    not the temp file's private 0600: results and reports are meant to be shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with tmp:
            write(tmp)
            tmp.flush()
            os.fchmod(tmp.fileno(), 0o666 & ~_umask())
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(payload))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | Path, array: Any) -> None:
    import numpy as np  # lazily: records use this module without numpy

    atomic_write(path, lambda handle: np.save(handle, array))
