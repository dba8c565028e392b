"""One SAE of a sweep as the loop trains it: the module, its Adam, its output directory and its log; and the
writing of its SAELens-format directory (weights, cfg.json with the training metadata, the log so far)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae import atomic
from sae.config import DEFAULT_MODEL, TrainConfig, hub_model_name
from sae.embedded import embedded_model_source
from sae.errors import SaeError
from sae.saedir import save_sae as write_sae_dir

from .archs import TrainingSae, from_config
from .calibrate import Theta, apply_theta
from .plan import default_lr
from .rundir import LOG_DIR, LOG_FILE

if TYPE_CHECKING:
    from .trainer import RunState


@dataclass
class SaeRun:
    """One SAE of the sweep with its optimizer and output directory."""

    name: str
    """Sweep point name, also the directory name."""
    sae: TrainingSae
    """The module being trained."""
    opt: torch.optim.Adam
    """Its Adam."""
    lr: float
    """Base learning rate."""
    dir: Path
    """Its SAELens-format output directory."""
    log: Any = None
    """Its open log file, out/logs/<name>.jsonl (append)."""
    grad_sync: Any = None
    """Under DDP, its sae.train.ddp.GradSync (made by the first `train_step`)."""

    @property
    def log_path(self) -> Path:
        return self.dir.parent / LOG_DIR / f"{self.name}.jsonl"


def _make_optimizer(sae: TrainingSae, lr: float) -> torch.optim.Adam:
    # one group per lr multiple (jumprelu's θ has its own); `train_step` sets lr = base·lr_scale per group
    try:
        return torch.optim.Adam(sae.param_groups(lr), lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.Adam(sae.param_groups(lr), lr=lr, betas=(0.9, 0.999))


def make_run(
    cfg: TrainConfig,
    point: Any,
    d_in: int,
    device: torch.device,
    input_scale: float,
    variance: float,
    *,
    d_out: int | None = None,
    target_scale: float | None = None,
) -> SaeRun:
    """The SAE of sweep point `point` (sae.saedir.SweepPoint), freshly initialised, with its Adam; `variance` is
    σ² of the scaled training rows (a transcoder's: of its scaled targets), the fixed normaliser of its
    reconstruction term. A transcoder of targets of width `d_out` (dataset-level scale `target_scale`) when
    `d_out` is given; an SAE's target is its input, scaled by `input_scale`."""
    sae = from_config(cfg, point, d_in, variance=variance, device=device, d_out=d_out)
    if sae.k is not None and sae.k > sae.d_sae:
        raise SaeError(f"{point.name}: k={sae.k} exceeds the dictionary size {sae.d_sae}")
    sae.set_input_scale(input_scale)
    if d_out is not None:
        sae.set_target_scale(float(target_scale))
    lr = cfg.lr if cfg.lr is not None else default_lr(sae.d_sae)
    return SaeRun(point.name, sae, _make_optimizer(sae, lr), lr, Path(cfg.out) / point.name)


def write_log(run: SaeRun, row: dict[str, Any]) -> None:
    """Append one row to the SAE's growing log (rank 0 only: the other ranks hold no log)."""
    if run.log is None:
        return
    run.log.write(json.dumps(row) + "\n")
    run.log.flush()


def save_sae(r: SaeRun, s: RunState, step: int, *, theta: Theta | None, exclude: dict[str, Any] | None) -> None:
    """Write `r`'s SAELens directory as of `step` of run `s` (after its last step: the complete one), with its log
    so far; `theta`: the exported θ (sae.train.calibrate), `exclude`: the rows left out (metadata key `exclude`);
    a transcoder's (`s.target`, its output site) in SAELens' transcoder format."""
    cfg, plan, store, site, target = s.cfg, s.plan, s.store, s.site, s.target
    a = store.attrs
    model = a.get("model") or {}
    metadata = {
        "model": model,  # what the store recorded: our alias or path, the weights' sha256 (the GGUF's), revision
        "corpus": a.get("corpus"),
        "store": str(Path(store.path).resolve()),
        # beside the absolute path: a run directory moved or copied as a whole still finds its store
        "store_relative": os.path.relpath(Path(store.path).resolve(), Path(r.dir).resolve()),
        "site": site,
        "context_size": store.seq_len,
        "keep_bos": cfg.keep_bos,
        "tokens_seen": step * plan.batch_size,
        "steps": step,
        "batch_size": plan.batch_size,
        "lr": r.lr,
        "seed": cfg.seed,
        "k_aux": r.sae.k_aux,
        "aux_alpha": cfg.aux_alpha,
        "dead_tokens": plan.dead_tokens,
        "dead_fraction": float(r.sae.dead_mask(plan.dead_tokens).float().mean()),
        "decoder": r.sae.decoder,
        "sparse_max_density": r.sae.sparse_max_density,
        "val_chunks": s.reader.val_chunks,
        "reader_lanes": s.reader.lanes,
    }
    if model.get("id") == DEFAULT_MODEL:  # model_name is the hub id; say what the weights really were
        metadata["model_source"] = embedded_model_source()
    # (export adds the architecture's own settings to the metadata)
    if exclude is not None:
        metadata["exclude"] = exclude
    if target is not None:  # a transcoder's (an SAE's metadata has no such keys)
        metadata["target_site"] = target
        metadata["skip"] = r.sae.skip
    inf = r.sae.export(
        model_name=hub_model_name(model.get("id")),
        hook_name=site,
        hook_name_out=target,
        complete=step == plan.steps,
        metadata=metadata,
    )
    write_sae_dir(apply_theta(inf, theta), None, r.dir)
    if r.log is not None:
        r.log.flush()
        atomic.write_bytes(r.dir / LOG_FILE, r.log_path.read_bytes())


__all__ = ["SaeRun", "make_run", "save_sae", "write_log"]
