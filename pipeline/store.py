"""The activation store, format version 1: the only module that knows how a store is laid out on disk.

```
run.zarr/                     Zarr v3 group; attrs["sae_store"]: format version, model, corpus, seq_len, sites,
                              d_model, storage dtype, chunk_rows, shard_rows, codec, seed, tool version
  activations/<site>          (n_rows, d_model); bfloat16 kept as uint16 bits (attr logical_dtype), or
                              float16/float32; chunks (chunk_rows, d), one shard file per shard_rows rows
  tokens    (n_rows,) int32   token id at the row
  context   (n_rows,) int64   packed context the row came from
  position  (n_rows,) int32   position inside that context
  input_ids (n_contexts, seq_len) int32
                              the packed contexts themselves, written by init, so array tasks need not
                              re-read the corpus and rows map back to text
  plan.json                   written last by init: the fingerprint of the settings, row and shard counts
  markers/shard-NNNNN.json    one per finished shard, written atomically after its data: checksums, statistics
  manifest.json               written by finalize: shard list with checksums, per-site statistics: mean,
                              mean norm and variance over all and non-BOS rows; the non-BOS norm distribution
                              and massive rows (`norms`, see sae.rowtypes)
```
Rows are numbered context-major (row = context·seq_len + position) and shard s owns rows
[s·shard_rows, (s+1)·shard_rows); inside a shard they are stored in a seeded permutation. Shards are written
whole (partial-shard writes from two processes corrupt data), and a reader trusts the manifest, never the mere
presence of chunk files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numcodecs.blosc
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from . import __version__, atomic, rowtypes
from .errors import SaeError
from .interrupt import RERUN

FORMAT_VERSION = 1
META_ARRAYS = ("tokens", "context", "position")
_META_DTYPES = {"tokens": "int32", "context": "int64", "position": "int32"}
_STORAGE = {"bfloat16": np.dtype("uint16"), "float16": np.dtype("float16"), "float32": np.dtype("float32")}
_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Settings that decide a store's content; a rerun must match them all to resume.
FINGERPRINT_KEYS = (
    "model", "corpus", "seq_len", "n_contexts_max", "sites", "d_model", "dtype", "codec", "chunk_rows",
    "shard_rows", "seed", "shuffle_buffer",
)  # fmt: skip


class SiteStats(NamedTuple):
    """Whole-store statistics of one site, from the manifest."""

    mean: torch.Tensor
    """Mean activation vector [d_model], float32."""
    mean_norm: float
    """Mean L2 norm of the rows."""
    variance: float
    """Total variance: mean squared distance of a row from the mean vector."""
    n_rows: int
    """Rows the statistics cover."""


class ChunkMeta(NamedTuple):
    """Where the rows of one chunk came from."""

    tokens: np.ndarray
    """Token id at each row."""
    context: np.ndarray
    """Index of the packed context (row of `input_ids`) each row came from."""
    position: np.ndarray
    """Position of each row inside its context (0 is BOS)."""


def default_chunk_rows(d_model: int) -> int:
    """Largest power of two with at most 5 Mi values per chunk: 8192 rows at d=576, 4096 at d=768."""
    return 1 << max(0, int(np.floor(np.log2(5 * 2**20 / d_model))))


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Activations (any float dtype, any device) → numpy in the store's storage dtype."""
    x = x.detach().to(_TORCH[dtype]).cpu()
    if dtype == "bfloat16":
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy rows → torch tensor in the logical dtype (bf16 bits reinterpreted, no copy)."""
    t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16) if dtype == "bfloat16" else a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _codec(codec: str, itemsize: int) -> list:
    if codec == "none":
        return []
    if codec == "blosc-zstd":
        # zstd level 1 + byte shuffle: higher levels and bitshuffle cost far more time than they save space
        # (ratios and speeds in docs/design.md, "The store", and docs/benchmarks.md).
        return [BloscCodec(typesize=itemsize, cname="zstd", clevel=1, shuffle="shuffle", blocksize=1 << 20)]
    raise SaeError(f"unknown codec {codec!r}; use blosc-zstd or none")


def _site_key(site: str) -> str:
    return f"activations/{site}"


def checksum(a: np.ndarray) -> str:
    """The checksum a marker and the manifest record for one shard of an array (stored dtype and order)."""
    # hashlib reads the array's buffer in place: no copy of a shard's tens of MB.
    return hashlib.sha256(np.ascontiguousarray(a)).hexdigest()


def _as_float64(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows → their float64 values, exactly (bfloat16 bits are the top half of a float32)."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return stored.astype(np.float64)


_STATS_BLOCK = 1024
"""Rows `_accumulate` converts to float64 at once."""


def _accumulate(
    stored: np.ndarray, dtype: str, keep: np.ndarray, *, norms: bool = False, extremes: bool = False
) -> dict[str, Any]:
    """Sums for the mean vector, mean norm and variance of the stored rows where `keep`, in float64 (with
    `norms`, also the rows' norms under key "norms", an array the caller removes before writing JSON; with
    `extremes`, the largest value of each dimension, NaNs ignored, under "max" and the count of NaN/Inf values
    under "nonfinite").

    numpy on one thread, on purpose: this runs in the shard writer beside the forward, where torch ops would start
    a second OpenMP team that fights the forward's threads for the cores; and small blocks keep the float64 copy
    small enough for malloc to reuse (a whole shard's copy was fresh pages to fault in every shard). See the
    Profile section of docs/benchmarks.md. Every caller uses the same blocks, so every caller's sums of the same
    rows are the same to the last bit."""
    total = np.zeros(stored.shape[1], dtype=np.float64)
    top = np.full(stored.shape[1], -np.inf)
    sum_norm = sum_sq = 0.0
    n = nonfinite = 0
    row_norms = []
    for i in range(0, stored.shape[0], _STATS_BLOCK):
        xb = _as_float64(stored[i : i + _STATS_BLOCK][keep[i : i + _STATS_BLOCK]], dtype)
        sq = np.einsum("ij,ij->i", xb, xb)
        nb = np.sqrt(sq)
        total += xb.sum(0)
        sum_norm += float(nb.sum())
        sum_sq += float(sq.sum())
        n += xb.shape[0]
        if norms:
            row_norms.append(nb)
        if extremes:
            top = np.fmax(top, np.fmax.reduce(xb, axis=0, initial=-np.inf))
            nonfinite += int((~np.isfinite(xb)).sum())
    out: dict[str, Any] = {"n": n, "sum": total.tolist(), "sum_norm": sum_norm, "sum_sq": sum_sq}
    if norms:
        out["norms"] = np.concatenate(row_norms) if row_norms else np.zeros(0)
    if extremes:
        out.update(max=top, nonfinite=nonfinite)
    return out


def _norm_part(
    stored: np.ndarray,
    dtype: str,
    keep: np.ndarray,
    norms: np.ndarray,
    sums: dict[str, Any],
    position: np.ndarray,
    tokens: np.ndarray,
) -> dict[str, Any]:
    """The norm statistics of one shard's rows where `keep` (`sae.rowtypes.shard_norms`): `norms` and `sums` from
    `_accumulate` over the same rows. The candidate massive rows' dot products with the shard mean are computed
    here, from those few rows only."""
    cand = rowtypes.candidate_rows(norms)
    idx = np.flatnonzero(keep)[cand]
    mean = np.asarray(sums["sum"]) / max(sums["n"], 1)
    dots = _as_float64(stored[idx], dtype) @ mean if idx.size else np.zeros(0)
    return rowtypes.shard_norms(norms, dots, position[keep], tokens[keep], cand)


def shard_stats(
    stored: np.ndarray, dtype: str, position: np.ndarray, tokens: np.ndarray, *, extremes: bool = False
) -> dict[str, Any]:
    """One site's statistics over the rows of one shard, as its marker records them: the sums (`_accumulate`) over
    all rows ("all") and over non-BOS rows ("no_bos"), and the norm part of the non-BOS rows ("norms"). The shard
    writer and `sae stats` both call this; `site_stats` adds up the shards. `extremes`: see `_accumulate` (not
    kept in markers)."""
    bos = position == 0
    no_bos = _accumulate(stored, dtype, ~bos, norms=True, extremes=extremes)
    norms = no_bos.pop("norms")
    everything = _merge(no_bos, _accumulate(stored, dtype, bos, extremes=extremes))
    part = _norm_part(stored, dtype, ~bos, norms, no_bos, position, tokens)
    return {"all": everything, "no_bos": no_bos, "norms": part}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The sums of two disjoint sets of rows added up (a shard's non-BOS and BOS rows; two shards)."""
    total = (np.asarray(a["sum"]) + np.asarray(b["sum"])).tolist()
    out = {"n": a["n"] + b["n"], "sum": total, **{k: a[k] + b[k] for k in ("sum_norm", "sum_sq")}}
    if "max" in a:
        out.update(max=np.fmax(a["max"], b["max"]), nonfinite=a["nonfinite"] + b["nonfinite"])
    return out


def site_stats(
    parts: list[dict[str, Any]], factor: float, counts: Callable[[list[int]], dict[int, int]]
) -> dict[str, Any]:
    """One site's statistics over the whole store from its shards' `shard_stats`, as manifest.json records them:
    for "all" and "no_bos" rows n_rows, mean, mean_norm and variance (and max and nonfinite when the parts have
    them); "norms", the norm distribution and massive rows (norm > `factor` × the median) of `sae.rowtypes.summarise`,
    JSON-ready, with the non-BOS occurrences of the top massive token ids from `counts(ids) -> {id: count}`, when
    every part has a norm part (markers written before norm statistics existed have none)."""
    out: dict[str, Any] = {}
    for rows in ("all", "no_bos"):
        # One shard at a time, in shard order: finalize and `sae stats` get the same numbers to the last bit.
        t = parts[0][rows]
        for p in parts[1:]:
            t = _merge(t, p[rows])
        n = max(t["n"], 1)
        mean = np.asarray(t["sum"]) / n
        out[rows] = {
            "n_rows": t["n"],
            "mean": mean.tolist(),
            "mean_norm": t["sum_norm"] / n,
            "variance": max(t["sum_sq"] / n - float(mean @ mean), 0.0),
        }
        if "max" in t:
            out[rows].update(max=t["max"], nonfinite=t["nonfinite"])
    if all("norms" in p for p in parts):
        norm_parts, nb = [p["norms"] for p in parts], out["no_bos"]
        median = rowtypes.quantile(rowtypes.merge_histograms([p["hist"] for p in norm_parts]), 0.5)
        ids = rowtypes.top_token_ids(norm_parts, median, factor)
        summary = rowtypes.summarise(
            norm_parts,
            np.asarray(nb["mean"]),
            nb["variance"] * nb["n_rows"],
            factor=factor,
            token_totals=counts(ids) if ids else {},
        )
        out["norms"] = _nan_to_none(summary)
    return out


class Store:
    """Read access to a store. `Store.open` needs a finalized store (one with manifest.json)."""

    def __init__(self, path: Path, group: zarr.Group, meta: dict[str, Any], manifest: dict[str, Any] | None):
        self.path = path
        self.group = group
        self.attrs = meta
        self.manifest = manifest
        self.sites: list[str] = list(meta["sites"])
        self.d_model: int = int(meta["d_model"])
        self.seq_len: int = int(meta["seq_len"])
        self.dtype: str = meta["dtype"]
        self.chunk_rows: int = int(meta["chunk_rows"])
        self.shard_rows: int = int(meta["shard_rows"])
        plan = _read_json(path / "plan.json") or {}
        self.n_rows: int = int((manifest or plan).get("n_rows", 0))
        self.n_contexts: int = int((manifest or plan).get("n_contexts", 0))
        self._arrays: dict[str, zarr.Array] = {}
        self._mapped: dict[str, MappedArray | None] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike, *, finalized: bool = True) -> Store:
        """Open the store at `path`; SaeError if it is not a store, or (with `finalized`) not finished."""
        path = Path(path)
        meta = read_attrs(path)
        manifest = _read_json(path / "manifest.json")
        if finalized and manifest is None:
            plan = _read_json(path / "plan.json")
            if plan is None:
                raise SaeError(f"store {path} was never initialised completely; rerun `sae harvest`")
            done = len(done_shards(path))
            raise SaeError(
                f"store {path} is not finished: {done} of {plan['n_shards']} shards are written and it has no "
                "manifest.json; rerun the same `sae harvest` command (or `sae harvest --finalize`)"
            )
        return cls(path, zarr.open_group(path, mode="r"), meta, manifest)

    def array(self, name: str) -> zarr.Array:
        """A store array by name: a site, `tokens`, `context`, `position` or `input_ids`."""
        if name not in self._arrays:
            key = _site_key(name) if name in self.sites else name
            if name not in self.sites and name not in (*META_ARRAYS, "input_ids"):
                raise SaeError(f"store {self.path} has no site {name!r}; its sites: {', '.join(self.sites)}")
            self._arrays[name] = self.group[key]  # type: ignore[assignment]
        return self._arrays[name]

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    @property
    def input_ids(self) -> zarr.Array:
        """The packed contexts, [n_contexts, seq_len] int32."""
        return self.array("input_ids")

    def chunk_range(self, i: int) -> tuple[int, int]:
        """Row range [start, stop) of chunk i."""
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range (store has {self.n_chunks})")
        return i * self.chunk_rows, min((i + 1) * self.chunk_rows, self.n_rows)

    def chunk_numpy(self, site: str, i: int) -> np.ndarray:
        """Chunk i of `site` as stored (uint16 bits for bfloat16). One contiguous slice: integer-array reads
        on sharded arrays are many times slower."""
        start, stop = self.chunk_range(i)
        return self.array(site)[start:stop]  # type: ignore[return-value]

    def chunk(self, site: str, i: int) -> torch.Tensor:
        """Chunk i of `site` as a CPU tensor in the logical dtype ([rows, d_model])."""
        return from_storage(self.chunk_numpy(site, i), self.dtype)

    def mapped(self, name: str) -> MappedArray | None:
        """Array `name` read straight from its memory-mapped shard files, or None when its layout is not one this
        module writes (then read it through zarr)."""
        with self._lock:
            if name not in self._mapped:
                arr = self.array(name)
                self._mapped[name] = MappedArray.open(
                    self.path / (_site_key(name) if name in self.sites else name), arr
                )
            return self._mapped[name]

    def read_chunk(self, name: str, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk i of array `name` as stored, from the memory-mapped shard file: a read-only view of the page cache
        when the array is stored raw (`--codec none`), otherwise decoded into `out` (shape [chunk_rows, ...] of the
        stored dtype) or a new array. Thread-safe; Blosc releases the GIL while it decodes."""
        m = self.mapped(name)
        if m is not None:
            return m.chunk(i, out)
        start, stop = self.chunk_range(i)
        a = np.asarray(self.array(name)[start:stop])
        if out is None:
            return a
        out[: len(a)] = a
        return out[: len(a)]

    def chunk_meta(self, i: int) -> ChunkMeta:
        """Token id, context and position of every row of chunk i."""
        start, stop = self.chunk_range(i)
        return ChunkMeta(*(self.array(n)[start:stop] for n in META_ARRAYS))  # type: ignore[arg-type]

    def complete_chunks(self) -> list[int]:
        """Chunks whose rows all lie in shards the manifest lists as complete."""
        if self.manifest is None:
            return []
        rows = sorted((s["start"], s["stop"]) for s in self.manifest["shards"])
        out = []
        for i in range(self.n_chunks):
            a, b = self.chunk_range(i)
            if any(s <= a and b <= e for s, e in rows):
                out.append(i)
        return out

    def stats(self, site: str, *, skip_bos: bool = False) -> SiteStats:
        """Manifest statistics of `site` over all rows, or over the rows at position > 0."""
        if self.manifest is None:
            raise SaeError(f"store {self.path} has no manifest yet; finish the harvest first")
        if site not in self.sites:
            raise SaeError(f"store {self.path} has no site {site!r}; its sites: {', '.join(self.sites)}")
        s = self.manifest["stats"][site]["no_bos" if skip_bos else "all"]
        return SiteStats(torch.tensor(s["mean"], dtype=torch.float32), s["mean_norm"], s["variance"], s["n_rows"])

    def norm_stats(self, site: str) -> dict[str, Any] | None:
        """The manifest's norm distribution and massive-row summary of `site` over non-BOS rows (keys of
        `sae.rowtypes.summarise`); None for a store finalized before these statistics existed."""
        if self.manifest is None or site not in self.sites:
            return None
        return self.manifest["stats"].get(site, {}).get("norms")

    def disk_bytes(self, *names: str) -> int:
        """Bytes the store takes on disk; with `names` (sites or other arrays), only those arrays'."""
        roots = [self.path / (_site_key(n) if n in self.sites else n) for n in names] or [self.path]
        return sum(f.stat().st_size for root in roots for f in root.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------------
# Reading chunks straight from the shard files (zarr v3 `sharding_indexed`), memory-mapped.

_EMPTY = 2**64 - 1  # offset and length of a chunk the shard does not hold (all fill value)
_MAX_MAPS = 256  # open shard maps per array; each holds a file descriptor


class MappedArray:
    """One sharded array of a store read straight from its shard files, mapped into memory.

    Each shard file ends with the zarr v3 shard index: (offset, nbytes) as little-endian uint64 per chunk, in C
    order of the chunks inside the shard, then a crc32c of those bytes. Raw chunks (`--codec none`) are served as
    zero-copy views of the mapped file; Blosc chunks are decoded from the mapped bytes into the caller's buffer.
    The mapping is private and never written, so every process on a node reads the same page-cache pages.
    """

    def __init__(self, root: Path, arr: zarr.Array, blosc: bool, checksum: bool):
        self.root, self.blosc, self.checksum = root, blosc, checksum
        self.shape: tuple[int, ...] = tuple(arr.shape)
        self.chunk_shape: tuple[int, ...] = tuple(arr.chunks)
        self.dtype = np.dtype(arr.dtype).newbyteorder("<")
        self.per_shard = arr.shards[0] // arr.chunks[0]  # type: ignore[index]
        self.fill = arr.fill_value
        self._key = arr.metadata.encode_chunk_key  # type: ignore[union-attr]
        self._ndim = arr.ndim
        self._maps: OrderedDict[int, tuple[mmap.mmap, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: Path, arr: zarr.Array) -> MappedArray | None:
        """A MappedArray for `arr` at `root`, or None when its codecs are not the ones this module writes."""
        meta = arr.metadata.to_dict()
        codecs = meta.get("codecs") or []
        if meta.get("zarr_format") != 3 or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return None
        cfg = codecs[0]["configuration"]
        inner = [c["name"] for c in cfg["codecs"]]
        index = [c["name"] for c in cfg["index_codecs"]]
        little = all((c.get("configuration") or {}).get("endian", "little") == "little" for c in cfg["codecs"])
        if (
            inner not in (["bytes"], ["bytes", "blosc"])
            or index not in (["bytes"], ["bytes", "crc32c"])
            or cfg.get("index_location", "end") != "end"
            or not little
            or any(s % c for s, c in zip(arr.shards, arr.chunks, strict=True))  # type: ignore[arg-type]
            or any(c != s for c, s in zip(arr.chunks[1:], arr.shape[1:], strict=True))
        ):
            return None
        return cls(root, arr, blosc=inner == ["bytes", "blosc"], checksum=index[-1] == "crc32c")

    @property
    def raw(self) -> bool:
        """Whether chunks are stored uncompressed (served as views)."""
        return not self.blosc

    def chunk(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk i, trimmed to the array's rows: a read-only view of the mapped file (raw), or decoded into `out`
        (Blosc; `out` holds a whole chunk) or a new array."""
        rows = min(self.chunk_shape[0], self.shape[0] - i * self.chunk_shape[0])
        if rows <= 0:
            raise IndexError(f"chunk {i} out of range")
        m, index = self._map(i // self.per_shard)
        offset, nbytes = (int(v) for v in index[i % self.per_shard])
        full = self.chunk_shape
        if offset == _EMPTY:  # never written: all fill value, as zarr reads it
            a = np.empty(full, self.dtype) if out is None else out
            a[...] = self.fill
            return a[:rows]
        if not self.blosc:
            if nbytes != int(np.prod(full)) * self.dtype.itemsize:
                raise SaeError(f"{self.root}: chunk {i} holds {nbytes} bytes, not one raw chunk")
            view = np.frombuffer(m, self.dtype, count=int(np.prod(full)), offset=offset).reshape(full)
            return view[:rows]
        a = np.empty(full, self.dtype) if out is None else out
        numcodecs.blosc.decompress(memoryview(m)[offset : offset + nbytes], a)
        return a[:rows]

    def _map(self, shard: int) -> tuple[mmap.mmap, np.ndarray]:
        with self._lock:
            hit = self._maps.get(shard)
            if hit is not None:
                self._maps.move_to_end(shard)
                return hit
        key = self._key((shard,) + (0,) * (self._ndim - 1))
        path = self.root / key
        with open(path, "rb") as f:
            # ACCESS_COPY: a private mapping, writable for numpy/torch (no read-only warnings) but never written.
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        size = 16 * self.per_shard + 4 * self.checksum
        if len(m) < size:
            raise SaeError(f"{path}: shard file of {len(m)} bytes is too short for its index")
        raw_index = m[len(m) - size : len(m) - 4 * self.checksum]
        if self.checksum:
            import google_crc32c  # zarr's own dependency for this codec

            if np.uint32(google_crc32c.value(raw_index)).tobytes() != m[len(m) - 4 :]:
                raise SaeError(f"{path}: the shard index fails its checksum; the file is damaged")
        index = np.frombuffer(raw_index, "<u8").reshape(self.per_shard, 2)
        with self._lock:
            self._maps[shard] = (m, index)
            while len(self._maps) > _MAX_MAPS:  # closed when the last view of it goes
                self._maps.popitem(last=False)
        return m, index


# --------------------------------------------------------------------------------------------------
# Writing: init (plan), whole-shard writes with markers, finalize (manifest).


def read_attrs(path: Path) -> dict[str, Any]:
    """The store attributes at `path`; SaeError when `path` is no store of ours."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaeError(f"{path} is a file, not an activation store (a folder written by `sae harvest`)")
    if not path.exists():
        raise SaeError(f"{path} is not an activation store: it does not exist")
    try:
        zj = _read_json(path / "zarr.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SaeError(f"{path} is not an activation store (its zarr.json cannot be read: {e})") from None
    if zj is None or "sae_store" not in zj.get("attributes", {}):
        raise SaeError(f"{path} is not an activation store (no zarr.json with sae_store attributes)")
    meta = zj["attributes"]["sae_store"]
    if meta.get("format_version") != FORMAT_VERSION:
        raise SaeError(
            f"store {path} has format version {meta.get('format_version')}; this tool reads {FORMAT_VERSION}"
        )
    return meta


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def done_shards(path: str | os.PathLike) -> set[int]:
    """Shards that have a marker."""
    path = Path(path)
    d = path / "markers"
    return {int(p.stem.split("-")[1]) for p in d.glob("shard-*.json")} if d.is_dir() else set()


def marker_path(path: str | os.PathLike, s: int) -> Path:
    """Where the marker of shard s lives."""
    return Path(path) / "markers" / f"shard-{s:05d}.json"


@contextlib.contextmanager
def _init_lock(path: Path) -> Iterator[None]:
    # flock is released by the kernel when its holder dies, so a killed init never leaves a stale lock.
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".init.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_fingerprint(path: Path, meta: dict[str, Any]) -> None:
    old = read_attrs(path)
    diff = [k for k in FINGERPRINT_KEYS if old.get(k) != meta.get(k)]
    if diff:
        shown = "; ".join(f"{k}: store has {old.get(k)!r}, this run {meta.get(k)!r}" for k in diff)
        raise SaeError(
            f"{path} holds a store made with different settings ({shown}). Nothing was changed; pass "
            "--overwrite to start afresh, or choose another --out"
        )


def is_store(path: str | os.PathLike) -> bool:
    """`path` is recognisably a store of ours (a folder whose zarr.json has sae_store attributes), finished or not."""
    path = Path(path)
    try:
        zj = _read_json(path / "zarr.json") if path.is_dir() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return bool(isinstance(zj, dict) and "sae_store" in zj.get("attributes", {}))


def _is_removable(path: Path) -> bool:
    """Only an empty folder or something that is recognisably a store of ours may be deleted."""
    if not path.exists():
        return True
    if path.is_dir() and not any(p.name != ".init.lock" for p in path.iterdir()):
        return True
    return is_store(path)


def kept_on_interrupt(path: str | os.PathLike) -> tuple[str, str]:
    """What a stopped harvest or concat leaves in the store at `path` (every shard written whole has its marker)
    and how to continue: sae.interrupt's (kept, again)."""
    n = len(done_shards(path))
    return f"{n} finished shard{'s' * (n != 1)} kept in {path}", RERUN + " (finished shards are skipped)"


class StoreWriter:
    """Write access to an initialised store: which shards exist, which are done, writing one whole shard."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = read_attrs(path)
        self.plan = _read_json(path / "plan.json")
        self.group = zarr.open_group(path, mode="r+")
        self.n_rows: int = self.plan["n_rows"]
        self.n_shards: int = self.plan["n_shards"]
        self.shard_rows: int = self.meta["shard_rows"]
        self.seq_len: int = self.meta["seq_len"]

    def shard_range(self, s: int) -> tuple[int, int]:
        """Rows [start, stop) owned by shard s."""
        return s * self.shard_rows, min((s + 1) * self.shard_rows, self.n_rows)

    def task_shards(self, task: int = 0, n_tasks: int = 1) -> list[int]:
        """The fixed, contiguous, shard-aligned slice of shards that array task `task` of `n_tasks` owns."""
        if not 0 <= task < n_tasks:
            raise SaeError(f"shard task {task} is not in 0..{n_tasks - 1}")
        lo, hi = task * self.n_shards // n_tasks, (task + 1) * self.n_shards // n_tasks
        return list(range(lo, hi))

    def done(self) -> set[int]:
        return done_shards(self.path)

    def shard_contexts(self, s: int) -> tuple[np.ndarray, int]:
        """The packed contexts covering shard s ([n, seq_len] int32) and the offset of the shard's first row in
        their flattened rows (shards need not start or end on a context boundary)."""
        start, stop = self.shard_range(s)
        c0, c1 = start // self.seq_len, -(-stop // self.seq_len)
        return np.asarray(self.group["input_ids"][c0:c1]), start - c0 * self.seq_len

    def permutation(self, s: int) -> np.ndarray:
        """Seeded within-shard row order: stored row j of shard s is planned row start + perm[j]."""
        start, stop = self.shard_range(s)
        return np.random.default_rng([self.meta["seed"], s]).permutation(stop - start)

    def _clear_shard(self, s: int) -> None:
        """Delete shard s's marker, then its files. zarr 3 merges every write into the existing shard file,
        reading it first: a file torn by a killed write would fail its checksum (and reading it is wasted work).
        Shards are written whole, so each write starts from nothing."""
        marker_path(self.path, s).unlink(missing_ok=True)
        for name in (*map(_site_key, self.meta["sites"]), *META_ARRAYS):
            arr = self.group[name]
            key = arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))  # the shard grid is the chunk grid
            (self.path / name / key).unlink(missing_ok=True)

    def _array(self, name: str) -> zarr.Array:
        """Array `name` for whole-shard writes. By default zarr scans every chunk to leave out those that are all
        fill value (a large share of a shard write's CPU time); such chunks are rare here, and a reader sees
        the same values whether they are written or left out."""
        return self.group[name].with_config({"write_empty_chunks": True})  # type: ignore[union-attr]

    def write_shard(self, s: int, acts: dict[str, torch.Tensor], tokens: np.ndarray) -> None:
        """Write shard s whole, then its marker. `acts[site]` and `tokens` hold the shard's rows in planned
        (context-major) order; the within-shard permutation is applied here."""
        start, stop = self.shard_range(s)
        n = stop - start
        self._clear_shard(s)
        perm = self.permutation(s)
        rows = start + perm
        meta = {
            "tokens": np.asarray(tokens, dtype=np.int32)[perm],
            "context": (rows // self.seq_len).astype(np.int64),
            "position": (rows % self.seq_len).astype(np.int32),
        }
        marker: dict[str, Any] = {"shard": s, "start": start, "stop": stop, "checksums": {}, "stats": {}}
        for site in self.meta["sites"]:
            x = acts[site]
            if x.shape != (n, self.meta["d_model"]):
                raise ValueError(f"shard {s} of {site}: got {tuple(x.shape)}, want {(n, self.meta['d_model'])}")
            # Permuted in numpy, like everything in this thread (see _accumulate): a single-threaded copy.
            stored = to_storage(x, self.meta["dtype"])[perm]
            self._array(_site_key(site))[start:stop] = stored
            marker["checksums"][site] = checksum(stored)
            marker["stats"][site] = shard_stats(stored, self.meta["dtype"], meta["position"], meta["tokens"])
        for name, a in meta.items():
            self._array(name)[start:stop] = a
            marker["checksums"][name] = checksum(a)
        (self.path / "markers").mkdir(exist_ok=True)
        atomic.write_json(marker_path(self.path, s), marker)


def check_target(path: str | os.PathLike, *, overwrite: bool = False) -> bool:
    """Check, writing nothing, that `init_store(path, overwrite=overwrite)` may go ahead (so a caller can fail
    before loading a model); True when a planned store lies there to be resumed. SaeError for a file, or for a
    folder that is not a store of ours."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaeError(f"{path} exists and is not a folder; choose another --out")
    if overwrite:
        if not _is_removable(path):
            raise SaeError(f"{path} is not an activation store; refusing to delete it even with --overwrite")
        return False
    if (path / "plan.json").exists():
        return True
    if not _is_removable(path):
        raise SaeError(f"{path} exists and is not an activation store; choose another --out")
    return False


def init_store(
    path: str | os.PathLike, meta: dict[str, Any], contexts: Iterable[np.ndarray], *, overwrite: bool = False
) -> StoreWriter:
    """Create the store at `path` (or reopen it to resume) and return a writer.

    `meta` holds the attributes (FINGERPRINT_KEYS among them); `contexts` yields the packed [seq_len] token
    rows and is only consumed when the store is new. An existing store with other settings is refused and
    left untouched; `overwrite` deletes it first. Safe to call from many array tasks at once: one of them
    initialises under a lock, the others wait and reuse its plan.
    """
    path = Path(path)
    meta = {"format_version": FORMAT_VERSION, **meta, "tool_version": __version__}
    resume = check_target(path, overwrite=overwrite)
    if overwrite:
        shutil.rmtree(path, ignore_errors=True)
    if resume:
        _check_fingerprint(path, meta)
        return StoreWriter(path)
    created = not path.exists()
    with _init_lock(path):
        if (path / "plan.json").exists():  # another task finished init while we waited
            _check_fingerprint(path, meta)
            return StoreWriter(path)
        zj = _read_json(path / "zarr.json")
        if zj is not None:
            # A previous init was killed before writing its plan; nothing in it is finished work.
            _check_fingerprint(path, meta)
            _clear_init(path)
        try:
            _create(path, meta, contexts)
        except BaseException:
            # A failed init (an empty corpus, a bad context) leaves no half-made store behind for the next
            # run to trip over (nor an empty folder, when this call made it).
            _clear_init(path)
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
    return StoreWriter(path)


def _clear_init(path: Path) -> None:
    """Delete an unfinished init, keeping the lock file (held by the caller). zarr.json goes last, so a
    concurrent task looking in (outside the lock) always sees a store of ours, never a foreign folder."""
    for p in sorted(path.iterdir(), key=lambda p: p.name == "zarr.json"):
        if p.name != ".init.lock":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _create(path: Path, meta: dict[str, Any], contexts: Iterable[np.ndarray]) -> None:
    seq_len, d = meta["seq_len"], meta["d_model"]
    chunk_rows, shard_rows = meta["chunk_rows"], meta["shard_rows"]
    if shard_rows % chunk_rows:
        raise SaeError(f"shard_rows ({shard_rows}) must be a multiple of chunk_rows ({chunk_rows})")
    # Not open_group(mode="w"): that deletes the whole folder, the init lock file of the other tasks included.
    group = zarr.create_group(store=str(path), attributes={"sae_store": meta}, overwrite=False)
    ctx_chunk = max(1, (1 << 20) // (4 * seq_len))
    ids = group.create_array(
        "input_ids",
        shape=(0, seq_len),
        chunks=(ctx_chunk, seq_len),
        dtype="int32",
        compressors=_codec("blosc-zstd", 4),
    )
    buf: list[np.ndarray] = []
    n = 0

    def flush() -> None:
        nonlocal n
        block = np.stack(buf).astype(np.int32)
        ids.resize((n + len(block), seq_len))
        ids[n : n + len(block)] = block
        n += len(block)
        buf.clear()

    cap = meta.get("n_contexts_max")
    for row in contexts:
        if len(row) != seq_len:
            raise ValueError(f"context of length {len(row)}, expected {seq_len}")
        buf.append(row)
        if len(buf) == ctx_chunk:
            flush()
        if cap is not None and n + len(buf) >= cap:
            break
    if buf:
        flush()
    if n == 0:
        raise SaeError("the corpus gave no context: it is empty or shorter than one --seq-len context")
    n_rows = n * seq_len
    storage = _STORAGE[meta["dtype"]]
    for site in meta["sites"]:
        group.create_array(
            _site_key(site), shape=(n_rows, d), chunks=(chunk_rows, d), shards=(shard_rows, d),
            dtype=storage, compressors=_codec(meta["codec"], storage.itemsize), fill_value=0,
            attributes={"logical_dtype": meta["dtype"]},
        )  # fmt: skip
    for name in META_ARRAYS:
        group.create_array(
            name, shape=(n_rows,), chunks=(chunk_rows,), shards=(shard_rows,), dtype=_META_DTYPES[name],
            compressors=_codec("blosc-zstd", np.dtype(_META_DTYPES[name]).itemsize), fill_value=0,
        )  # fmt: skip
    plan = {
        "n_contexts": n,
        "n_rows": n_rows,
        "n_shards": -(-n_rows // shard_rows),
        "fingerprint": {k: meta.get(k) for k in FINGERPRINT_KEYS},
    }
    atomic.write_json(path / "plan.json", plan)


def finalize(path: str | os.PathLike) -> Store:
    """Check every shard's marker against the plan and write manifest.json; SaeError listing what is missing."""
    path = Path(path)
    read_attrs(path)
    plan = _read_json(path / "plan.json")
    if plan is None:
        raise SaeError(f"store {path} has no plan.json: its init step never finished; rerun `sae harvest`")
    writer = StoreWriter(path)
    missing = [s for s in range(plan["n_shards"]) if s not in writer.done()]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise SaeError(
            f"store {path}: {len(missing)} of {plan['n_shards']} shards are not finished (shards {shown}); "
            "rerun their harvest tasks, then finalize again"
        )
    shards, parts = [], {}
    for s in range(plan["n_shards"]):
        m = _read_json(marker_path(path, s))
        if (m["start"], m["stop"]) != writer.shard_range(s):
            raise SaeError(f"store {path}: marker of shard {s} covers rows {m['start']}..{m['stop']}, not the plan's")
        shards.append({"index": s, "start": m["start"], "stop": m["stop"], "checksums": m["checksums"]})
        for site, part in m["stats"].items():
            parts.setdefault(site, []).append(part)
    factor = float(read_attrs(path).get("massive_factor") or rowtypes.DEFAULT_MASSIVE_FACTOR)
    stats = {site: site_stats(p, factor, lambda ids: token_counts(path, ids)) for site, p in parts.items()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "n_rows": plan["n_rows"],
        "n_contexts": plan["n_contexts"],
        "shards": shards,
        "stats": stats,
    }
    atomic.write_json(path / "manifest.json", manifest)
    return Store.open(path)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def token_counts(path: str | os.PathLike, ids: list[int]) -> dict[int, int]:
    """Occurrences of token `ids` at non-BOS rows of the store at `path` (reads `tokens` and `position` shard by
    shard: 8 bytes a row, against the activations' kilobytes)."""
    group = zarr.open_group(Path(path), mode="r")
    tok, pos = group["tokens"], group["position"]
    step = int(tok.shards[0]) if getattr(tok, "shards", None) else int(tok.chunks[0])
    wanted = np.asarray(sorted(ids), dtype=np.int64)
    total = np.zeros(len(wanted), dtype=np.int64)
    for a in range(0, tok.shape[0], step):
        t = np.asarray(tok[a : a + step])[np.asarray(pos[a : a + step]) != 0]
        i = np.searchsorted(wanted, t)
        hit = (i < len(wanted)) & (wanted[np.minimum(i, len(wanted) - 1)] == t)
        total += np.bincount(i[hit], minlength=len(wanted))
    return dict(zip(wanted.tolist(), total.tolist(), strict=True))


# --------------------------------------------------------------------------------------------------
# Public access to the format's parts, for whole-store tools (sae.storetools: stats, validate, concat).


def read_plan(path: str | os.PathLike) -> dict[str, Any] | None:
    """plan.json of the store at `path` (None before init finished)."""
    return _read_json(Path(path) / "plan.json")


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """manifest.json of the store at `path` (None before finalize)."""
    return _read_json(Path(path) / "manifest.json")


def read_marker(path: str | os.PathLike, s: int) -> dict[str, Any] | None:
    """The marker of shard s (None when the shard is not finished)."""
    return _read_json(marker_path(Path(path), s))
