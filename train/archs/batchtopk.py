"""BatchTopK (Bussmann et al. 2024): keep the k·B largest entries of relu(pre) over the whole batch.

Loss: Σ‖x − x̂‖² / (B·σ²) + α·AuxK (σ² the fixed dataset variance; α = 1/32 weighs the two like the
reference). Inference threshold θ (one global scalar): an EMA of each batch's smallest kept activation, in
fp32, started after a warm-up (`after_step`); exported as SAELens jumprelu with threshold θ·1, k kept for
batch mode. The selection (`sae.saedir.batch_topk_indices`) avoids `torch.topk` over B·F values, is exact with
ties to the lower index, and is global over the ranks of a DDP run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sae.errors import SaeError
from sae.saedir import batch_topk_indices

from ..kernels import no_autocast
from .base import SaeOutput, Terms, TrainingSae

THETA_L0_ROWS = 1024
"""Rows of the batch on which the training log's `l0_theta` is measured."""


class BatchTopK(TrainingSae):
    arch = "batchtopk"
    uses_aux = True

    def __init__(self, d_in: int, d_sae: int, *, k: float = 32, **kw: Any):
        super().__init__(d_in, d_sae, **kw)
        if k is None or not 0 < k <= d_sae:
            raise SaeError(f"{self.arch} needs k in (0, d_sae={d_sae}], got {k!r}")
        self.k = k

    @classmethod
    def options(cls, cfg: Any, point: Any) -> dict[str, Any]:
        return {"k": point.k}

    def select(self, pre: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
        f = pre.shape[1]
        k_total = round(float(self.k) * n_rows)
        idx = batch_topk_indices(pre, k_total, group=self.process_group, n_total=n_rows * f)
        return idx // f, idx % f

    def loss(self, t: Terms) -> Tensor:
        return t.recon + self.aux_alpha * t.aux

    @torch.no_grad()
    def after_step(self, out: SaeOutput, n_tokens: int, step: int, plan: Any) -> None:
        super().after_step(out, n_tokens, step, plan)
        if step >= plan.theta_start:
            self.update_theta(out.min_act, plan.theta_decay)

    @torch.no_grad()
    def update_theta(self, min_act: Tensor | float, decay: float = 0.99) -> None:
        """θ ← decay·θ + (1 − decay)·min_act (fp32; the first update sets θ = min_act). Skips non-finite values
        (a batch without any positive activation). No host sync."""
        m = torch.as_tensor(min_act, dtype=torch.float32, device=self.theta.device)
        ema = torch.where(self.theta_updates > 0, decay * self.theta + (1 - decay) * m, m)
        ok = torch.isfinite(m)
        self.theta.copy_(torch.where(ok, ema, self.theta))
        self.theta_updates.add_(ok.long())

    def theta_ready(self) -> bool:
        return int(self.theta_updates) > 0

    @torch.no_grad()
    def log_fields(self, x: Tensor) -> dict[str, Any]:
        """θ, and the L0 that θ would give on (a slice of) the batch."""
        l0 = None
        if self.theta_ready():
            with no_autocast(x.device):  # not through `_pre`: its reused buffer has the batch's shape
                pre = torch.addmm(self.b_enc, x[:THETA_L0_ROWS].float() - self.centre, self.W_enc)
            l0 = float(((pre > self.theta) & (pre > 0)).sum()) / len(pre)
        return {"theta": float(self.theta), "l0_theta": l0}

    def export_threshold(self) -> Tensor:
        return torch.full((self.d_sae,), float(self.theta), device=self.theta.device)
