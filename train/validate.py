"""Validation on held-out rows: the exported (raw-unit) SAE's FVU, NMSE and L0, with the accumulators `sae eval`
uses (sae.metrics), so training and eval report one definition of each."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from sae.metrics import ReconstructionAccumulator
from sae.saedir import batch_topk_indices

from .archs import TrainingSae
from .calibrate import Theta, apply_theta
from .plan import Plan
from .reader import Rows

VAL_MAX_ROWS = 8192
"""At most this many held-out rows are validated on."""


@torch.no_grad()
def validate(
    sae: TrainingSae, val: Rows, batch_size: int, device: torch.device, theta: Theta | None = None
) -> dict[str, float]:
    """FVU, NMSE and mean L0 of the exported (raw-unit) SAE on held-out rows, in threshold mode (θ / JumpReLU,
    per-row for topk) and batch mode (batch top-k over batches of `batch_size` rows; BatchTopK only, the same
    as threshold mode for the others). A transcoder's rows hold its input's columns, then its target's: the
    metrics are those of its prediction of the target."""
    inf = apply_theta(sae.export(), theta).to(device)  # θ mode at the exported θ
    acc = {m: ReconstructionAccumulator(inf.d_out, inf.d_sae, device) for m in ("theta", "batch")}
    for i in range(0, len(val.x), batch_size):
        rows = val.x[i : i + batch_size].to(device).float()
        x, y = rows[:, : inf.d_in], (rows[:, inf.d_in :] if sae.transcoder else rows)
        if inf.batch_topk:  # one encoder pass for both modes
            pre = inf.pre_acts(x)
            by_mode = {"theta": pre.relu() * (pre > inf.threshold)}
            idx = batch_topk_indices(pre, round(float(inf.cfg.k) * len(x)))
            a = torch.zeros_like(pre)
            a.view(-1)[idx] = pre.reshape(-1)[idx]
            by_mode["batch"] = a
        else:
            a = inf.encode(x)
            by_mode = {"theta": a, "batch": a}
        for m, a in by_mode.items():
            acc[m].add(y, _decode(inf, a, x), a)
    out = {}
    for m, a in acc.items():
        res = a.result()
        out[f"fvu_{m}"], out[f"nmse_{m}"], out[f"l0_{m}"] = res["fvu"], res["nmse"], res["l0"]
    return out


def val_row(
    sae: TrainingSae, val: Rows, plan: Plan, step: int, device: torch.device, theta: Theta | None = None
) -> dict[str, Any]:
    """The log row `split: "val"` of `sae` after `step` steps."""
    m: dict[str, Any] = validate(sae, val, plan.batch_size, device, theta)
    if not sae.theta_ready():  # BatchTopK's θ EMA has not started: no θ mode yet
        m.update({k: None for k in m if k.endswith("_theta")})
    return {"split": "val", "step": step, "tokens": step * plan.batch_size, "rows": len(val.x), **m}


def _decode(inf: Any, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """inf.decode(a, x); with few non-zeros (k per row) and no skip connection a sparse product instead of a dense
    [B, F]·[F, d] GEMM."""
    if inf.cfg.layout.skip or a.device.type != "cpu" or float((a != 0).float().mean()) > 0.05:  # (no [B, F] on a GPU)
        return inf.decode(a, x)
    with warnings.catch_warnings():  # torch's one-time "sparse CSR support is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        csr = a.to_sparse_csr()
    return torch.sparse.mm(csr, inf.W_dec) + inf.b_dec


__all__ = ["VAL_MAX_ROWS", "val_row", "validate"]
