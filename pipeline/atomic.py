"""Writes that a kill cannot leave half-done: write beside the target, fsync, then rename over it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


@contextmanager
def replace_dir(
    target: str | os.PathLike, *, prefix: str | None = None, finished: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Build a directory that replaces `target` whole: yields a new folder beside it (`prefix` + random
    characters, by default `.{name}.tmp-`; the umask's mode) to write into. When the block ends without an error,
    everything in the folder is fsynced and the folder renamed to `target`, so readers see the old directory or
    the new one, never a mix. An existing `target` is moved aside just before that rename, put back if the
    rename fails, and deleted after it. On any error the new folder is removed and `target` is left as it was.

    `finished`: `target` is a cache that other processes may build at the same time. An existing one is then
    never moved aside (a reader may be inside it); when the rename fails because `target` exists and
    `finished(target)` says it is complete, another process got there first and its directory is kept."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp(target.parent, prefix if prefix is not None else f".{target.name}.tmp-")
    old: Path | None = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if finished is not None:
            try:
                tmp.rename(target)
            except OSError:
                if not finished(target):
                    raise
        else:
            if target.exists():
                # a rename cannot replace a non-empty directory: the old one steps aside into a unique folder
                old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
                os.replace(target, old / target.name)
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)  # put the previous directory back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (already renamed away unless something failed or lost the race)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file (links to elsewhere excepted) and folder under `root`."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(folder)


def _fsync_dir(path: str | os.PathLike) -> None:
    # Some file systems refuse to open or fsync a folder; the data is then as durable as they make it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
