"""Synthetic activation stores for the train tests and benchmarks: built directly with `sae.store`, in seconds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sae.store import finalize, init_store

SITE = "blocks.0.hook_resid_post"


def sparse_data(d: int, n_features: int | None = None, active: int = 4, seed: int = 1) -> Callable:
    """Rows drawn from a known sparse dictionary: `active` unit-norm directions per row (of `n_features`, default
    4d) with positive magnitudes, plus a constant offset; BOS rows (position 0) are huge and all alike, as in
    real language models."""
    g = torch.Generator().manual_seed(seed)
    n_features = n_features or 4 * d
    dictionary = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)
    offset = torch.randn(d, generator=g) * 0.5
    bos = torch.randn(d, generator=g) * 30

    def make(n: int, position: np.ndarray, shard: int) -> torch.Tensor:
        gs = torch.Generator().manual_seed(seed * 100003 + shard)
        idx = torch.randint(n_features, (n, active), generator=gs)
        mags = 1 + torch.rand(n, active, generator=gs) * 2
        x = torch.einsum("na,nad->nd", mags, dictionary[idx]) + offset
        x[torch.from_numpy(position == 0)] = bos
        return x

    make.dictionary = dictionary  # type: ignore[attr-defined]
    return make


def make_store(
    path: Path,
    *,
    d: int = 16,
    n_contexts: int = 64,
    seq_len: int = 16,
    chunk_rows: int = 64,
    shard_chunks: int = 4,
    sites: tuple[str, ...] = (SITE,),
    dtype: str = "bfloat16",
    codec: str = "blosc-zstd",
    data: Callable | None = None,
    model: str = "synthetic",
    done: bool = True,
    poison: dict[int, float] | None = None,
    tokens: Callable[[np.ndarray], np.ndarray] | None = None,
    shuffle_buffer: int = 0,
) -> Path:
    """A finalized store of `n_contexts` × `seq_len` rows; `poison` {planned row: value} plants bad values;
    `tokens(rows)` gives the token id array of store rows `rows` (default: all 0)."""
    data = data or sparse_data(d)
    meta = {
        "model": {"id": model, "revision": None, "dtype": "float32"},
        "corpus": {"id": "synthetic"},
        "seq_len": seq_len,
        "n_contexts_max": n_contexts,
        "sites": list(sites),
        "d_model": d,
        "dtype": dtype,
        "codec": codec,
        "chunk_rows": chunk_rows,
        "shard_rows": chunk_rows * shard_chunks,
        "seed": 0,
        "shuffle_buffer": shuffle_buffer,
    }
    rng = np.random.default_rng(0)
    contexts = (rng.integers(1, 100, seq_len).astype(np.int32) for _ in range(n_contexts))
    w = init_store(path, meta, contexts)
    for s in range(w.n_shards):
        start, stop = w.shard_range(s)
        position = np.arange(start, stop) % seq_len
        acts = {}
        for k, site in enumerate(sites):
            x = data(stop - start, position, s * 7 + k)
            for row, value in (poison or {}).items():
                if start <= row < stop:
                    x[row - start, 0] = value
            acts[site] = x
        ids = np.zeros(stop - start, dtype=np.int32) if tokens is None else tokens(np.arange(start, stop))
        w.write_shard(s, acts, ids.astype(np.int32))
        if not done and s == 0:
            return path
    finalize(path)
    return path
