"""Rows left out of training: massive rows (norm > M × the site's median non-BOS norm), given context positions,
given token ids (`--exclude-massive`, `--exclude-positions`, `--exclude-tokens`).

The definitions and the metadata schema are `sae.rowtypes`' (`Exclusion`, key `exclude`), which eval reads to
leave the same rows unspliced. A row's norm comes from the batch itself (raw units, before the input scale); its
position and token id from the store's `position` and `tokens` arrays at the batch's store rows, read a whole
chunk at a time and cached. The filter counts every row it is given and every row it drops; the counts are
checkpointed, summed over the ranks of a DDP run, and written into the metadata with their share.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from sae.config import TrainConfig
from sae.errors import SaeError
from sae.rowtypes import Exclusion, exclusion_metadata, massive_threshold, row_norms
from sae.store import Store

from .reader import Batch, Rows

CACHED_CHUNKS = 512
"""Chunks whose positions and token ids are kept in memory (8 bytes a row; the reader's buffer holds fewer)."""


class RowFilter:
    """Drops the rows an `Exclusion` leaves out of each batch, and counts them."""

    def __init__(self, cfg: TrainConfig, store: Store, site: str, columns: slice | None = None):
        self.store = store
        self.columns = columns if columns is not None else slice(None)
        """The columns of a batch row that hold `site` (a transcoder's batch holds its input, then its target)."""
        self.exclusion = Exclusion(
            massive_factor=cfg.exclude_massive,
            positions=tuple(cfg.exclude_positions),
            token_ids=tuple(cfg.exclude_tokens),
        )
        self.median: float | None = None
        self.threshold: float | None = None
        if cfg.exclude_massive is not None:
            if not (math.isfinite(cfg.exclude_massive) and cfg.exclude_massive > 0):
                raise SaeError(f"--exclude-massive must be a positive factor, got {cfg.exclude_massive}")
            norms = store.norm_stats(site)
            if norms is None or not math.isfinite(norms.get("median") or math.nan):
                raise SaeError(
                    f"--exclude-massive: store {store.path} has no row-norm statistics for {site}; run `sae stats` "
                    "on it or re-finalize it with this version"
                )
            self.median = float(norms["median"])
            self.threshold = massive_threshold(self.median, cfg.exclude_massive)
        self.seen = 0
        """Rows given to `apply` (this rank's; `totals` sums the ranks)."""
        self.excluded = 0
        """Of those, rows dropped."""
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @property
    def active(self) -> bool:
        return self.exclusion.any

    def keep(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Bool [n] on x's device: True for the rows (raw activations `x`, store rows `rows`) training keeps; a
        row's norm is that of its `columns`."""
        drop = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        if self.threshold is not None:
            drop |= row_norms(x[:, self.columns]) > self.threshold
        ex = self.exclusion
        if ex.positions or ex.token_ids:
            position, tokens = self._lookup(rows)
            meta = torch.zeros(len(x), dtype=torch.bool)
            if ex.positions:
                meta |= torch.from_numpy(np.isin(position, ex.positions))
            if ex.token_ids:
                meta |= torch.from_numpy(np.isin(tokens, ex.token_ids))
            drop |= meta.to(x.device)
        return ~drop

    def apply(self, batch: Batch) -> torch.Tensor:
        """The batch's kept rows (raw units); counts the rows seen and dropped."""
        self.seen += len(batch.x)
        if not self.active:
            return batch.x
        keep = self.keep(batch.x, batch.rows)
        n_keep = int(keep.sum())
        self.excluded += len(batch.x) - n_keep
        if n_keep == 0:
            raise SaeError(f"every row of a batch is excluded ({self.exclusion.describe()}); exclude fewer rows")
        return batch.x if n_keep == len(batch.x) else batch.x[keep]

    def rows(self, r: Rows | None) -> Rows | None:
        """Held-out rows `r` without the excluded ones (not counted)."""
        if r is None or not self.active or not len(r.x):
            return r
        keep = self.keep(r.x.float(), r.rows).cpu()
        return Rows(r.x[keep], r.rows[keep])

    def kept_stats(self, sample: Rows, columns: slice = slice(None)) -> tuple[float, float]:
        """(mean norm, σ² = E‖x − x̄‖²) of the kept rows of `sample` (raw units; of their `columns`: one site of a
        transcoder's rows). Excluding massive rows removes a large part of the store's variance, so the input
        scale and the loss normaliser come from the rows the SAE trains on, not from the store's statistics over
        every row."""
        kept = self.rows(sample)
        if kept is None or not len(kept.x):
            raise SaeError(f"every sampled training row is excluded ({self.exclusion.describe()}); exclude fewer rows")
        x = kept.x[:, columns].double()
        mean = x.mean(0)
        return float(x.norm(dim=1).mean()), float(x.square().sum(1).mean() - mean @ mean)

    def totals(self, dd: Any) -> tuple[int, int]:
        """(rows seen, rows excluded) over every rank (a collective under DDP: every rank calls it)."""
        if dd.group is None:
            return self.seen, self.excluded
        t = torch.tensor([self.seen, self.excluded], dtype=torch.long)  # host values: over the gloo group
        torch.distributed.all_reduce(t, group=dd.cpu_group)
        return int(t[0]), int(t[1])

    def state(self, dd: Any) -> dict[str, int]:
        """The counts for a checkpoint (global; collective under DDP)."""
        seen, excluded = self.totals(dd)
        return {"seen": seen, "excluded": excluded}

    def restore(self, state: dict[str, int] | None, main: bool) -> None:
        """Continue the counts of a checkpoint (rank 0 carries the global totals, the others start at 0)."""
        if state and main:
            self.seen, self.excluded = int(state["seen"]), int(state["excluded"])

    def metadata(self, seen: int, excluded: int) -> dict[str, Any]:
        """The SAE's `exclude` metadata value."""
        return exclusion_metadata(self.exclusion, median=self.median, n_excluded=excluded, n_rows=seen)

    def _lookup(self, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Position and token id of each store row, read chunk by chunk through the store's arrays."""
        rows = rows.cpu().numpy().astype(np.int64)
        chunk_rows = self.store.chunk_rows
        ids = rows // chunk_rows
        position = np.empty(len(rows), dtype=np.int64)
        tokens = np.empty(len(rows), dtype=np.int64)
        for c in np.unique(ids):
            sel = ids == c
            pos_c, tok_c = self._chunk(int(c))
            off = rows[sel] - int(c) * chunk_rows
            position[sel], tokens[sel] = pos_c[off], tok_c[off]
        return position, tokens

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._cache.get(c)
        if hit is not None:
            self._cache.move_to_end(c)
            return hit
        start, stop = self.store.chunk_range(c)
        got = (
            np.asarray(self.store.array("position")[start:stop]),
            np.asarray(self.store.array("tokens")[start:stop]),
        )
        self._cache[c] = got
        if len(self._cache) > CACHED_CHUNKS:
            self._cache.popitem(last=False)
        return got


__all__ = ["CACHED_CHUNKS", "RowFilter"]
