"""Training checkpoints: safetensors for the tensors, JSON for everything else, never pickle (opening a
checkpoint must never run code).

```
<out>/checkpoint/
  latest                    text: the name of the newest complete checkpoint ("step-000001200")
  step-000001200/
    tensors.safetensors     weights, Adam moments, dead-latent counters, θ, torch RNG states
    state.json              step, tokens, config, reader position, schedules, decoder choices, ...
```
A checkpoint is written into a hidden temporary folder, fsynced, renamed to step-N, and only then does `latest`
(replaced atomically) point at it; older ones are deleted last. A kill at any moment leaves `latest` naming a
complete checkpoint (or no `latest` at all before the first one).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from sae import atomic
from sae.errors import SaeError

DIR = "checkpoint"
LATEST = "latest"


class Checkpoint(NamedTuple):
    """A loaded checkpoint."""

    path: Path
    """Its folder, <out>/checkpoint/step-N."""
    tensors: dict[str, torch.Tensor]
    """Every tensor, on CPU, by name."""
    state: dict[str, Any]
    """Everything else (state.json)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_name(out: Path) -> str | None:
    """Name of the newest complete checkpoint in `out`, or None."""
    try:
        name = (Path(out) / DIR / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def save(out: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write checkpoint `step` under `out`/checkpoint atomically and make it the latest; return its folder."""
    root = Path(out) / DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:09d}"
    final = root / name
    if latest_name(out) == name and final.is_dir():
        return final  # e.g. a SIGTERM right after a scheduled checkpoint of the same step
    tmp = atomic.mkdtemp(root, f".{name}.")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        atomic.apply_umask(tmp / "tensors.safetensors")  # safetensors creates its file 0600
        with open(tmp / "tensors.safetensors", "rb") as f:
            os.fsync(f.fileno())
        atomic.write_json(tmp / "state.json", state)
        _fsync_dir(tmp)
        if final.exists():  # left by a run killed between this rename and the `latest` update
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.write_bytes(root / LATEST, (name + "\n").encode())
    for p in root.iterdir():  # older checkpoints and temporaries of killed writes
        if p.name not in (name, LATEST) and (p.name.startswith("step-") or p.name.startswith(".step-")):
            shutil.rmtree(p, ignore_errors=True)
    return final


def load(out: Path) -> Checkpoint | None:
    """The latest checkpoint under `out`, or None when there is none; SaeError when it is unreadable."""
    name = latest_name(out)
    if name is None:
        return None
    path = Path(out) / DIR / name
    try:
        tensors = load_file(str(path / "tensors.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise SaeError(f"checkpoint {path} cannot be read ({e}); it is damaged or was written by another tool") from e
    return Checkpoint(path, tensors, state)


def exists(out: Path) -> bool:
    """Whether `out` holds a checkpoint."""
    return latest_name(out) is not None
