"""Writes that a kill cannot leave half-done: write beside the target, fsync, then rename over it."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

_umask_lock = threading.Lock()


def umask() -> int:
    """The process's current umask (read by setting and restoring it, under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give `path` the mode `open()` / `mkdir()` would have given it: 0666 (0777 for a folder) less the umask.
    `mkstemp` / `mkdtemp` create 0600 / 0700 on purpose; results that colleagues share must not keep that."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def mkdtemp(dir: str | os.PathLike, prefix: str) -> Path:
    """A fresh temporary folder beside a target, with the umask's mode (it is renamed into place later)."""
    tmp = Path(tempfile.mkdtemp(dir=dir, prefix=prefix))
    apply_umask(tmp, directory=True)
    return tmp


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically (readers see the old file or the new one, never a mix)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        apply_umask(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically replace `path` with `obj` as indented JSON."""
    write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())
