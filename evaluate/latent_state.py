"""Bounded per-latent state for `sae inspect`: everything one streaming pass keeps, whatever the row count.

Per selected latent:
- counts of nonzero activations, their sum, and how many of them (and how much of the sum) fell on massive rows;
- the top N activations with their rows (a running top-N: each batch's candidates are merged with the kept
  ones, ties going to the earlier row), once over all rows and once over typical rows only, so that a latent
  whose largest activations all sit on massive rows still shows what it does elsewhere;
- a histogram of its nonzero activations over [0, M) in `N_BINS` equal bins, M a power of two above the
  latent's running maximum; when the maximum outgrows M, M doubles (as often as needed) and adjacent bins merge;
- per histogram bin, a seeded reservoir of `m` examples: every activation gets a uniform random key and each bin
  keeps the m smallest keys, which is a uniform sample without replacement of the bin's activations. The m
  smallest keys of a union of bins lie in the union of their reservoirs, so merging bins (when M doubles) and
  drawing from a range of bins (the quantile examples) stay exact uniform samples.

All state lives on the SAE's device; a batch costs O(nonzeros), apart from extracting them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

N_BINS = 64
"""Histogram bins per latent over [0, M); the maximum lies in the upper half, so at least 32 cover [0, max]."""

PAYLOAD = ("row", "context", "position", "kind")
"""What every kept example carries besides its value: store row, packed context, position in it, row kind
(`KINDS`)."""

KINDS = ("typical", "massive", "bos")
"""Row kinds by their code in the payload: massive means norm > M × the site's median (`sae.rowtypes`); BOS rows
are their own kind (they are only encoded for SAEs trained with them)."""

_BIN_BITS = N_BINS.bit_length() - 1


class Entries(NamedTuple):
    """Nonzero activations of a batch, flattened."""

    latent: Tensor
    """Index into the selected latents, int64 [n]."""
    value: Tensor
    """Activation, float32 [n]."""
    payload: Tensor
    """Store row, context, position and row kind of each, int64 [n, len(PAYLOAD)]."""
    massive: Tensor
    """Whether the row is a massive one, bool [n]."""
    typical: Tensor
    """Whether the row is a typical one (neither massive nor BOS), bool [n]."""


class Kept(NamedTuple):
    """Examples kept for one set of cells (latents, or latent × histogram bin), sorted by key in each cell."""

    key: Tensor
    """[cells, m] float32; inf where empty."""
    value: Tensor
    """[cells, m] float32 activation."""
    payload: Tensor
    """[cells, m, len(PAYLOAD)] int64; -1 where empty."""


def empty_kept(cells: int, m: int, device: torch.device) -> Kept:
    """No example yet in any of `cells` cells of `m` slots."""
    return Kept(
        torch.full((cells, m), float("inf"), device=device),
        torch.zeros(cells, m, device=device),
        torch.full((cells, m, len(PAYLOAD)), -1, dtype=torch.long, device=device),
    )


def _ordered_bits(key: Tensor) -> Tensor:
    """int64 in [-2³¹, 2³¹) with the order of the float32 values `key` (±inf included, no NaN)."""
    b = key.float().contiguous().view(torch.int32).long()
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b)  # negative floats: larger magnitude, smaller integer


def merge_smallest(kept: Kept, cell: Tensor, key: Tensor, value: Tensor, payload: Tensor) -> Kept:
    """Kept ∪ new entries (cell, key, value, payload), keeping the m smallest keys per cell (ties: kept entries
    first, then new ones in their given order). Entries that cannot enter are dropped before any sort."""
    m = kept.key.shape[1]
    enter = key < kept.key[cell, m - 1]
    if not bool(enter.any()):
        return kept
    cell, key, value, payload = cell[enter], key[enter], value[enter], payload[enter]
    touched, local = torch.unique(cell, return_inverse=True)
    u = touched.numel()
    old_cell = torch.arange(u, device=cell.device).repeat_interleave(m)
    all_cell = torch.cat([old_cell, local])
    all_key = torch.cat([kept.key[touched].reshape(-1), key])
    all_value = torch.cat([kept.value[touched].reshape(-1), value])
    all_payload = torch.cat([kept.payload[touched].reshape(-1, payload.shape[1]), payload])
    # One stable sort by (cell, key): the cell in the high 32 bits, the key's float32 order in the low ones.
    order = torch.sort((all_cell << 32) | (_ordered_bits(all_key) + (1 << 31)), stable=True).indices
    sorted_cell = all_cell[order]
    starts = torch.searchsorted(sorted_cell, torch.arange(u, device=cell.device))
    rank = torch.arange(sorted_cell.numel(), device=cell.device) - starts[sorted_cell]
    take = rank < m
    order, sorted_cell, rank = order[take], sorted_cell[take], rank[take]
    new = empty_kept(u, m, cell.device)
    new.key[sorted_cell, rank] = all_key[order]
    new.value[sorted_cell, rank] = all_value[order]
    new.payload[sorted_cell, rank] = all_payload[order]
    kept.key[touched], kept.value[touched], kept.payload[touched] = new.key, new.value, new.payload
    return kept


class LatentState:
    """The streaming state of `n` selected latents: `update` with each batch's nonzero activations."""

    def __init__(self, n: int, *, top: int, per_bin: int, seed: int, device: torch.device):
        self.n, self.device = n, device
        self.count = torch.zeros(n, dtype=torch.long, device=device)
        self.massive_count = torch.zeros(n, dtype=torch.long, device=device)
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.massive_total = torch.zeros(n, dtype=torch.float64, device=device)
        self.top = empty_kept(n, top, device)
        self.top_typical = empty_kept(n, top, device)
        # Histogram range [0, 2**exponent); -200: nothing seen yet (merging empty bins changes nothing).
        self.exponent = torch.full((n,), -200, dtype=torch.long, device=device)
        self.hist = torch.zeros(n, N_BINS, dtype=torch.long, device=device)
        self.reservoir = empty_kept(n * N_BINS, per_bin, device)
        self._gen = torch.Generator(device=device).manual_seed(seed)

    def update(self, e: Entries) -> None:
        """Add one batch's nonzero activations (in store order: a batch's rows after every earlier batch's)."""
        if e.value.numel() == 0:
            return
        self.count.scatter_add_(0, e.latent, torch.ones_like(e.latent))
        self.massive_count.scatter_add_(0, e.latent, e.massive.long())
        self.total.scatter_add_(0, e.latent, e.value.double())
        self.massive_total.scatter_add_(0, e.latent, torch.where(e.massive, e.value, 0).double())
        self.top = merge_smallest(self.top, e.latent, -e.value, e.value, e.payload)
        t = e.typical
        self.top_typical = merge_smallest(self.top_typical, e.latent[t], -e.value[t], e.value[t], e.payload[t])
        self._grow_range(e)
        scale = torch.ldexp(torch.ones_like(e.value), -self.exponent[e.latent].to(torch.int32))
        b = (e.value * scale * N_BINS).long().clamp_(0, N_BINS - 1)
        cell = e.latent * N_BINS + b
        self.hist.view(-1).scatter_add_(0, cell, torch.ones_like(cell))
        key = torch.rand(e.value.shape, generator=self._gen, device=self.device)
        self.reservoir = merge_smallest(self.reservoir, cell, key, e.value, e.payload)

    def _grow_range(self, e: Entries) -> None:
        """Raise each latent's range to the power of two above its new maximum, merging bins as it doubles."""
        new_exp = self.exponent.clone()
        new_exp.scatter_reduce_(0, e.latent, torch.frexp(e.value).exponent.long(), reduce="amax")
        grow = new_exp - self.exponent
        for s in grow.unique().tolist():
            if s <= 0:
                continue
            idx = (grow == s).nonzero().flatten()
            self._merge_bins(idx, min(int(s), _BIN_BITS))
        self.exponent = new_exp

    def _merge_bins(self, idx: Tensor, s: int) -> None:
        """Latents `idx`: bin j of the doubled-`s`-times range is old bins [j·2^s, (j+1)·2^s)."""
        g, per, keep = idx.numel(), 1 << s, N_BINS >> s
        hist = self.hist[idx].view(g, keep, per).sum(-1)
        self.hist[idx] = torch.cat([hist, hist.new_zeros(g, N_BINS - keep)], 1)
        r = self.reservoir
        m = r.key.shape[1]
        cells = (idx[:, None] * N_BINS + torch.arange(N_BINS, device=idx.device)).reshape(-1)
        key = r.key[cells].view(g, keep, per * m)
        order = key.argsort(dim=-1, stable=True)[..., :m]
        new_key = key.gather(-1, order)
        new_value = r.value[cells].view(g, keep, per * m).gather(-1, order)
        pay = r.payload[cells].view(g, keep, per * m, len(PAYLOAD))
        new_pay = pay.gather(2, order[..., None].expand(-1, -1, -1, len(PAYLOAD)))
        pad = empty_kept(g * (N_BINS - keep), m, idx.device)
        r.key[cells] = torch.cat([new_key.view(g, keep, m), pad.key.view(g, -1, m)], 1).view(-1, m)
        r.value[cells] = torch.cat([new_value.view(g, keep, m), pad.value.view(g, -1, m)], 1).view(-1, m)
        r.payload[cells] = torch.cat(
            [new_pay.view(g, keep, m, len(PAYLOAD)), pad.payload.view(g, -1, m, len(PAYLOAD))], 1
        ).view(-1, m, len(PAYLOAD))

    def bin_width(self) -> Tensor:
        """Width of each latent's histogram bins, float64 [n] (0 for latents that never fired)."""
        width = torch.ldexp(torch.ones(self.n, dtype=torch.float64, device=self.device), self.exponent) / N_BINS
        return torch.where(self.count > 0, width, torch.zeros_like(width))
