"""Training checkpoints: safetensors for the tensors, JSON for everything else, never pickle (opening a
checkpoint must never run code).

```
<out>/checkpoint/
  latest                    text: the name of the newest complete checkpoint ("step-000001200")
  step-000001200/
    tensors.safetensors     weights, Adam moments, dead-latent counters, θ, torch's CPU RNG state
    state.json              step, tokens, config, reader position, schedules, decoder choices, ...
```
`save_run` / `restore_run` turn the trainer's state (every SAE's weights and Adam moments, the reader's position,
the RNGs, the log lengths) into such a checkpoint and back; `save` / `load` read and write the folder.

A checkpoint is written into a hidden temporary folder, fsynced, renamed to step-N (`sae.atomic.replace_dir`), and
only then does `latest` (replaced atomically) point at it; older ones are deleted last. A kill at any moment leaves
`latest` naming a complete checkpoint (or no `latest` at all before the first one).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from sae import __version__, atomic
from sae.errors import SaeError
from sae.saedir import CHECKPOINT_DIR as DIR

if TYPE_CHECKING:
    from .saerun import SaeRun

LATEST = "latest"
"""The file naming the newest complete checkpoint."""

STATE_VERSION = 1
"""Version of state.json's layout."""


class Checkpoint(NamedTuple):
    """A loaded checkpoint."""

    path: Path
    """Its folder, <out>/checkpoint/step-N."""
    tensors: dict[str, torch.Tensor]
    """Every tensor, on CPU, by name."""
    state: dict[str, Any]
    """Everything else (state.json)."""


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
    # An existing `final` was left by a run killed between its rename and the `latest` update: it is replaced.
    # The temporary names start with `.step-`, so the cleanup below removes those of killed writes.
    with atomic.replace_dir(final, prefix=f".{name}.") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        atomic.apply_umask(tmp / "tensors.safetensors")  # safetensors creates its file 0600
        atomic.write_json(tmp / "state.json", state)
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


# --------------------------------------------------------------------------------------------------
# The trainer's state


def _rng_tensors() -> dict[str, torch.Tensor]:
    # Only the RNGs a run could draw from: torch's CPU one (initialisation uses a seeded generator of its own, so
    # this is a guard) and Python's (state.json). No CUDA RNG is drawn from; saving the one of every visible GPU
    # would tie a checkpoint to the node's GPU count.
    return {"rng/torch": torch.get_rng_state()}


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def save_run(out: Path, step: int, runs: list[SaeRun], reader_state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Checkpoint the sweep `runs` after `step` steps, with the (whole, every lane's) reader state and `meta`
    (config, store identity, plan); return the checkpoint's folder."""
    tensors = _rng_tensors()
    saes: dict[str, Any] = {}
    for r in runs:
        for k, v in r.sae.state_dict().items():
            tensors[f"{r.name}/sae/{k}"] = v
        sd = r.opt.state_dict()
        for i, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"{r.name}/opt/{i}/{k}"] = v
        if r.log is not None:
            r.log.flush()
        saes[r.name] = {
            "param_groups": sd["param_groups"],
            "sparse_max_density": r.sae.sparse_max_density,
            "density": r.sae._density,
            "log_bytes": r.log_path.stat().st_size if r.log_path.exists() else 0,
        }
    state = {
        "version": STATE_VERSION,
        "tool_version": __version__,
        "step": step,
        "reader": reader_state,
        "saes": saes,
        "python_random": _jsonable(random.getstate()),
        **meta,
    }
    return save(out, step, tensors, state)


def restore_run(ck: Checkpoint, runs: list[SaeRun], truncate_logs: bool = True) -> None:
    """Load checkpoint `ck` into the freshly made `runs` and the RNGs; `truncate_logs`: cut each growing log back
    to its length at the checkpoint (the resumed run logs those steps again)."""
    t = ck.tensors
    for r in runs:
        info = ck.state["saes"].get(r.name)
        if info is None:
            raise SaeError(f"checkpoint {ck.path} has no SAE {r.name!r}; it was made by another sweep")
        prefix = f"{r.name}/sae/"
        sd = {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}
        try:
            r.sae.load_state_dict(sd)
        except RuntimeError as e:
            raise SaeError(f"checkpoint {ck.path} does not fit SAE {r.name}: {e}") from None
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"{r.name}/opt/"
        for k, v in t.items():
            if k.startswith(prefix):
                i, name = k[len(prefix) :].split("/")
                opt_state.setdefault(int(i), {})[name] = v
        groups = [{**g, "betas": tuple(g["betas"])} for g in info["param_groups"]]
        r.opt.load_state_dict({"state": opt_state, "param_groups": groups})
        r.sae.sparse_max_density = info["sparse_max_density"]
        r.sae._density = info["density"]
        if truncate_logs and r.log_path.exists():
            with open(r.log_path, "r+b") as f:
                f.truncate(min(info["log_bytes"], r.log_path.stat().st_size))
    torch.set_rng_state(t["rng/torch"])  # (older checkpoints' rng/cuda/N entries are ignored)
    random.setstate(_tuples(ck.state["python_random"]))
