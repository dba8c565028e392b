"""The run directory `--out`: what lies in it, and whether a new invocation may start, resume or skip there.

```
<out>/
  run.json                  the run's config, store identity and plan (RUN_FILE), written when it starts
  logs/<sae>.jsonl          the training logs as they grow (LOG_DIR)
  checkpoint/               the latest checkpoint (sae.train.checkpoint)
  <sae>/                    one SAELens-format directory per sweep point, with its train_log.jsonl (LOG_FILE)
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae.config import RESUMABLE_CHANGES, TrainConfig
from sae.errors import SaeError
from sae.outputs import setting_changes
from sae.saedir import RUN_FILE, is_complete
from sae.store import Store, is_store

from . import checkpoint

LOG_FILE = "train_log.jsonl"
"""Training log in each SAE directory: one JSON object per line, `split` "train" or "val"."""

LOG_DIR = "logs"
"""Where the logs grow during training (`out/logs/<sae>.jsonl`); each save of an SAE copies its log into the SAE
directory, so a kill during that save (which swaps the directory) never loses log lines."""


def open_store(cfg: TrainConfig) -> tuple[Store, str]:
    """The store of `cfg` and the site to train on (the store's only one when `--site` is not given)."""
    store = Store.open(cfg.store)
    site = cfg.site
    if not site:
        if len(store.sites) != 1:
            raise SaeError(f"--site is required: store {cfg.store} has sites {', '.join(store.sites)}")
        site = store.sites[0]
    if site not in store.sites:
        raise SaeError(f"store {cfg.store} has no site {site!r}; its sites: {', '.join(store.sites)}")
    return store, site


def target_site(cfg: TrainConfig, store: Store, site: str) -> str | None:
    """A transcoder run's target site (None for SAEs); SaeError for a target the store lacks, or a skip
    connection that has no target or whose target is its input."""
    target = cfg.target_site
    if not target:
        if cfg.skip:
            raise SaeError("--skip adds a skip connection to a transcoder; give --target-site too")
        return None
    if target not in store.sites:
        raise SaeError(
            f"--target-site {target!r}: store {cfg.store} has no such site; its sites: {', '.join(store.sites)}. "
            "Harvest the target beside --site (one forward writes both, row-aligned)"
        )
    if target == site and cfg.skip:
        raise SaeError(
            f"--skip with --target-site equal to --site ({site}): the skip connection alone would copy the input; "
            "drop --skip or choose another target"
        )
    return target


def store_identity(store: Store, site: str, target: str | None = None) -> dict[str, Any]:
    """What a resumed run must find unchanged about its store (its path may change)."""
    a = store.attrs
    extra = {"target_site": target} if target else {}  # (an SAE run's identity is as before)
    return {
        **extra,
        "path": str(Path(store.path).resolve()),
        "site": site,
        "d_model": store.d_model,
        "n_rows": store.n_rows,
        "chunk_rows": store.chunk_rows,
        "dtype": store.dtype,
        "model": a.get("model"),
        "corpus": a.get("corpus"),
        "seq_len": store.seq_len,
        "seed": a.get("seed"),
    }


def compare_config(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    """SaeError naming every setting, other than RESUMABLE_CHANGES, that differs from the run in `out`."""
    diff = setting_changes(old, new, RESUMABLE_CHANGES)
    if diff:
        shown = "; ".join(f"--{k.replace('_', '-')}: run has {a!r}, now {b!r}" for k, a, b in diff)
        raise SaeError(
            f"{out} holds a run with other settings ({shown}). Nothing was changed; rerun with the same settings, "
            "or choose another --out"
        )


def compare_store(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    """SaeError when store identity `new` is not that of the store the run in `out` trained on (`old`)."""
    if old["d_model"] != new["d_model"]:
        raise SaeError(
            f"the run in {out} trained on d_model {old['d_model']}, but store {new['path']} has d_model "
            f"{new['d_model']}; resume with the store it was trained on"
        )
    if old["site"] != new["site"]:
        raise SaeError(f"the run in {out} trained on site {old['site']!r}, this run asks for {new['site']!r}")
    diff = [k for k in old if k != "path" and old[k] != new.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {old[k]!r} then, {new.get(k)!r} now" for k in diff)
        raise SaeError(f"store {new['path']} is not the store the run in {out} trained on ({shown})")


def check_out(cfg: TrainConfig, names: list[str], run_info: dict[str, Any]) -> str:
    """Decide what to do with `out`: "fresh", "resume" or "done"; SaeError when it holds something else."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SaeError(f"--out {out} exists and is not a directory")
    # run.json and SAE folders inside a store would mix two stages' outputs (harvest refuses the reverse)
    inside = next((p for p in (out, *out.absolute().parents) if is_store(p)), None)
    if inside is not None:
        where = "is" if inside == out else f"lies inside {inside}, which is"
        raise SaeError(f"--out {out} {where} an activation store; choose a folder outside it for the SAEs")
    old = read_json(out / RUN_FILE)
    has_ckpt = checkpoint.exists(out)
    present = [n for n in [*names, LOG_DIR] if (out / n).exists()]
    if old is None:
        if has_ckpt or present:
            what = "a checkpoint" if has_ckpt else f"directories {', '.join(present)}"
            raise SaeError(
                f"--out {out} already holds {what} but no {RUN_FILE}; not ours to overwrite. Choose another --out"
            )
        if cfg.resume:
            raise SaeError(f"--resume: {out} holds no training run to resume; run without --resume")
        return "fresh"
    compare_config(old.get("config", {}), run_info["config"], out)
    compare_store(old["store"], run_info["store"], out)
    if has_ckpt:
        if not cfg.resume:
            raise SaeError(
                f"--out {out} holds a run with a checkpoint ({checkpoint.latest_name(out)}); pass --resume to "
                "continue it, or choose another --out. Nothing was changed"
            )
        return "resume"
    if names and all(is_complete(out / n) for n in names):
        if not cfg.resume:
            raise SaeError(f"--out {out} holds a finished run of these settings; choose another --out")
        return "done"
    return "fresh"  # a run of the same settings that died before its first checkpoint: nothing to keep


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


__all__ = [
    "LOG_DIR",
    "LOG_FILE",
    "RESUMABLE_CHANGES",
    "RUN_FILE",
    "check_out",
    "compare_config",
    "compare_store",
    "open_store",
    "read_json",
    "store_identity",
    "target_site",
]
