"""θ calibrated to hit k: the global inference threshold of the architectures that have one
(`sae.architectures`: `has_theta`), set on held-out rows so that θ-mode L0 on those rows equals k.

The EMA of each batch's smallest kept activation lands below k in θ mode: the L0 of the mean θ is not the mean
per-batch L0. So at every save the trainer takes N held-out rows (every second row of the reader's validation
rows; the others hold the validation metrics, so those measure θ on rows it was not fitted on) and sets
θ between the (k·N)-th and (k·N+1)-th largest post-ReLU pre-activation over those rows: exactly k·N entries
exceed it. Pre-activations do not change with the export's input scaling, so θ is the same in training and raw
units. The EMA keeps running in the SAE's `theta` buffer (and the checkpoint); the chosen value is what the
exported SAELens threshold holds, with both recorded in the metadata.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from sae import architectures
from sae.errors import SaeError

from .reader import Rows

CALIBRATION_BATCH = 1024
"""Rows per encoder pass while calibrating (bounds the [rows, F] pre-activation temporary)."""


class Theta(NamedTuple):
    """The θ an SAE is exported with, and what it was chosen from."""

    value: float
    """The exported threshold θ."""
    metadata: dict[str, Any]
    """cfg.json metadata keys: `theta_mode` (ema | calibrated), `theta_ema`, `theta_calibrated` (null with no
    calibration), `theta_calibration_rows` (N)."""


@torch.no_grad()
def calibrated_theta(inf: Any, x: torch.Tensor, k: float, device: torch.device) -> float:
    """θ with exactly round(k·N) of the post-ReLU pre-activations of the N rows `x` (raw units) above it, for
    the exported (raw-unit) SAE `inf`: the midpoint of the (k·N)-th and (k·N+1)-th largest. Streams over the
    rows keeping only the k·N + 1 largest values seen, so memory stays O(k·N). 0 when at most k·N are positive."""
    m = round(float(k) * len(x)) + 1  # the k·N largest and the next one
    pool = torch.empty(0, device=device)
    floor = 0.0  # every value that can still enter the pool exceeds this (post-ReLU: > 0)
    for i in range(0, len(x), CALIBRATION_BATCH):
        pre = inf.pre_acts(x[i : i + CALIBRATION_BATCH].to(device).float())
        pool = torch.cat([pool, pre[pre > floor]])
        if len(pool) > m:
            pool = torch.topk(pool, m, sorted=False).values
            floor = float(pool.min())
    if len(pool) < m:  # too few positive pre-activations: every one of them is kept
        return 0.0
    top2 = torch.topk(pool, 2, largest=False).values  # the (k·N+1)-th and (k·N)-th largest
    return float(top2.mean())


def choose_theta(sae: Any, mode: str, rows: Rows | None, device: torch.device) -> Theta | None:
    """The θ `sae` (a TrainingSae) is exported with under `--theta mode`; None for an architecture without θ.
    `rows`: the calibration rows (None: no calibration, the EMA)."""
    if not sae.info.has_theta:
        return None
    ema = float(sae.theta)
    cal = None
    if rows is not None and len(rows.x) and sae.theta_ready():
        cal = calibrated_theta(sae.export(), rows.x, sae.k, device)
    value = cal if mode == "calibrated" and cal is not None else ema
    meta = {
        "theta_mode": mode,
        "theta_ema": ema,
        "theta_calibrated": cal,
        "theta_calibration_rows": len(rows.x) if rows is not None and cal is not None else 0,
    }
    return Theta(value, meta)


def apply_theta(inf: Any, theta: Theta | None) -> Any:
    """The exported SAE `inf` with threshold θ·1 and cfg θ set to `theta` (and its metadata); unchanged when
    None."""
    if theta is None:
        return inf
    inf.threshold.data.fill_(theta.value)
    inf.cfg.theta = theta.value
    inf.cfg.metadata.update(theta.metadata)
    return inf


def check_theta(cfg: Any, points: list[Any]) -> None:
    """SaeError when `--theta calibrated` has no held-out rows to calibrate on (before anything is written)."""
    with_theta = [p.name for p in points if architectures.get(p.arch).has_theta]
    if cfg.theta == "calibrated" and with_theta and cfg.val_chunks < 1:
        raise SaeError(
            f"--theta calibrated needs held-out rows for {', '.join(with_theta)}: use --val-chunks 1 or more, "
            "or --theta ema"
        )


def split_held_out(held: Rows | None, max_val: int, max_cal: int) -> tuple[Rows | None, Rows | None]:
    """The held-out rows split into (validation rows, calibration rows): alternate rows (at most `max_val` and
    `max_cal`). Alternate, not halves: the held-out chunks come from different shards, so from different parts
    of the corpus, and rows are shuffled only within a shard; halves would fit θ on one text and test it on
    another."""
    if held is None:
        return None, None
    val = Rows(held.x[0::2][:max_val], held.rows[0::2][:max_val])
    cal = Rows(held.x[1::2][:max_cal], held.rows[1::2][:max_cal])
    return val, cal


__all__ = [
    "CALIBRATION_BATCH",
    "Theta",
    "apply_theta",
    "calibrated_theta",
    "check_theta",
    "choose_theta",
    "split_held_out",
]
