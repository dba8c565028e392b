"""Streaming accumulators for the eval CE and KL metrics: one update per forward batch, nothing kept per token.
The reconstruction accumulators (FVU, NMSE, L0, ...) live in sae.metrics, shared with training.

Definitions (docs/design.md, "Evaluation definitions"); sums are kept in float64 on the host or the device:
- FVU  = Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean of the eval activations (merged batch by batch, Chan et al.)
- NMSE = Σ‖x − x̂‖² / Σ‖x‖²
- cosine = mean over tokens of cos(x, x̂) (0 where either is the zero vector)
- L0 = active latents per token (mean and histogram); dead = never fired; dense = fires on > 10 % of tokens
- CE = mean next-token negative log-likelihood; KL = mean over tokens of KL(p_clean ‖ p_spliced)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sae.metrics import ReconstructionAccumulator

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
        self._ctx: list[tuple[Tensor, Tensor | None, int]] = []

    def add(self, nll: Tensor, kl: Tensor | None = None) -> None:
        """Add per-position losses [contexts, positions] (any shape: the first dimension is the context; every
        element is one counted prediction). Contexts must come in eval order, once each."""
        self.nll += nll.sum(dtype=torch.float64).item()
        if kl is not None:
            self.kl += kl.sum(dtype=torch.float64).item()
        self.n += nll.numel()
        flat = nll.reshape(nll.shape[0], -1) if nll.dim() else nll.reshape(1, 1)
        per_kl = None if kl is None else kl.reshape(flat.shape).sum(1, dtype=torch.float64).cpu()
        self._ctx.append((flat.sum(1, dtype=torch.float64).cpu(), per_kl, flat.shape[1]))

    def per_context(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Σ NLL, Σ KL, predictions) of each context, in the order added (KL 0 where none was given)."""
        if not self._ctx:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        nll = torch.cat([c[0] for c in self._ctx]).numpy()
        kl = torch.cat([c[1] if c[1] is not None else torch.zeros_like(c[0]) for c in self._ctx]).numpy()
        n = np.concatenate([np.full(len(c[0]), c[2], dtype=np.float64) for c in self._ctx])
        return nll, kl, n

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


class SpliceStats:
    """Reconstruction metrics of one SAE over the rows it replaced: over all of them and over typical and massive
    rows apart (`sae.rowtypes`), the mean per-row NMSE beside the pooled one, per-context sums for the bootstrap,
    and each row's norm and L0 for the latent-budget plot."""

    GROUPS = ("all", "typical", "massive")

    def __init__(self, d_in: int, d_sae: int, n_contexts: int, device: torch.device | str = "cpu") -> None:
        self.groups = {g: ReconstructionAccumulator(d_in, d_sae, device) for g in self.GROUPS}
        self.row_nmse = {g: torch.zeros((), dtype=torch.float64, device=device) for g in self.GROUPS}
        f64 = {"dtype": torch.float64, "device": device}
        self.ctx_sq_err = torch.zeros(n_contexts, **f64)
        self.ctx_sum = torch.zeros(n_contexts, d_in, **f64)
        self.ctx_sq = torch.zeros(n_contexts, **f64)
        self.ctx_n = torch.zeros(n_contexts, **f64)
        self.norms: list[Tensor] = []
        self.l0: list[Tensor] = []
        self.n_excluded = 0

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, acts: Tensor, context: Tensor, massive: Tensor) -> None:
        """Rows `x` [N, d] replaced by `x_hat` with latents `acts` [N, F]; `context` [N]: each row's eval
        context index; `massive` [N]: its row type."""
        x, x_hat = x.float(), x_hat.float()
        err = (x - x_hat).square().sum(-1)
        sq = x.square().sum(-1)
        nmse = torch.where(sq > 0, err / sq.clamp_min(1e-30), torch.zeros_like(err)).double()
        for g, sel in (("all", None), ("typical", ~massive), ("massive", massive)):
            if sel is None:
                self.groups[g].add(x, x_hat, acts)
                self.row_nmse[g] += nmse.sum()
            elif sel.any():
                self.groups[g].add(x[sel], x_hat[sel], acts[sel])
                self.row_nmse[g] += nmse[sel].sum()
        xd = x.double()
        self.ctx_sq_err.index_add_(0, context, err.double())
        self.ctx_sum.index_add_(0, context, xd)
        self.ctx_sq.index_add_(0, context, sq.double())
        self.ctx_n.index_add_(0, context, torch.ones_like(err, dtype=torch.float64))
        self.norms.append(sq.sqrt().cpu())
        self.l0.append((acts != 0).sum(-1).cpu())

    def result(self) -> dict[str, Any]:
        """`ReconstructionAccumulator.result()` of all rows, plus `groups`: per row type its metrics, share of
        the rows and share of the latent budget (active latents)."""
        out = self.groups["all"].result()
        n_all = max(self.groups["all"].n, 1)
        budget = self.groups["all"].l0_sum.item()
        out["nmse_per_row"] = self.row_nmse["all"].item() / n_all if self.groups["all"].n else math.nan
        groups = {}
        for g in self.GROUPS:
            acc = self.groups[g]
            r = acc.result()
            groups[g] = {
                "n_rows": acc.n,
                "share_rows": acc.n / n_all,
                "share_budget": acc.l0_sum.item() / budget if budget > 0 else math.nan,
                **{k: r[k] for k in ("fvu", "nmse", "cosine", "l0")},
                "nmse_per_row": self.row_nmse[g].item() / acc.n if acc.n else math.nan,
                "l0_histogram": r["l0_histogram"],
            }
        out["groups"] = groups
        return out

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(norm, L0) of every replaced row, for the latent-budget plot."""
        if not self.norms:
            return np.zeros(0), np.zeros(0)
        return torch.cat(self.norms).numpy(), torch.cat(self.l0).numpy()


# --------------------------------------------------------------------------------------------------
# Bootstrap over contexts


def bootstrap_weights(n_contexts: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_contexts] multiplicities of each context in each resample (contexts drawn with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_contexts, np.full(n_contexts, 1 / n_contexts), size=n_boot).astype(np.float64)


def interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    """The percentile interval [lo, hi] of bootstrap `values` (NaN resamples ignored)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return [math.nan, math.nan]
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


def fvu_resampled(w: np.ndarray, sq_err: np.ndarray, sums: np.ndarray, sq: np.ndarray, n: np.ndarray) -> np.ndarray:
    """FVU = Σ‖x − x̂‖² / (Σ‖x‖² − ‖Σx‖²/N) of each resample `w` from per-context sums."""
    s = w @ sums
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ sq_err) / ((w @ sq) - (s * s).sum(1) / (w @ n))
