"""Row types: which activation rows are BOS, *massive* or typical, and which rows an SAE leaves out.

A row is **massive** when its L2 norm exceeds `factor` × the site's median norm over non-BOS rows (the median
from the store's statistics). Language models put a few token types at 5–100× the median norm; such rows hold
a large share of Σ‖x − x̄‖², so every metric is reported over typical and massive rows apart.

This module holds the definitions shared by the store statistics, training and eval:
- the norm histogram (a bounded-memory sketch of the norm distribution that merges exactly across shards) and
  the massive-row summary computed from it and from each shard's candidate rows;
- `Exclusion`, the SAE metadata key `exclude` saying which rows an SAE was trained without, and the masks that
  apply it (training leaves those rows out; eval leaves them unspliced, as it does BOS).

Norm quantiles are read from a histogram with `BINS_PER_OCTAVE` logarithmic bins per factor of 2: a quantile
is the geometric middle of its bin, within 2^(1/128) − 1 ≈ 0.55 % of the exact order statistic. The maximum is
exact. Counts are integers, so merging shards in any order gives the same histogram.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

DEFAULT_MASSIVE_FACTOR = 3.0
"""Default M: a row is massive when its norm exceeds M × the site's median non-BOS norm (README, "Massive
rows", says how it was chosen)."""

BINS_PER_OCTAVE = 64
"""Norm histogram resolution: bin b holds norms in [2^(b/64), 2^((b+1)/64))."""

CANDIDATE_FACTOR = 2.0
"""Each shard keeps the rows whose norm exceeds this × the shard's own median (norm, position, token), so the
massive rows for any factor M with M × the store's median above every shard's floor are found without a rescan."""

REPORT_FACTORS = (2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
"""Factors the statistics tabulate (count and variance share), for choosing M."""

TOP = 20
"""How many top positions and token ids a summary lists."""

_ZERO_BIN = -(1 << 20)
"""Histogram bin of zero-norm rows (log2 of 0 has no bin)."""


# --------------------------------------------------------------------------------------------------
# Norm histograms


def norm_bins(norms: np.ndarray) -> np.ndarray:
    """Histogram bin of each norm (int64)."""
    norms = np.asarray(norms, dtype=np.float64)
    with np.errstate(divide="ignore"):
        b = np.floor(np.log2(norms) * BINS_PER_OCTAVE)
    b[~(norms > 0)] = _ZERO_BIN
    return b.astype(np.int64)


def histogram(norms: np.ndarray) -> dict[str, list[int]]:
    """The sparse norm histogram {"bins": sorted bin ids, "counts": rows per bin} of the finite `norms` (a row
    holding NaN or Inf has no place in it; the store counts those apart)."""
    norms = np.asarray(norms, dtype=np.float64)
    bins, counts = np.unique(norm_bins(norms[np.isfinite(norms)]), return_counts=True)
    return {"bins": bins.tolist(), "counts": counts.tolist()}


def merge_histograms(hists: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    """The histogram of the union of disjoint row sets (exact: integer counts)."""
    total: Counter[int] = Counter()
    for h in hists:
        total.update(dict(zip(h["bins"], h["counts"], strict=True)))
    bins = sorted(total)
    return {"bins": bins, "counts": [total[b] for b in bins]}


def quantile(hist: Mapping[str, Sequence[int]], q: float) -> float:
    """Norm quantile q ∈ [0, 1] from a histogram: the geometric middle of the bin holding the ⌈q·n⌉-th smallest
    norm (nan for an empty histogram; 0 for zero-norm rows)."""
    counts = np.asarray(hist["counts"], dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        return math.nan
    rank = min(max(math.ceil(q * n), 1), n)
    b = int(hist["bins"][int(np.searchsorted(np.cumsum(counts), rank))])
    return 0.0 if b == _ZERO_BIN else 2.0 ** ((b + 0.5) / BINS_PER_OCTAVE)


def massive_threshold(median: float, factor: float) -> float:
    """The norm above which a row is massive."""
    return factor * median


# --------------------------------------------------------------------------------------------------
# Per-shard pieces and their merge (the store's statistics and `sae stats` use the same two functions)


def shard_norms(
    norms: np.ndarray, dots: np.ndarray | None, position: np.ndarray, tokens: np.ndarray, candidates: np.ndarray
) -> dict[str, Any]:
    """The norm statistics of one shard's non-BOS rows, JSON-ready.

    `norms` [n]: the rows' norms; `candidates`: indices of the rows with norm > `candidate_floor(norms)`;
    `dots` [len(candidates)]: those rows' dot products with the shard's mean vector (their share of
    Σ‖x − x̄‖² needs x·x̄); `position`, `tokens` [n]: where each row sits and its token id.
    """
    norms = np.asarray(norms, dtype=np.float64)
    c = np.asarray(candidates, dtype=np.int64)
    return {
        "n": int(norms.size),
        "hist": histogram(norms),
        "max": float(norms[np.isfinite(norms)].max()) if np.isfinite(norms).any() else None,
        "floor": candidate_floor(norms),
        "candidates": {
            "norm": norms[c].tolist(),
            "dot": [] if dots is None else np.asarray(dots, dtype=np.float64).tolist(),
            "position": np.asarray(position)[c].astype(int).tolist(),
            "token": np.asarray(tokens)[c].astype(int).tolist(),
        },
    }


def candidate_floor(norms: np.ndarray) -> float:
    """CANDIDATE_FACTOR × the median of `norms` (from their histogram, as the store's median is)."""
    return CANDIDATE_FACTOR * quantile(histogram(norms), 0.5) if len(norms) else math.inf


def candidate_rows(norms: np.ndarray) -> np.ndarray:
    """Indices of the rows a shard keeps as massive-row candidates."""
    return np.flatnonzero(np.asarray(norms) > candidate_floor(norms))


def summarise(
    parts: Sequence[Mapping[str, Any]],
    mean: np.ndarray,
    total_sq_dev: float,
    *,
    factor: float = DEFAULT_MASSIVE_FACTOR,
    token_totals: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """The site's norm distribution and massive-row summary from its shards' `shard_norms` parts.

    `mean`: the non-BOS mean vector x̄; `total_sq_dev`: Σ‖x − x̄‖² over the non-BOS rows (n × variance);
    `token_totals`: non-BOS occurrences of token ids (at least of the top massive ones), for the share of each
    token's occurrences that are massive. A massive row's ‖x − x̄‖² = ‖x‖² − 2 x·x̄ + ‖x̄‖² is computed with x·x̄_s,
    x̄_s the mean of the row's own shard (exact for one shard; across shards off by x·(x̄ − x̄_s), small where
    shards hold many rows). `exact` is false when M × median lies below some shard's candidate floor: then the
    counts are lower bounds and `sae stats` rescans.
    """
    hist = merge_histograms([p["hist"] for p in parts])
    n = sum(int(p["n"]) for p in parts)
    median = quantile(hist, 0.5)
    maxes = [p["max"] for p in parts if p["max"] is not None]
    floors = [p["floor"] for p in parts if p["n"]]
    cand = {k: np.concatenate([np.asarray(p["candidates"][k], dtype=float) for p in parts]) for k in ("norm", "dot")}
    pos = np.concatenate([np.asarray(p["candidates"]["position"], dtype=np.int64) for p in parts])
    tok = np.concatenate([np.asarray(p["candidates"]["token"], dtype=np.int64) for p in parts])
    mm = float(np.dot(mean, mean))
    dev = cand["norm"] ** 2 - 2 * cand["dot"] + mm if cand["dot"].size == cand["norm"].size else None

    def over(f: float) -> dict[str, Any]:
        t = massive_threshold(median, f)
        sel = cand["norm"] > t
        count = int(sel.sum())
        share_var = float(dev[sel].sum()) / total_sq_dev if dev is not None and total_sq_dev > 0 else math.nan
        return {
            "factor": f,
            "threshold": t,
            "exact": bool(not floors or t >= max(floors)),
            "count": count,
            "share_rows": count / n if n else math.nan,
            "share_variance": share_var,
        }

    massive = over(factor)
    sel = cand["norm"] > massive["threshold"]
    positions = Counter(pos[sel].tolist())
    tokens = Counter(tok[sel].tolist())
    massive["positions"] = [[p, c] for p, c in sorted(positions.items(), key=lambda kv: (-kv[1], kv[0]))]
    massive["tokens"] = [
        {"id": t, "count": c, **({"occurrences": int(token_totals.get(t, 0))} if token_totals is not None else {})}
        for t, c in sorted(tokens.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]
    ]
    top = max(maxes) if maxes else math.nan
    return {
        "n_rows": n,
        "median": median,
        # a bin's middle can lie above the largest norm in it
        "p99": min(quantile(hist, 0.99), top),
        "p999": min(quantile(hist, 0.999), top),
        "max": top,
        "histogram": {"bins_per_octave": BINS_PER_OCTAVE, **hist},
        "massive": massive,
        "by_factor": [over(f) for f in REPORT_FACTORS],
    }


def top_token_ids(parts: Sequence[Mapping[str, Any]], median: float, factor: float) -> list[int]:
    """The TOP most frequent token ids among the massive rows of `parts` (for counting their occurrences)."""
    t = massive_threshold(median, factor)
    counts: Counter[int] = Counter()
    for p in parts:
        c = p["candidates"]
        counts.update(tok for nm, tok in zip(c["norm"], c["token"], strict=True) if nm > t)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]]


# --------------------------------------------------------------------------------------------------
# Exclusions: which rows an SAE never trained on


class Exclusion(NamedTuple):
    """Rows left out of training, as the SAE's cfg metadata key `exclude` records them.

    Schema of `metadata["exclude"]` (every key optional; a missing key or null means nothing of that kind):
    ``{"massive_factor": M | null, "massive_threshold": norm | null, "median_norm": norm | null,
    "positions": [int, ...], "token_ids": [int, ...], "n_excluded": int, "share_excluded": float}``.
    Norms are in the units of the store's activations (before any training-time scaling). BOS keeps its own
    key (`keep_bos`).
    """

    massive_factor: float | None = None
    """Rows with norm > massive_factor × the site's median non-BOS norm were left out (None: none)."""
    massive_threshold: float | None = None
    """The absolute norm threshold training used (None: M × the median of the store, or of the eval rows)."""
    positions: tuple[int, ...] = ()
    """Context positions left out."""
    token_ids: tuple[int, ...] = ()
    """Token ids left out."""

    @property
    def any(self) -> bool:
        return (
            self.massive_factor is not None
            or self.massive_threshold is not None
            or bool(self.positions)
            or (bool(self.token_ids))
        )

    def describe(self) -> str:
        """One phrase for reports: what is left out, or `nothing`."""
        parts = []
        if self.massive_factor is not None or self.massive_threshold is not None:
            parts.append(
                f"massive rows (norm > {self.massive_factor:g} × median)"
                if self.massive_factor is not None
                else f"rows with norm > {self.massive_threshold:.4g}"
            )
        if self.positions:
            parts.append("positions " + ", ".join(map(str, self.positions)))
        if self.token_ids:
            parts.append("token ids " + ", ".join(map(str, self.token_ids)))
        return "; ".join(parts) or "nothing"


def exclusion_from_metadata(metadata: Mapping[str, Any] | None) -> Exclusion:
    """The `Exclusion` an SAE's cfg metadata records (no key: nothing excluded)."""
    ex = (metadata or {}).get("exclude") or {}
    if not isinstance(ex, Mapping):
        return Exclusion()

    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return Exclusion(
        massive_factor=num(ex.get("massive_factor")),
        massive_threshold=num(ex.get("massive_threshold")),
        positions=tuple(int(p) for p in ex.get("positions") or ()),
        token_ids=tuple(int(t) for t in ex.get("token_ids") or ()),
    )


def exclusion_metadata(ex: Exclusion, *, median: float | None, n_excluded: int, n_rows: int) -> dict[str, Any]:
    """The `exclude` metadata value for `ex`, with the count and share of rows it removed."""
    threshold = ex.massive_threshold
    if threshold is None and ex.massive_factor is not None and median is not None:
        threshold = massive_threshold(median, ex.massive_factor)
    return {
        "massive_factor": ex.massive_factor,
        "massive_threshold": threshold,
        "median_norm": median,
        "positions": list(ex.positions),
        "token_ids": list(ex.token_ids),
        "n_excluded": n_excluded,
        "share_excluded": n_excluded / n_rows if n_rows else 0.0,
    }


def row_norms(x: Tensor) -> Tensor:
    """L2 norm of each row [N] (float32)."""
    return torch.linalg.vector_norm(x.float(), dim=-1)


def massive_mask(norms: Tensor, threshold: float | None) -> Tensor:
    """True where a row is massive (all False without a threshold)."""
    if threshold is None or not math.isfinite(threshold):
        return torch.zeros_like(norms, dtype=torch.bool)
    return norms > threshold


def excluded_mask(norms: Tensor, position: Tensor, tokens: Tensor, ex: Exclusion, threshold: float | None) -> Tensor:
    """True for the rows `ex` leaves out. `threshold`: the massive-row norm threshold to use when `ex` leaves
    massive rows out and records none of its own."""
    out = torch.zeros_like(norms, dtype=torch.bool)
    if ex.massive_factor is not None or ex.massive_threshold is not None:
        out |= massive_mask(norms, ex.massive_threshold if ex.massive_threshold is not None else threshold)
    if ex.positions:
        out |= torch.isin(position, torch.tensor(ex.positions, device=position.device, dtype=position.dtype))
    if ex.token_ids:
        out |= torch.isin(tokens, torch.tensor(ex.token_ids, device=tokens.device, dtype=tokens.dtype))
    return out


# --------------------------------------------------------------------------------------------------
# Text for summaries (harvest, `sae stats`)


def token_text(decode: Any, token_id: int) -> str:
    """`repr` of a token's text through `decode` (a tokenizer's decode, or None: the id alone)."""
    if decode is None:
        return f"#{token_id}"
    try:
        return f"{decode([token_id])!r} (#{token_id})"
    except Exception:  # a tokenizer that cannot decode this id: the id alone still says which token
        return f"#{token_id}"


def describe_norms(s: Mapping[str, Any], decode: Any = None, indent: str = "  ") -> list[str]:
    """Lines describing a `summarise` result: the norm distribution, the massive rows, their positions and
    tokens, and the counts at the other tabulated factors."""

    def g(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"

    def pct(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f} %"

    m = s["massive"]
    lines = [
        f"{indent}row norms      over {s['n_rows']:,} non-BOS rows: median {g(s['median'])}, p99 {g(s['p99'])}, "
        f"p99.9 {g(s['p999'])}, max {g(s['max'])} ({g(s['max'] / s['median']) if s['median'] else '–'}× median)",
        f"{indent}massive rows   norm > {m['factor']:g} × median = {g(m['threshold'])}: {m['count']:,} rows "
        f"({pct(m['share_rows'])} of rows) holding {pct(m['share_variance'])} of Σ‖x − x̄‖²"
        + ("" if m["exact"] else " (lower bounds: M × median lies below a shard's candidate floor; run `sae stats`)"),
    ]
    if m["count"]:
        total = max(m["count"], 1)
        pos = ", ".join(f"{p} ({100 * c / total:.0f} %)" for p, c in m["positions"][:8])
        lines.append(f"{indent}  at positions {pos}" + (" ..." if len(m["positions"]) > 8 else ""))
        toks = []
        for t in m["tokens"][:8]:
            share = f", {100 * t['count'] / t['occurrences']:.0f} % of its occurrences" if t.get("occurrences") else ""
            toks.append(f"{token_text(decode, t['id'])} ×{t['count']}{share}")
        lines.append(f"{indent}  tokens {'; '.join(toks)}")
    other = [f"{f['factor']:g}×: {pct(f['share_rows'])} rows / {pct(f['share_variance'])} var" for f in s["by_factor"]]
    lines.append(f"{indent}by factor      " + "; ".join(other))
    return lines
