"""Streaming accumulators for the eval CE and KL metrics: one update per forward batch, nothing kept per token.
The reconstruction accumulators (FVU, NMSE, L0, ...) live in sae.metrics, shared with training.

Definitions (DESIGN.md, "Evaluation definitions"); sums are kept in float64 on the host or the device:
- FVU  = Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean of the eval activations (merged batch by batch, Chan et al.)
- NMSE = Σ‖x − x̂‖² / Σ‖x‖²
- cosine = mean over tokens of cos(x, x̂) (0 where either is the zero vector)
- L0 = active latents per token (mean and histogram); dead = never fired; dense = fires on > 10 % of tokens
- CE = mean next-token negative log-likelihood; KL = mean over tokens of KL(p_clean ‖ p_spliced)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

VOCAB_CHUNK_ROWS = 128
"""Positions per vocabulary chunk: bounds the float32 temporaries to rows × vocabulary (25 MB at 49k)."""


def _chunks(logits: Tensor, chunk_rows: int) -> list[tuple[int, slice]]:
    # [B, T, V] logits are walked context by context, so strided slices such as logits[:, :-1] are never copied.
    n_ctx, n_pos = logits.shape[:2]
    return [(b, slice(i, i + chunk_rows)) for b in range(n_ctx) for i in range(0, n_pos, chunk_rows)]


class CleanDist(NamedTuple):
    """What the KL divergence from the clean next-token distribution needs, per position of one batch.

    KL(p_c ‖ p_s) = Σ_v p_c·(l_c − lse_c) − Σ_v p_c·(l_s − lse_s) = (dot_c − lse_c) − (p_c·l_s − lse_s) for logits
    l and their log-sum-exp lse, so each spliced forward costs one log-sum-exp and one dot product per position
    instead of a full log-softmax, and identical logits give exactly 0.
    """

    probs: Tensor
    """p_c, the clean softmax [B, T, V], float32."""
    lse: Tensor
    """Log-sum-exp of the clean logits [B, T]."""
    dot: Tensor
    """Σ_v p_c · l_c [B, T]."""


class TokenLosses(NamedTuple):
    """Per-position losses of one forward [B, T], float32."""

    nll: Tensor
    """−log p(next token)."""
    kl: Tensor | None
    """KL(p_clean ‖ p) (None when no clean distribution was given)."""
    clean: CleanDist | None
    """The distribution of these logits, when asked for (the clean forward)."""


def token_losses(
    logits: Tensor,
    targets: Tensor,
    clean: CleanDist | None = None,
    *,
    keep_dist: bool = False,
    chunk_rows: int = VOCAB_CHUNK_ROWS,
) -> TokenLosses:
    """Next-token NLL (and KL from `clean`) at every position of `logits` [B, T, V] given `targets` [B, T].

    `keep_dist=True` also returns this forward's own distribution (the clean forward keeps it for the others).
    The vocabulary is processed `chunk_rows` positions at a time, so no [B, T, V] float32 temporary is made.
    """
    shape = targets.shape
    nll = torch.empty(shape, dtype=torch.float32, device=logits.device)
    kl = torch.empty(shape, dtype=torch.float32, device=logits.device) if clean is not None else None
    if keep_dist:
        own = CleanDist(
            torch.empty(logits.shape, dtype=torch.float32, device=logits.device),
            torch.empty(shape, dtype=torch.float32, device=logits.device),
            torch.empty(shape, dtype=torch.float32, device=logits.device),
        )
    for b, rows in _chunks(logits, chunk_rows):
        lg = logits[b, rows].float()
        lse = torch.logsumexp(lg, dim=-1)
        nll[b, rows] = lse - lg.gather(-1, targets[b, rows, None]).squeeze(-1)
        if clean is not None:
            dot = (clean.probs[b, rows, None, :] @ lg[:, :, None]).view(-1)
            kl[b, rows] = (clean.dot[b, rows] - dot) + (lse - clean.lse[b, rows])
        if keep_dist:
            p = own.probs[b, rows]
            torch.exp(lg - lse[:, None], out=p)
            own.lse[b, rows] = lse
            own.dot[b, rows] = (p[:, None, :] @ lg[:, :, None]).view(-1)
    return TokenLosses(nll, kl, own if keep_dist else None)


class CeAccumulator:
    """Mean cross-entropy (and KL from the clean run) of one forward variant over the eval tokens."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.kl = 0.0
        self.n = 0

    def add(self, nll: Tensor, kl: Tensor | None = None) -> None:
        """Add per-position losses (any shape; every element is one counted prediction)."""
        self.nll += nll.sum(dtype=torch.float64).item()
        if kl is not None:
            self.kl += kl.sum(dtype=torch.float64).item()
        self.n += nll.numel()

    @property
    def ce(self) -> float:
        return self.nll / self.n if self.n else math.nan

    @property
    def mean_kl(self) -> float:
        return self.kl / self.n if self.n else math.nan


def ce_recovered(ce_ablated: float, ce_sae: float, ce_clean: float) -> float:
    """(CE_ablated − CE_sae) / (CE_ablated − CE_clean): 1 when the SAE loses nothing, 0 when it is no better
    than the ablation; nan when the ablation costs nothing."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_sae) / gap if gap != 0 else math.nan
