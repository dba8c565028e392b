"""Reconstruction and sparsity accumulators shared by `sae train` (validation) and `sae eval`: one
implementation of FVU, NMSE, cosine, L0, dead and dense latents, streamed batch by batch.

Definitions (docs/design.md, "Evaluation definitions"); sums are kept in float64:
- FVU  = Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean of the rows seen (merged batch by batch, Chan et al.)
- NMSE = Σ‖x − x̂‖² / Σ‖x‖²
- cosine = mean over rows of cos(x, x̂) (0 where either is the zero vector)
- L0 = active latents per row (mean and histogram); dead = never fired; dense = fires on > 10 % of rows
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

DENSE_FREQUENCY = 0.1
"""A latent firing on more than this fraction of the rows counts as dense."""


class MeanAccumulator:
    """Running mean vector and total squared deviation Σ‖x − x̄‖² of activation rows, in float64."""

    def __init__(self, d: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64, device=device)
        self.m2 = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: Tensor) -> None:
        """Merge rows `x` [N, d] (Chan et al.'s pairwise update: stable where Σ‖x‖² − N‖x̄‖² is not)."""
        nb = x.shape[0]
        if nb == 0:
            return
        xb = x.double()
        mb = xb.mean(0)
        m2b = (xb - mb).square().sum()
        n = self.n + nb
        delta = mb - self.mean
        self.m2 += m2b + delta.square().sum() * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n


class ReconstructionAccumulator:
    """Reconstruction and sparsity statistics of one SAE over the rows it is given (in eval, the spliced tokens)."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.sq_err = torch.zeros((), dtype=torch.float64, device=device)
        self.sq_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.cos_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.l0_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.x_stats = MeanAccumulator(d_in, device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
        # counts of tokens by L0 (index = number of active latents); grows to the largest L0 seen
        self.l0_counts = torch.zeros(1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, acts: Tensor) -> None:
        """Add rows: activations `x` [N, d], reconstructions `x_hat` [N, d], latent activations `acts` [N, F]."""
        x, x_hat = x.float(), x_hat.float()
        self.n += x.shape[0]
        self.sq_err += (x - x_hat).square().sum(-1).sum(dtype=torch.float64)
        self.sq_norm += x.square().sum(-1).sum(dtype=torch.float64)
        self.cos_sum += torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).sum(dtype=torch.float64)
        self.x_stats.add(x)
        active = acts != 0
        self.fire_counts += active.sum(0)
        l0 = active.sum(-1)
        self.l0_sum += l0.sum(dtype=torch.float64)
        counts = torch.bincount(l0, minlength=self.l0_counts.numel())
        if counts.numel() > self.l0_counts.numel():
            counts[: self.l0_counts.numel()] += self.l0_counts
            self.l0_counts = counts
        else:
            self.l0_counts += counts

    def result(self) -> dict[str, Any]:
        """The reconstruction metrics (floats), the L0 histogram and the per-latent firing counts (lists)."""
        n = self.n
        sq_err = self.sq_err.item()
        var = self.x_stats.m2.item()
        sq_norm = self.sq_norm.item()
        fire = self.fire_counts.cpu()
        return {
            "fvu": sq_err / var if var > 0 else math.nan,
            "nmse": sq_err / sq_norm if sq_norm > 0 else math.nan,
            "cosine": self.cos_sum.item() / n if n else math.nan,
            "l0": self.l0_sum.item() / n if n else math.nan,
            "dead_fraction": (fire == 0).double().mean().item(),
            "dense_fraction": (fire > DENSE_FREQUENCY * n).double().mean().item() if n else math.nan,
            "n_tokens": n,
            "l0_histogram": self.l0_counts.cpu().tolist(),
            "fire_counts": fire.tolist(),
        }
