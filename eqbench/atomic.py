"""Atomic file writes: readers see the old file or the new one, never a prefix.

Every result and data file eqbench writes goes through here (Standards: "writes are atomic").
A temp file in the target directory is written, flushed, fsynced and renamed over the target
with ``os.replace``; a killed writer leaves only a dot-prefixed ``*.tmp`` file, which readers
ignore. The temp name carries the writer's host and PID, so a later run can tell an orphan of a
killed writer (SIGKILL leaves no chance to clean up) from a file still being written, and remove
it (:func:`remove_orphaned_temps`).
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_save_npy", "remove_orphaned_temps"]

# The first label of the host name, restricted to characters that cannot be confused with the
# name's separators.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"
_TEMP_NAME = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]*\.tmp$")


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
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.",
                                      suffix=".tmp", delete=False)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def remove_orphaned_temps(directory: str | Path, *, stale_after_s: float = 86400.0) -> list[Path]:
    """Delete the temp files that killed writers left in ``directory``; return what was removed.

    A temp file written on this host is an orphan when its writer's PID is gone. One from another
    host (a shared file system under SLURM) or without a writer stamp is an orphan once it has not
    been touched for ``stale_after_s`` seconds: a cell or data write takes seconds, not a day.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> atomic_write_text(folder / "a.json", "{}")
        >>> remove_orphaned_temps(folder)
        []
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    now = time.time()
    for path in directory.glob(".*.tmp"):
        match = _TEMP_NAME.match(path.name)
        try:
            if match and match["host"] == _HOST:
                orphan = not _pid_alive(int(match["pid"]))
            else:
                orphan = now - path.stat().st_mtime > stale_after_s
            if orphan and path.is_file():
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # its writer finished (or another cleaner got there) meanwhile
            continue
    return removed


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(payload))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | Path, array: Any) -> None:
    import numpy as np  # lazily: records use this module without numpy

    atomic_write(path, lambda handle: np.save(handle, array))
