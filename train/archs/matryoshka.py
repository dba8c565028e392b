"""Matryoshka BatchTopK (Bussmann et al. 2025, arXiv 2503.17547): nested dictionary prefixes m_1 < … < m_P = F,
each of which must reconstruct x on its own, so the first latents learn general features and later ones
refine them instead of absorbing them.

One global BatchTopK selection over the whole dictionary per batch (not one per prefix). Prefix m reconstructs
x from the selected latents with index < m: x̂_m = b_dec + Σ_{selected j, c_j < m} a_j·W_dec,c_j. Loss: the mean
over the prefixes of BatchTopK's reconstruction term Σ‖x − x̂_m‖² / (B·σ²), plus α·AuxK on the residual of the
whole dictionary (AuxK's reconstruction has no b_dec). θ, its EMA and the export are BatchTopK's (SAELens
jumprelu with threshold θ·1); the widths go into the metadata.

Prefixes are decoded on the sparse path in one product: the selected entries are sorted by latent index within
each row, so entry j of row r belongs to group g (m_{g−1} ≤ c_j < m_g) and moves to row r·P + g of a
[B·P, F] pattern, still in CSR order. One sparse product gives each group's partial decode [B, P, d]; their
cumulative sum over g is every prefix's reconstruction. The work is one decode of the N entries, never one
dense decode per prefix; the dense path multiplies each column group of a by its block of W_dec (one dense
decode in total).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sae.errors import SaeError

from ..kernels import SparseDecode, SparsePattern, dense_acts
from .base import Terms
from .batchtopk import BatchTopK


def resolve_widths(widths: tuple[float, ...] | list[float], d_sae: int) -> tuple[int, ...]:
    """Cumulative prefix widths ending at F = `d_sae`, from widths given as latents (e.g. 256,1024,4608) or, when
    every value is ≤ 1, as fractions of F (e.g. 0.0625,0.25,1). SaeError naming the problem otherwise."""
    shown = ",".join(f"{w:g}" for w in widths)
    if not widths:
        raise SaeError("--matryoshka-widths is empty: give cumulative widths ending at the dictionary size")
    if any(not w > 0 for w in widths):
        raise SaeError(f"--matryoshka-widths {shown}: every width must be positive")
    if all(w <= 1 for w in widths):
        out = [round(w * d_sae) for w in widths]
        if widths[-1] != 1:
            raise SaeError(f"--matryoshka-widths {shown}: fractions must end at 1 (the whole dictionary)")
    else:
        if any(float(w) != int(w) for w in widths):
            raise SaeError(f"--matryoshka-widths {shown}: widths above 1 must be whole numbers of latents")
        out = [int(w) for w in widths]
        if out[-1] != d_sae:
            raise SaeError(f"--matryoshka-widths {shown}: the last width must be the dictionary size {d_sae}")
    if any(b <= a for a, b in zip([0, *out], out, strict=False)):
        raise SaeError(f"--matryoshka-widths {shown}: widths must increase (as latents of F={d_sae}: {out})")
    return tuple(out)


class Matryoshka(BatchTopK):
    arch = "matryoshka"

    def __init__(
        self, d_in: int, d_sae: int, *, widths: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0), **kw: Any
    ):
        self.widths = resolve_widths(tuple(widths), d_sae)
        """Cumulative prefix widths m_1 < … < m_P = F, in latents."""
        super().__init__(d_in, d_sae, **kw)

    @classmethod
    def options(cls, cfg: Any, point: Any) -> dict[str, Any]:
        return {**super().options(cfg, point), "widths": cfg.matryoshka_widths}

    def reconstruct(self, pat: SparsePattern, acts: Tensor, sparse: bool) -> Tensor:
        """Every prefix's reconstruction [B, P, d_out] (the last: the whole dictionary's)."""
        b, p = pat.n_rows, len(self.widths)
        if sparse:
            group = torch.bucketize(pat.cols, self._inner_widths(pat.cols), right=True)
            grouped = pat.with_rows(pat.rows * p + group, b * p)  # a column's rows keep their order
            parts = SparseDecode.apply(acts, self.W_dec, grouped).view(b, p, self.d_out)
        else:
            a = dense_acts(pat, acts)
            bounds = [0, *self.widths]
            parts = torch.stack(
                [a[:, lo:hi] @ self.W_dec[lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False)], dim=1
            )
        return parts.cumsum(1) + self.b_dec

    def _inner_widths(self, like: Tensor) -> Tensor:
        """m_1 … m_{P−1} on `like`'s device, made once (a host→device copy per step would wait for the device)."""
        t = getattr(self, "_inner", None)
        if t is None or t.device != like.device or t.dtype != like.dtype:
            t = self._inner = torch.tensor(self.widths[:-1], dtype=like.dtype, device=like.device)
        return t

    def loss(self, t: Terms) -> Tensor:
        return t.recon + self.aux_alpha * t.aux

    def metadata(self) -> dict[str, Any]:
        return {"matryoshka_widths": list(self.widths)}
