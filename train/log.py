"""What training reports: the log's rows (one `split: "train"` row every `--log-every` steps per SAE,
global-batch figures under DDP, read on the host only then: the steps in between wait for the device only where a
size depends on the data, see sae.train.trainer.train_step), the per-SAE figures of the progress lines, and the
end-of-run summary line of each SAE."""

from __future__ import annotations

import math
from typing import Any

import torch

from sae.errors import SaeError

from .plan import Plan
from .saerun import SaeRun


def train_row(
    r: SaeRun, o: Any, gn: torch.Tensor, x: torch.Tensor, step: int, plan: Plan, lr: float, tok_s: float
) -> dict[str, Any]:
    """The log row of SAE `r` after `step` steps, from its SaeOutput `o` (reduced over the ranks) and gradient
    norm `gn`; SaeError when the loss is not finite (the inputs were checked, so the training diverged)."""
    loss = float(o.loss.detach())
    if not math.isfinite(loss):
        raise SaeError(
            f"{r.name}: the loss became {loss} at step {step} (the inputs were checked: the training diverged); "
            "lower --lr or --grad-clip"
        )
    row = {
        "split": "train",
        "step": step,
        "tokens": step * plan.batch_size,
        "loss": loss,
        "recon_loss": float(o.recon_loss.detach()),
        "fvu": float(o.fvu.detach()),
        "mse": float(o.mse.detach()),
        "aux_loss": float(o.aux_loss.detach()),
        "sparsity_loss": float(o.sparsity_loss.detach()),
        "l0": float(o.l0),
        "dead_fraction": float(r.sae.dead_mask(plan.dead_tokens).float().mean()),
        "n_dead_aux": int(o.n_dead),
        "grad_norm": float(gn),
        "lr": lr,
        "tokens_per_s": tok_s,
        "decoder": "sparse" if o.sparse else "dense",
    }
    row.update(r.sae.log_fields(x))  # the architecture's own: θ and its L0, thresholds, ...
    return row


def progress_figures(row: dict[str, Any]) -> str:
    """One SAE's figures in the progress line, from its last train row: `loss 0.12 L0 31.8 dead 0.3%`."""
    return f"loss {row['loss']:.3g} L0 {row['l0']:.1f} dead {100 * row['dead_fraction']:.1f}%"


def summary_line(r: SaeRun, last: dict[str, Any], plan: Plan) -> str:
    """One SAE's line of the end-of-run summary: L0 and FVU on the validation rows (the exported SAE's θ /
    threshold mode, and batch mode where it differs), dead fraction. `last`: its last rows by split."""
    dead = float(r.sae.dead_mask(plan.dead_tokens).float().mean())
    v = last.get("val")
    if v is None:
        t = last.get("train")
        if t is None:  # nothing was left to train (resumed at the last step)
            return f"{r.name}: dead {100 * dead:.1f}%"
        what = f"L0 {t['l0']:.1f}, FVU {t['fvu']:.3f} on the last training batch (no validation rows: --val-chunks 0)"
        return f"{r.name}: {what}, dead {100 * dead:.1f}%"
    rows = f"{v['rows']:,} validation rows"
    if v["fvu_theta"] is None:  # BatchTopK before θ's EMA started: batch mode only
        text = f"L0 {v['l0_batch']:.1f}, FVU {v['fvu_batch']:.3f} on {rows} (batch mode)"
    else:
        text = f"L0 {v['l0_theta']:.1f}, FVU {v['fvu_theta']:.3f} on {rows}"
        if (v["l0_batch"], v["fvu_batch"]) != (v["l0_theta"], v["fvu_theta"]):
            text += f" (threshold, as exported; batch mode L0 {v['l0_batch']:.1f}, FVU {v['fvu_batch']:.3f})"
    return f"{r.name}: {text}, dead {100 * dead:.1f}%"


__all__ = ["progress_figures", "summary_line", "train_row"]
