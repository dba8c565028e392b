"""What made a stage's output: the settings and input digests that `sae eval` and `sae inspect` write beside it
(`settings.json`), so that a rerun can tell a current output from a stale one.

A stage writes the file last, after everything else it writes: its presence with matching content is what
"done" means to `sae run`. A kill before it leaves the old file (or none), so the next run redoes the work
instead of trusting a half-replaced output.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from . import atomic
from .config import EvalConfig, InspectConfig, to_dict
from .hashing import listing_sha256

SETTINGS_FILE = "settings.json"
"""Written last into a stage's output directory: {"stage", "settings", "inputs"}."""

_INPUT_SUFFIXES = (".json", ".safetensors")
"""The files of an SAE directory that decide what eval and inspect compute: cfg.json and the weights."""

_NOT_INPUTS = {"settings.json", "train_log.jsonl"}


def digest_inputs(paths: list[Path]) -> dict[str, str | None]:
    """Per path, a digest of the SAE files under it (cfg.json and weights, found recursively, so a folder of SAEs
    counts with all of them); None for a path that does not exist."""
    out: dict[str, str | None] = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            out[str(path)] = None
            continue
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in _INPUT_SUFFIXES and p.name not in _NOT_INPUTS
        )  # fmt: skip
        out[str(path)] = listing_sha256(files, path.parent if path.is_file() else path)
    return out


def record(stage: str, cfg: Any, inputs: list[Path], *, ignore: tuple[str, ...] = ("out",)) -> dict[str, Any]:
    """The settings record of `stage` run with config `cfg` over input directories `inputs`. Fields in
    `ignore` (the output path itself) do not count."""
    settings = {k: v for k, v in to_dict(_resolved(cfg)).items() if k not in ignore}
    return {"stage": stage, "settings": settings, "inputs": digest_inputs([Path(p).resolve() for p in inputs])}


def _resolved(cfg: Any) -> Any:
    """`cfg` with its paths absolute, so that a run named by another spelling of the same path is the same run."""

    def resolve(v: Any) -> Any:
        if isinstance(v, Path):
            return v.resolve()
        if isinstance(v, tuple) and v and all(isinstance(x, Path) for x in v):
            return tuple(x.resolve() for x in v)
        return v

    return dataclasses.replace(cfg, **{f.name: resolve(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)})


def eval_record(cfg: EvalConfig) -> dict[str, Any]:
    """What makes a report of `sae eval`: its settings and the SAE files it reads."""
    return record("eval", cfg, [Path(p) for p in cfg.sae_dirs])


def inspect_record(cfg: InspectConfig) -> dict[str, Any]:
    """What makes a site of `sae inspect`: its settings and the SAE's files."""
    return record("inspect", cfg, [Path(cfg.sae_dir)] if cfg.sae_dir is not None else [])


def write_record(out: Path, rec: dict[str, Any]) -> None:
    """Write `rec` into `out` (call it after every other file of the stage is in place)."""
    atomic.write_json(Path(out) / SETTINGS_FILE, rec)


def setting_changes(
    old: dict[str, Any], new: dict[str, Any], ignore: set[str] | frozenset[str] = frozenset()
) -> list[tuple[str, Any, Any]]:
    """(name, old value, new value) of every setting outside `ignore` that differs between two config dicts."""
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys if k not in ignore and old.get(k) != new.get(k)]


def changes(out: Path, rec: dict[str, Any]) -> list[str] | None:
    """How the output in `out` differs from what `rec` would make: [] when it is current, a list of readable
    differences when it is stale, None when `out` holds no finished output of this stage."""
    try:
        old = json.loads((Path(out) / SETTINGS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
    if not isinstance(old, dict) or old.get("stage") != rec["stage"]:
        return None
    diff = [f"{key}: {a!r} → {b!r}" for key, a, b in setting_changes(old.get("settings") or {}, rec["settings"])]
    before_in, now_in = old.get("inputs") or {}, rec["inputs"]
    for path in sorted(set(before_in) | set(now_in)):
        if before_in.get(path) != now_in.get(path):
            what = "new input" if path not in before_in else "no longer an input" if path not in now_in else "changed"
            diff.append(f"{os.path.basename(os.path.normpath(path))}: {what}")
    return diff


__all__ = [
    "SETTINGS_FILE",
    "changes",
    "digest_inputs",
    "eval_record",
    "inspect_record",
    "record",
    "setting_changes",
    "write_record",
]
