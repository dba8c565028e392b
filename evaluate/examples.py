"""Which rows a latent's page shows, and the latent's value at every token of their context windows.

`choose` reads the streaming state once it is complete: the top examples, and per quantile interval of the
activation range [0, max] a uniform sample (the m smallest reservoir keys over the interval's histogram bins;
a bin belongs to the interval holding its centre). `window_values` is the second pass: the rows of every
window are read again and encoded, and each example gets its latent's value at each of its tokens.
Everything is flat numpy arrays, one entry per example (or per window token), so 10⁵ examples cost no Python
loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from sae.progress import Progress

from .latent_state import N_BINS, LatentState

TOP = -2
"""`Examples.group` of a top example over all rows; quantile examples carry their interval's number (0 = lowest)."""

TOP_TYPICAL = -1
"""`Examples.group` of a top example over typical rows only (neither massive nor BOS)."""


class Examples(NamedTuple):
    """The chosen examples, sorted by latent, then top examples (all rows, then typical rows), then intervals from
    the highest down, then by activation (descending)."""

    latent: np.ndarray
    """Index into the selected latents."""
    group: np.ndarray
    """TOP, TOP_TYPICAL, or the quantile interval."""
    row: np.ndarray
    """Store row (storage order; for text, the planned index)."""
    context: np.ndarray
    """Packed context."""
    position: np.ndarray
    """Position in the context."""
    kind: np.ndarray
    """Row kind, an index into `sae.evaluate.latent_state.KINDS`."""
    act: np.ndarray
    """The latent's activation there (float32)."""


class Intervals(NamedTuple):
    """The non-empty quantile intervals, sorted by latent and from the highest interval down."""

    latent: np.ndarray
    group: np.ndarray
    lo: np.ndarray
    """Lower end of the interval (float64)."""
    hi: np.ndarray
    count: np.ndarray
    """Activations of the latent inside it (its histogram bins')."""


class Windows(NamedTuple):
    """Each example's window, flattened: example e's tokens are [offset[e], offset[e + 1])."""

    start: np.ndarray
    """First position of each example's window."""
    offset: np.ndarray
    """[n + 1] offsets into the flat arrays."""
    position: np.ndarray
    """Flat: position of each window token."""
    planned: np.ndarray
    """Flat: planned row (context·seq_len + position) of each window token."""


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... inside each run of equal values of sorted `group`."""
    starts = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1]
    size = np.diff(np.r_[starts, len(group)])
    return np.arange(len(group)) - np.repeat(starts, size)


def _unique(a: np.ndarray) -> np.ndarray:
    a = np.sort(a)
    return a[np.r_[True, a[1:] != a[:-1]]] if len(a) else a


def choose(state: LatentState, quantiles: int) -> tuple[Examples, Intervals]:
    """Top examples (over all rows and over typical rows) and quantile-stratified examples of every selected
    latent."""
    n = state.n

    def kept(k: Any, group: int) -> tuple[np.ndarray, ...]:
        ok = np.isfinite(k.key.cpu().numpy())
        v, p = k.value.cpu().numpy(), k.payload.cpu().numpy()
        j, s = np.nonzero(ok)  # row-major: by latent, then rank (largest first)
        return (j, np.full(len(j), group), *p[j, s].T, v[j, s])

    top_ok = np.isfinite(state.top.key.cpu().numpy())
    top_v = state.top.value.cpu().numpy()
    tops = [np.concatenate(t) for t in zip(kept(state.top, TOP), kept(state.top_typical, TOP_TYPICAL), strict=True)]

    vmax = np.where(top_ok[:, 0], top_v[:, 0], 0).astype(np.float64)
    width = state.bin_width().cpu().numpy()
    hist = state.hist.cpu().numpy()
    centre = (np.arange(N_BINS) + 0.5)[None, :] * width[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(vmax[:, None] > 0, np.floor(centre / (vmax[:, None] / quantiles)), 0)
    q = np.clip(q, 0, quantiles - 1).astype(np.int64)  # [n, N_BINS]
    cell_group = np.arange(n)[:, None] * quantiles + q
    counts = np.bincount(cell_group.ravel(), weights=hist.ravel(), minlength=n * quantiles).astype(np.int64)

    key = state.reservoir.key.cpu().numpy().reshape(n, N_BINS, -1)
    m = key.shape[2]
    ok = np.isfinite(key)
    jj, bb, ss = np.nonzero(ok)
    g = cell_group[jj, bb]
    k = key[jj, bb, ss]
    order = np.lexsort((k, g))
    jj, bb, ss, g = jj[order], bb[order], ss[order], g[order]
    keep = _rank_in_group(g) < m  # the m smallest keys of the interval
    jj, bb, ss, g = jj[keep], bb[keep], ss[keep], g[keep]
    value = state.reservoir.value.cpu().numpy().reshape(n, N_BINS, m)[jj, bb, ss]
    pay = state.reservoir.payload.cpu().numpy().reshape(n, N_BINS, m, -1)[jj, bb, ss]
    qs = g % quantiles
    sampled = (jj, qs, *pay.T, value)

    # Order: latent, top examples first, then intervals from the highest down, then activation descending.
    parts = [np.concatenate([a, b]) for a, b in zip(tops, sampled, strict=True)]
    rank_group = np.where(parts[1] < 0, parts[1], quantiles - parts[1])
    order = np.lexsort((np.arange(len(parts[0])), -parts[6], rank_group, parts[0]))
    ex = Examples(*(a[order] for a in parts[:6]), parts[6][order].astype(np.float32))

    nz = np.flatnonzero(counts)
    lat, grp = nz // quantiles, nz % quantiles
    order = np.lexsort((-grp, lat))
    lat, grp = lat[order], grp[order]
    step = vmax[lat] / quantiles
    return ex, Intervals(lat, grp, grp * step, (grp + 1) * step, counts[nz][order])


def windows(ex: Examples, window: int, seq_len: int) -> Windows:
    """The ±`window` tokens around each example, clipped to its context."""
    lo = np.maximum(0, ex.position - window)
    hi = np.minimum(seq_len - 1, ex.position + window)
    size = hi - lo + 1
    offset = np.r_[0, np.cumsum(size)]
    position = np.repeat(lo, size) + np.arange(offset[-1]) - np.repeat(offset[:-1], size)
    planned = np.repeat(ex.context, size) * seq_len + position
    return Windows(lo, offset, position, planned)


def window_values(
    source: Any,
    sae: Any,
    selected: np.ndarray,
    ex: Examples,
    win: Windows,
    left_out: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
    batch_size: int,
    seq_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The second pass: (flat latent values over every window token, NaN where the row is left out; the norm
    of each example's own row). `left_out(x, planned rows)` says which rows the first pass left out."""
    n_sel = len(selected)
    size = np.diff(win.offset)
    keys = win.planned * n_sel + np.repeat(ex.latent, size)
    pairs = _unique(keys)  # (planned row, latent), row-major
    prow, plat = pairs // n_sel, pairs % n_sel
    values = np.full(len(pairs), np.nan, dtype=np.float32)
    own = ex.context * seq_len + ex.position
    own_u = _unique(own)
    own_norm = np.full(len(own_u), np.nan)
    planned = _unique(prow)
    device = sae.W_enc.device
    latent_ids = torch.as_tensor(selected, device=device)
    progress = Progress("inspect windows", len(planned), unit="rows")
    for here, x in source.rows(planned):
        progress.update(len(here))
        for i in range(0, len(here), batch_size):
            xs, hs = x[i : i + batch_size], here[i : i + batch_size]
            finite = torch.isfinite(xs).all(1) & ~left_out(xs, hs)
            with torch.no_grad():
                a = sae.encode(torch.where(finite[:, None], xs, 0.0))
            at = np.searchsorted(own_u, hs)
            hit = (at < len(own_u)) & (own_u[np.minimum(at, len(own_u) - 1)] == hs)
            own_norm[at[hit]] = xs[torch.from_numpy(hit).to(xs.device)].norm(dim=1).cpu().numpy()
            lo, hi = np.searchsorted(prow, hs, "left"), np.searchsorted(prow, hs, "right")
            cnt = hi - lo
            which = np.repeat(np.arange(len(hs)), cnt)
            idx = np.repeat(lo, cnt) + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            w = torch.from_numpy(which).to(device)
            got = a[w, latent_ids[torch.from_numpy(plat[idx]).to(device)]]
            values[idx] = torch.where(finite[w], got, float("nan")).float().cpu().numpy()
    progress.close()
    return values[np.searchsorted(pairs, keys)], own_norm[np.searchsorted(own_u, own)]
