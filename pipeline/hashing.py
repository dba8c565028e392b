"""Content digests of files and folders, as recorded in stores and SAE configs (comparable with `sha256sum`)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    """sha256 of one file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def listing_sha256(files: list[Path], root: Path) -> str:
    """sha256 of the `sha256sum`-style listing of `files`, named relative to `root`."""
    root = root.resolve()
    listing = "".join(f"{file_sha256(p)}  {p.resolve().relative_to(root).as_posix()}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()
