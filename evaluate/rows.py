"""Where `sae inspect` gets its rows: a store (no LM), or held-out text run through the LM up to the site.

Both sources give the same three things: the rows in order, in batches, with their context and position
(`batches`); the activations of chosen rows again, for the context windows of the selected examples (`rows`);
and the token ids of chosen contexts (`contexts`). A row is named by its *planned* index context·seq_len +
position, the store's own numbering before its within-shard shuffle.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sae.errors import SaeError
from sae.sites import capture
from sae.store import Store

_PREFETCH = 4
"""Chunks read ahead of the one being encoded (reading and decompressing overlap the encode)."""


class RowBatch(NamedTuple):
    """Consecutive rows of the source."""

    x: Tensor
    """Activations [n, d] float32 on the device."""
    context: np.ndarray
    """Packed context of each row, int64 [n]."""
    position: np.ndarray
    """Position of each row in its context (0 is BOS), int64 [n]."""
    row: np.ndarray
    """The store row index (storage order) of each row; for text, the planned index. int64 [n]."""
    token: np.ndarray
    """Token id at each row, int64 [n]."""


class StoreRows:
    """One site of a finalized store, read chunk by chunk in storage order."""

    def __init__(self, store: Store, site: str, device: torch.device, max_rows: int | None = None):
        if site not in store.sites:
            raise SaeError(f"store {store.path} has no site {site!r} (the SAE's); its sites: {', '.join(store.sites)}")
        self.store, self.site, self.device = store, site, device
        self.chunks = store.complete_chunks()
        if not self.chunks:
            raise SaeError(f"store {store.path} lists no complete chunk; finish the harvest first")
        self.seq_len = store.seq_len
        total = sum(b - a for a, b in map(store.chunk_range, self.chunks))
        self.n_rows = total if max_rows is None else min(total, max_rows)

    def describe(self) -> dict[str, Any]:
        return {"store": str(self.store.path), "site": self.site, "store_rows": self.store.n_rows}

    def _read(self, i: int) -> tuple[Tensor, np.ndarray, np.ndarray, np.ndarray]:
        x = self.store.chunk(self.site, i)
        m = self.store.chunk_meta(i)
        return x, *(np.asarray(a, dtype=np.int64) for a in (m.context, m.position, m.tokens))

    def _chunks(self, chunks: list[int]) -> Iterator[tuple[int, tuple[Tensor, np.ndarray, np.ndarray, np.ndarray]]]:
        with ThreadPoolExecutor(2, thread_name_prefix="sae-inspect-read") as pool:
            futures = [pool.submit(self._read, i) for i in chunks[:_PREFETCH]]
            for j, i in enumerate(chunks):
                data = futures[j].result()
                futures[j] = None  # type: ignore[call-overload]  # drop the reference: bounded memory
                if j + _PREFETCH < len(chunks):
                    futures.append(pool.submit(self._read, chunks[j + _PREFETCH]))
                yield i, data

    def batches(self) -> Iterator[RowBatch]:
        """The rows in storage order, one chunk per batch, up to `n_rows`."""
        left = self.n_rows
        for i, (x, context, position, token) in self._chunks(self.chunks):
            n = min(left, x.shape[0])
            start = self.store.chunk_range(i)[0]
            yield RowBatch(
                x[:n].to(self.device, non_blocking=True).float(),
                context[:n],
                position[:n],
                np.arange(start, start + n, dtype=np.int64),
                token[:n],
            )
            left -= n
            if left <= 0:
                return

    def rows(self, planned: np.ndarray) -> Iterator[tuple[np.ndarray, Tensor]]:
        """Activations of the rows with planned index in `planned` (sorted, unique): (their planned indices,
        [n, d] float32), chunk by chunk, stopping once all are found. Only the small metadata arrays of the
        other chunks are read."""
        left = len(planned)
        for i in self.chunks:
            if left == 0:
                return
            meta = self.store.chunk_meta(i)
            here = np.asarray(meta.context, dtype=np.int64) * self.seq_len + np.asarray(meta.position)
            hit = np.isin(here, planned, assume_unique=True).nonzero()[0]
            if len(hit) == 0:
                continue
            x = self.store.chunk(self.site, i)[torch.from_numpy(hit)]
            left -= len(hit)
            yield here[hit], x.to(self.device).float()

    def contexts(self, ids: np.ndarray) -> np.ndarray:
        """Token ids of contexts `ids` (sorted, unique), [len(ids), seq_len] int32."""
        arr = self.store.input_ids
        out = np.empty((len(ids), self.seq_len), dtype=np.int32)
        block = 4096  # contexts per contiguous slice (sharded arrays read slices far faster than index lists)
        i = 0
        while i < len(ids):
            first = int(ids[i])
            j = int(np.searchsorted(ids, first + block))
            rows = np.asarray(arr[first : int(ids[j - 1]) + 1])
            out[i:j] = rows[ids[i:j] - first]
            i = j
        return out


class ModelRows:
    """Held-out contexts run through the LM, stopped after the site; rows in context-major order."""

    def __init__(self, model: Any, site: str, contexts: np.ndarray, device: torch.device, batch_contexts: int = 16):
        self.model, self.site, self.device = model, site, device
        self._contexts = contexts
        self.seq_len = int(contexts.shape[1])
        self.n_rows = int(contexts.size)
        self.batch_contexts = batch_contexts

    def describe(self) -> dict[str, Any]:
        return {"site": self.site, "contexts": int(len(self._contexts))}

    def _forward(self, ids: np.ndarray) -> Tensor:
        tokens = torch.from_numpy(self._contexts[ids]).to(self.device, torch.long)
        return capture(self.model, [self.site], tokens)[self.site].float()

    def batches(self) -> Iterator[RowBatch]:
        t = self.seq_len
        for c0 in range(0, len(self._contexts), self.batch_contexts):
            ids = np.arange(c0, min(c0 + self.batch_contexts, len(self._contexts)))
            x = self._forward(ids)
            rows = np.arange(ids[0] * t, (ids[-1] + 1) * t, dtype=np.int64)
            yield RowBatch(x.reshape(len(rows), -1), rows // t, rows % t, rows, self._contexts[ids].reshape(-1))

    def rows(self, planned: np.ndarray) -> Iterator[tuple[np.ndarray, Tensor]]:
        t = self.seq_len
        ctx = np.unique(planned // t)
        for c0 in range(0, len(ctx), self.batch_contexts):
            ids = ctx[c0 : c0 + self.batch_contexts]
            x = self._forward(ids).reshape(len(ids) * t, -1)
            here = (ids[:, None] * t + np.arange(t)).reshape(-1)
            hit = np.isin(here, planned, assume_unique=True).nonzero()[0]
            yield here[hit], x[torch.from_numpy(hit).to(x.device)]

    def contexts(self, ids: np.ndarray) -> np.ndarray:
        return self._contexts[ids]
