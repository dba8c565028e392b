"""JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"): a = pre·H(pre − θ_i), a per-latent threshold θ ≥ 0;
loss MSE + λ·L0, with the straight-through estimator of the paper:
∂H(pre − θ)/∂θ := −(1/ε)·K((pre − θ)/ε), ∂JumpReLU/∂θ := −(θ/ε)·K((pre − θ)/ε), K the rectangle 1[|u| < ½];
pre gets the ordinary gradients (H(pre − θ) through JumpReLU, none through the L0 step). Exported as SAELens
jumprelu with its θ.

θ is a parameter in pre-activation units, not exp(log θ) as in the paper: Adam moves a parameter by about its
lr per step, so a log-threshold changes θ by a factor ~e^(lr·steps) in the whole run (≈ 1.1 in a few hundred CPU
steps) and L0 stays wherever θ's init put it, whatever the L0 coefficient (SAELens made the same change). For the
same reason θ gets its own lr, `threshold_lr_scale` times the weights' (default √d_in):
with inputs scaled to E‖x‖ = √d and unit-norm decoder rows, pre-activations and θ are O(1), while a weight
entry is O(1/√d), so a step of lr·√d moves θ as far, relative to its scale, as lr moves a weight. θ is
projected back to ≥ 0 after each step (`clamp_threshold`); below 0 the gate would pass negative values.
θ starts at 1 by default (SAELens: 0.01): pre-activations start with a standard deviation ≤ 1, so θ = 1 leaves
a few percent of the latents active instead of half of them, and a short run does not spend its first hundred
steps, densely and slowly, raising θ from 0.01. θ, the STE window and the gate are fp32 (a bf16 θ would be
rounded to a few levels inside ε).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from sae.errors import SaeError
from sae.saedir import flat_nonzero

from ..kernels import JumpReLU as JumpReLUFn
from ..kernels import Step
from .base import SaeOutput, Terms, TrainingSae


class JumpReLU(TrainingSae):
    arch = "jumprelu"
    dense_forward = True

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0_coeff: float = 1.0,
        bandwidth: float = 0.05,
        init_threshold: float = 1.0,
        threshold_lr_scale: float | None = None,
        **kw: Any,
    ):
        if bandwidth <= 0 or init_threshold <= 0:
            raise SaeError("jumprelu bandwidth and initial threshold must be positive")
        if threshold_lr_scale is not None and threshold_lr_scale <= 0:
            raise SaeError(f"jumprelu threshold lr scale must be positive, got {threshold_lr_scale}")
        super().__init__(d_in, d_sae, **kw)
        self.l0_coeff, self.bandwidth, self.init_threshold = l0_coeff, bandwidth, init_threshold
        self.threshold_lr_scale = threshold_lr_scale if threshold_lr_scale is not None else math.sqrt(d_in)
        """θ's learning rate as a multiple of the weights' (see the module docstring)."""
        self.threshold = nn.Parameter(
            torch.full((d_sae,), float(init_threshold), device=self.W_enc.device, dtype=torch.float32)
        )

    @classmethod
    def options(cls, cfg: Any, point: Any) -> dict[str, Any]:
        return {
            "l0_coeff": point.l0_coeff if point.l0_coeff is not None else 1.0,
            "bandwidth": cfg.jumprelu_bandwidth,
            "init_threshold": cfg.jumprelu_init_threshold,
            "threshold_lr_scale": cfg.jumprelu_lr_scale,
        }

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        weights = [p for n, p in self.named_parameters() if n != "threshold"]
        s = self.threshold_lr_scale
        return [
            {"params": weights, "lr": lr, "lr_scale": 1.0},
            {"params": [self.threshold], "lr": lr * s, "lr_scale": s},
        ]

    def select(self, pre: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
        # also the entries inside the STE window below θ: they carry θ's gradient
        idx = flat_nonzero(pre > (self.threshold.detach() - self.bandwidth / 2))
        return idx // pre.shape[1], idx % pre.shape[1]

    def activate(self, vals: Tensor, cols: Tensor, n_rows: int) -> tuple[Tensor, Tensor | None, Tensor]:
        theta = self.threshold[cols]
        acts = JumpReLUFn.apply(vals, theta, self.bandwidth)
        sparsity = Step.apply(vals, theta, self.bandwidth).sum() / n_rows
        return acts, vals > theta.detach(), sparsity

    def activate_dense(self, pre: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
        a = JumpReLUFn.apply(pre, self.threshold, self.bandwidth)
        return a, Step.apply(pre, self.threshold, self.bandwidth).sum() / n_rows

    def loss(self, t: Terms) -> Tensor:
        return t.mse + self.l0_coeff * t.sparsity

    @torch.no_grad()
    def after_step(self, out: SaeOutput, n_tokens: int, step: int, plan: Any) -> None:
        super().after_step(out, n_tokens, step, plan)
        self.clamp_threshold()

    @torch.no_grad()
    def clamp_threshold(self) -> None:
        """Project θ back to ≥ 0 (after the optimizer step). A projection, not a clamp in the graph, so a θ at
        0 still gets the L0 gradient that lifts it."""
        self.threshold.clamp_(min=0.0)

    def log_fields(self, x: Tensor) -> dict[str, Any]:
        """Where the thresholds are, and how many sit at their floor of 0."""
        th = self.threshold.detach()
        return {"threshold_mean": float(th.mean()), "threshold_zero_fraction": float((th == 0).float().mean())}

    def metadata(self) -> dict[str, Any]:
        return {
            "l0_coeff": self.l0_coeff,
            "jumprelu_bandwidth": self.bandwidth,
            "jumprelu_lr_scale": self.threshold_lr_scale,
            "jumprelu_init_threshold": self.init_threshold,
        }

    def export_threshold(self) -> Tensor:
        return self.threshold.detach().clamp_min(0)
