"""ReLU + L1, Anthropic's April 2024 recipe ("Training SAEs", Transformer Circuits update): a = relu(pre), decoder
rows free (no unit-norm constraint), loss MSE + λ·Σ_i a_i‖W_dec,i‖ with λ rising linearly from 0 over the first
`l1_warmup_fraction` of the run (5 %). Weighting the L1 by the decoder norms keeps the penalty from being
dodged by shrinking a and growing W_dec; decoder rows start at norm 0.1 with W_enc = W_decᵀ, as in the recipe.
MSE is ‖x − x̂‖² summed over d and averaged over rows (inputs scaled to E‖x‖ = √d, as the recipe does).
Exported as SAELens standard."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sae.errors import SaeError
from sae.saedir import flat_nonzero

from .base import Terms, TrainingSae


class ReluL1(TrainingSae):
    arch = "relu"
    dense_forward = True
    unit_norm_decoder = False

    def __init__(self, d_in: int, d_sae: int, *, l1_coeff: float = 5.0, l1_warmup_fraction: float = 0.05, **kw: Any):
        if l1_coeff < 0 or not 0 <= l1_warmup_fraction <= 1:
            raise SaeError(
                f"relu needs l1_coeff ≥ 0 and l1_warmup_fraction in [0, 1], got {l1_coeff}, {l1_warmup_fraction}"
            )
        self.l1_coeff, self.l1_warmup_fraction = l1_coeff, l1_warmup_fraction
        self.l1_factor = 1.0
        """λ's warm-up multiplier at the current step (`before_step`); 1 outside a run."""
        super().__init__(d_in, d_sae, **kw)

    @classmethod
    def options(cls, cfg: Any, point: Any) -> dict[str, Any]:
        return {"l1_coeff": cfg.l1_coeff, "l1_warmup_fraction": cfg.l1_warmup_fraction}

    def init_decoder_norm(self) -> float:
        return 0.1

    def before_step(self, step: int, plan: Any) -> None:
        warm = round(self.l1_warmup_fraction * plan.steps)
        self.l1_factor = min(1.0, (step + 1) / warm) if warm > 0 else 1.0

    def select(self, pre: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
        idx = flat_nonzero(pre > 0)
        return idx // pre.shape[1], idx % pre.shape[1]

    def activate(self, vals: Tensor, cols: Tensor, n_rows: int) -> tuple[Tensor, Tensor | None, Tensor]:
        return vals, None, (vals * self.W_dec.norm(dim=1)[cols]).sum() / n_rows

    def activate_dense(self, pre: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
        a = pre.relu()
        return a, (a @ self.W_dec.norm(dim=1)).sum() / n_rows

    def loss(self, t: Terms) -> Tensor:
        return t.mse + self.l1_factor * self.l1_coeff * t.sparsity

    def log_fields(self, x: Tensor) -> dict[str, Any]:
        norms = self.W_dec.detach().norm(dim=1)
        return {"l1_factor": self.l1_factor, "decoder_norm_mean": float(norms.mean())}

    def metadata(self) -> dict[str, Any]:
        return {"l1_coeff": self.l1_coeff, "l1_warmup_fraction": self.l1_warmup_fraction}
