"""The shuffled chunk reader: one site of a store (or several, row-aligned) as an endless, seeded stream of
training batches.

A *lane* is a seeded stream over a fixed set of training chunks. Each of its epochs permutes its chunk ids and
cuts them into groups of H chunks (half the buffer). Phase j of an epoch draws rows from the buffer G[j-1] ∪ G[j]:
a seeded half of G[j]'s rows and the half of G[j-1]'s rows that phase j-1 left, in one seeded permutation. So
the buffer holds 2H ≥ 32 chunks, half of it is refilled (with the next group) each time half is consumed, and
every row of the lane is drawn exactly once per epoch of the lane.

A global batch of B rows is the concatenation of B/L rows from each of L lanes; the training chunks are dealt to
the lanes once, by a seeded permutation. One lane (the default in one process) is the plain stream over all
chunks. Under torchrun the run has as many lanes as ranks, so rank r reads only lane r's chunks — disjoint reads —
and the N ranks' global batch is exactly that of one process reading all N lanes (`lanes=N`). A process given a
rank and a world size reads just the lanes its slice of the global batch needs: with a different number of ranks
than lanes (a resumed run) the global batches stay the same, whoever reads them.

Every permutation is drawn from `numpy.random.default_rng([seed, epoch, group, tag(, L, lane)])`: the stream is
a pure function of the seed and L, whatever the threads' timing, and the whole state is each lane's (epoch,
phase, offset) — a restored reader re-reads the two groups of each lane's phase and continues with the very same
rows.

Reading (see "Reader" in docs/benchmarks.md for the measurements behind it). The store module maps each shard
file into memory and finds chunks through its zarr v3 shard index: raw chunks (`--codec none`) are zero-copy views
of the page cache, which every rank on a node shares; Blosc chunks are decoded from the mapped bytes into recycled
buffers. A pool of `threads` workers does the heavy work in numpy and Blosc, with the GIL released: reading chunks
(decoding, dropping BOS rows, rejecting non-finite rows) and gathering each batch's rows straight from the chunks
(no phase buffer between the chunks and the batch). A gather runs before any chunk read, so prepared batches stay
ahead of the trainer while the next group is read. A lane's assembler thread only plans: which chunks to read and
the permutations that say which row goes where. On CPU the workers deliver float32 batches. For a GPU the chunks
go whole to an arena on the device instead (decoded, or copied if raw, into pinned staging, then copied
non_blocking on a side stream), and a copy thread gathers each batch there, two batches ahead of the step, where
it becomes float32: the host's cores only decode or copy sequentially.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

import numpy as np
import torch

from sae.errors import SaeError
from sae.store import Store

STATE_VERSION = 2
MIN_BUFFER_CHUNKS = 32
AHEAD = 4  # batches each lane prepares ahead of the trainer
ARENA_GROUPS = 4  # groups of a lane the arena holds: the most that are alive at once
_SPLIT, _PHASE, _ORDER, _LANES = 0, 1, 2, 3  # RNG stream tags
_GATHER, _READ = 0, 1  # worker job priorities: a batch gather runs before a chunk read
_NONE = np.zeros(0, np.int64)
_CHECK_BLOCK = 1024  # rows per block of the non-finite scan (a block stays in cache)
# The stored bits of each dtype: the unsigned view, the exponent mask (all ones = Inf/NaN), the magnitude mask.
_BITS = {
    "bfloat16": (np.uint16, 0x7F80, 0x7FFF),
    "float16": (np.uint16, 0x7C00, 0x7FFF),
    "float32": (np.uint32, 0x7F800000, 0x7FFFFFFF),
}


class Batch(NamedTuple):
    """One batch of training rows."""

    x: torch.Tensor
    """Activations [B, d_model] (several sites: [B, d_model · n_sites], in the reader's site order), float32 on the
    reader's device, in raw (unscaled) units."""
    rows: torch.Tensor
    """Store row index (chunk start + offset) of each row, int64 on CPU."""


class Rows(NamedTuple):
    """Rows of one or more chunks as read from the store."""

    x: torch.Tensor
    """Activations [n, d_model] in the store's logical dtype, on CPU (with `read_rows(whole=True)`: every row of
    the chunk, including those `rows` leaves out)."""
    rows: torch.Tensor
    """Store row index of each row, int64 [n] (with `whole=True`: of the kept rows only; row r is x[r - start])."""


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def held_out_chunks(complete: list[int], n: int) -> list[int]:
    """`n` chunks spread evenly over the complete ones, independent of the seed (runs with different seeds
    share a validation set); the store's rows are shuffled within shards, so any chunk is a fair sample."""
    if n <= 0:
        return []
    if n >= len(complete):
        raise SaeError(
            f"--val-chunks {n} leaves no training data: the store has {len(complete)} complete chunk(s); "
            f"use at most {len(complete) - 1}"
        )
    return [complete[(2 * i + 1) * len(complete) // (2 * n)] for i in range(n)]


def _bits(x: torch.Tensor) -> np.ndarray:
    """The raw bits of a float tensor as an unsigned numpy view (no copy)."""
    if x.element_size() == 2:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.view(torch.int32).numpy().view(np.uint32)


def _nonfinite_rows(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Rows holding a NaN or an Inf (all exponent bits set): integer ops on the stored bits, block by block, in
    numpy on the calling thread with the GIL released (torch's isfinite on bf16 is ~30x slower, and torch ops here
    would start a second OpenMP team beside the trainer's)."""
    _, exp, mag = _BITS[dtype]
    tmp = np.empty((min(_CHECK_BLOCK, len(bits)), bits.shape[1]), bits.dtype)
    bad = []
    for lo in range(0, len(bits), _CHECK_BLOCK):
        t = tmp[: len(bits) - lo] if len(bits) - lo < len(tmp) else tmp
        np.bitwise_and(bits[lo : lo + len(t)], mag, out=t)
        if t.max() >= exp:  # (rare: the per-row maxima only then, a reduction several times slower than this one)
            bad.append(np.flatnonzero(t.max(axis=1) >= exp) + lo)
    return np.concatenate(bad) if bad else _NONE


def read_rows(
    store: Store,
    site: str | Sequence[str],
    i: int,
    *,
    keep_bos: bool,
    whole: bool = False,
    out: np.ndarray | None = None,
    check: bool = True,
) -> Rows:
    """Chunk i of `site` with BOS rows dropped (unless `keep_bos`); SaeError naming the store row of any
    non-finite value among the kept rows (unless `check` is False: a chunk already checked).

    With `whole`, nothing is copied: `x` is the whole chunk (a view of the mapped shard file for a raw store, or
    `out`, a [chunk_rows, d_model] buffer of the stored dtype, for a compressed one) and `rows` names the kept
    rows.

    Several sites (a transcoder's input and target, written by one forward at the same rows): their chunks side
    by side, [rows, d_model · n_sites], in `out` ([chunk_rows, d_model · n_sites]) when given."""
    start, _ = store.chunk_range(i)
    sites = [site] if isinstance(site, str) else list(site)
    site = " + ".join(sites)
    try:
        if len(sites) == 1:
            a = store.read_chunk(sites[0], i, out)
        else:
            parts = [store.read_chunk(s, i) for s in sites]
            a = np.concatenate(parts, axis=1, out=None if out is None else out[: len(parts[0])])
        x = _logical(a, store.dtype)
        if keep_bos:
            local = np.arange(len(a))
        else:
            local = np.flatnonzero(store.read_chunk("position", i)[: len(a)] != 0)
        flagged = _nonfinite_rows(_bits(x), store.dtype) if check else _NONE
    except SaeError:
        raise
    except Exception as e:
        raise SaeError(f"store {store.path}: could not read chunk {i} of {site}: {e}") from e
    bad = flagged[np.isin(flagged, local)] if len(flagged) else flagged
    if len(bad):
        shown = ", ".join(str(start + int(r)) for r in bad[:10])
        raise SaeError(
            f"store {store.path}, site {site}: {len(bad)} row(s) of chunk {i} hold NaN or Inf "
            f"(store rows {shown}{' ...' if len(bad) > 10 else ''}); refusing to train on them. "
            "Re-harvest those shards (e.g. with --dtype float32 or bfloat16 if float16 overflowed)"
        )
    ids = torch.from_numpy(start + local.astype(np.int64))
    if whole:
        return Rows(x, ids)
    return Rows(x.index_select(0, torch.from_numpy(local.astype(np.int64))), ids)


def _logical(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy rows → a tensor of the logical dtype sharing their memory (bfloat16 bits reinterpreted)."""
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def default_threads() -> int:
    """Worker threads by default: this process's share of the cores it may run on (its CPU affinity, split among
    torchrun's ranks on the node), at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


class ChunkReader:
    """Seeded, resumable stream of shuffled training batches from one site of a store, plus held-out rows.

    Use as a context manager (or call `close`) so its threads stop. `state_dict()` after `next_batch()` k times
    and `ChunkReader(..., state=that)` yields exactly the batches k+1, k+2, ... of the original reader.

    `batch_size` is the global batch, drawn in equal parts from `lanes` lanes. With `world` > 1 the reader is rank
    `rank`'s: `next_batch` returns its contiguous 1/world of each global batch and reads only the lanes under it;
    `state_dict` then holds only those lanes' positions (`merge_states` joins the ranks' states).

    The buffer is `buffer_mb` of stored activations per lane, at least 32 chunks. With the next group being read,
    each lane holds up to about one and a half times that in memory (for a `--codec none` store these are views
    of the page cache, shared with the other processes reading the store; for a GPU the chunks live in an arena
    on the device, twice `buffer_mb`). `threads` workers read and gather (default: `default_threads()`);
    with `device` a GPU, batches reach it through a `CudaFeed`.
    """

    _host_float32 = True  # CPU batches become float32 in the workers (benchmarks/train.py turns it off to time
    # the host gather alone)
    _device_arena = False  # True: the GPU's path (chunks to an arena on the device, gathered there) on the CPU,
    # for the tests' check of it and the benchmarks' timing of its host work

    def __init__(
        self,
        store: Store,
        site: str | Sequence[str],
        *,
        batch_size: int,
        seed: int = 0,
        buffer_mb: float = 1024,
        val_chunks: int = 2,
        keep_bos: bool = False,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        lanes: int = 1,
        rank: int = 0,
        world: int = 1,
        state: dict[str, Any] | None = None,
    ):
        sites = [site] if isinstance(site, str) else list(site)
        if not sites:
            raise SaeError("the reader needs at least one site")
        for s in sites:
            if s not in store.sites:
                raise SaeError(f"store {store.path} has no site {s!r}; its sites: {', '.join(store.sites)}")
        if batch_size <= 0:
            raise SaeError(f"--batch-size must be positive, got {batch_size}")
        if not 0 <= rank < world:
            raise SaeError(f"rank {rank} is not one of the {world} ranks")
        self.store, self.batch_size = store, batch_size
        self.sites = sites
        """The sites read, in the order their columns appear in a batch."""
        self.site: str | list[str] = sites[0] if isinstance(site, str) else sites
        """`site` as given (a reader state records it so)."""
        self.width = store.d_model * len(sites)
        """Columns of a batch: d_model per site."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # worker threads select it by index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.wait_seconds = 0.0
        """Seconds `next_batch` has spent waiting for a batch that was not ready yet."""
        complete = store.complete_chunks()
        if not complete:
            raise SaeError(f"store {store.path} lists no complete chunk; finish the harvest first")
        if state is None:
            self.seed, self.keep_bos, self.lanes = int(seed), bool(keep_bos), int(lanes)
            self.val_chunks = held_out_chunks(complete, val_chunks)
            held = set(self.val_chunks)
            self.train_chunks = [c for c in complete if c not in held]
            chunk_mb = store.chunk_rows * self.width * _itemsize(store.dtype) / 2**20
            buffer_chunks = max(MIN_BUFFER_CHUNKS, int(buffer_mb / chunk_mb))
            self.group_chunks = max(1, buffer_chunks // 2)
            positions: list[list[int] | None] = [[0, 0, 0]] * self.lanes
        else:
            state = upgrade_state(state)
            self._check_state(state, complete)
            self.seed, self.keep_bos, self.lanes = int(state["seed"]), bool(state["keep_bos"]), int(state["lanes"])
            self.val_chunks, self.train_chunks = list(state["val_chunks"]), list(state["train_chunks"])
            self.group_chunks = int(state["group_chunks"])
            positions = state["positions"]
        if self.lanes < 1 or batch_size % self.lanes:
            raise SaeError(f"--batch-size {batch_size} must be divisible by the reader's {self.lanes} lane(s)")
        if batch_size % world:
            raise SaeError(f"--batch-size {batch_size} must be divisible by the number of ranks ({world})")
        if self.lanes > len(self.train_chunks):
            raise SaeError(
                f"{self.lanes} reader lanes need at least as many training chunks; store {store.path} has "
                f"{len(self.train_chunks)}. Use fewer lanes (--reader-lanes) or harvest more tokens"
            )
        # Open the arrays and their shard maps once here: the worker threads then only read.
        for s in sites:
            store.array(s)
            mapped = store.mapped(s)
        store.array("position")
        store.mapped("position")
        # Raw chunks of one site are zero-copy views of the map, shared with every process on the node. Other
        # chunks are decoded (or put side by side) into slots of one arena, so a batch is one gather from one
        # array; across separate chunk arrays a gather needs a second copy to put the rows in drawn order
        # (docs/benchmarks.md, "Reader profile"). Up to four groups of a lane are alive at once (two in the phase
        # being drawn, one that queued batches may still use, one being read: ARENA_GROUPS); past that a chunk
        # gets a buffer of its own.
        self._decode = len(sites) > 1 or mapped is None or not mapped.raw
        # On a GPU the chunks themselves go to the device (a worker decodes a chunk, or copies a raw one, into
        # pinned staging, and a DMA copies it whole), and each batch is one gather there: the host's cores only
        # decode or copy sequentially, several times faster than gathering rows at random. The arena then takes
        # GPU memory: ARENA_GROUPS groups, i.e. twice `buffer_mb` per lane.
        self._on_device = self.device.type == "cuda" or self._device_arena
        # The side stream of chunk uploads and batch gathers: its order keeps a slot's rewrite after the gathers
        # that read its last chunk (a slot is freed only once those are enqueued).
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._storage = np.dtype(np.uint16 if _itemsize(store.dtype) == 2 else np.float32)  # stored numpy dtype
        if store.dtype == "float16":
            self._storage = np.dtype(np.float16)
        self._arena: Any = None  # allocated at the first read (host: untouched pages cost no memory)
        self._arena_bits: Any = None  # what gathers read: the arena's bits on the host, the tensor on the device
        self._slots: list[int] = []  # free arena slots, the most recently freed last (its pages are resident)
        self._free: list[np.ndarray] = []  # overflow buffers no group uses any more
        self._checked: set[int] = set()  # chunks found free of NaN/Inf: not scanned again in later epochs
        self._free_lock = threading.Lock()
        self._pool = _Pool(max(1, threads) if threads is not None else default_threads())
        self._feed: CudaFeed | None = None
        # The lanes under this rank's rows [lo, hi) of the global batch, with the part of each lane batch it uses.
        per_lane, lo, hi = batch_size // self.lanes, rank * batch_size // world, (rank + 1) * batch_size // world
        local_lanes = sum(max(lo, i * per_lane) < min(hi, (i + 1) * per_lane) for i in range(self.lanes))
        self._slots = list(range(ARENA_GROUPS * self.group_chunks * local_lanes - 1, -1, -1))
        self._lanes: dict[int, _Lane] = {}
        self._pos: dict[int, tuple[int, int, int]] = {}
        try:
            for i in range(self.lanes):
                a, b = max(lo, i * per_lane), min(hi, (i + 1) * per_lane)
                if a >= b:
                    continue
                if positions[i] is None:
                    raise SaeError(f"the reader state has no position for lane {i}")
                key = () if self.lanes == 1 else (self.lanes, i)
                epoch, phase, offset = (int(v) for v in positions[i])
                self._pos[i] = (epoch, phase, offset)
                part = slice(a - i * per_lane, b - i * per_lane)
                self._lanes[i] = _Lane(self, self.lane_chunks(i), key, (epoch, phase, offset), per_lane, part)
            if self.device.type == "cuda":
                self._feed = CudaFeed(self._host_batch, self._to_device, self.device, self._stream)
        except BaseException:
            self.close()
            raise

    # -- public API ----------------------------------------------------------------------------------------

    @property
    def buffer_chunks(self) -> int:
        """Chunks the shuffle buffer of a lane holds (two groups)."""
        return 2 * self.group_chunks

    @property
    def train_rows(self) -> int:
        """Training rows per epoch (BOS rows excluded unless keep_bos)."""
        if not hasattr(self, "_train_rows"):
            self._train_rows = self._count_train_rows()
        return self._train_rows

    def lane_chunks(self, lane: int) -> list[int]:
        """The training chunks lane `lane` reads (all of them with one lane)."""
        if self.lanes == 1:
            return list(self.train_chunks)
        deal = _rng(self.seed, self.lanes, _LANES).permutation(len(self.train_chunks))
        return sorted(self.train_chunks[i] for i in deal[lane :: self.lanes])

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch (all `batch_size` of them in one process), as float32 on the
        device."""
        t0 = time.perf_counter()
        try:
            if self._feed is not None:
                x, rows, pos = self._feed.next()
            else:
                payload, pos = self._host_batch()
                x, rows = self._to_device(payload)
                if self._host_float32:  # (a device arena on the CPU gathers in the store's dtype)
                    x = x.float()
        except BaseException:
            self.close()
            raise
        self.wait_seconds += time.perf_counter() - t0
        self._pos.update(pos)
        return Batch(x, rows)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position of the stream; pass it as `state=` to continue exactly from here. A rank's reader
        knows only its lanes' positions (None for the others): join the ranks' states with `merge_states`."""
        positions = [list(self._pos[i]) if i in self._pos else None for i in range(self.lanes)]
        return {
            "version": STATE_VERSION,
            "store": str(self.store.path),
            "site": self.site,
            "seed": self.seed,
            "keep_bos": self.keep_bos,
            "train_chunks": self.train_chunks,
            "val_chunks": self.val_chunks,
            "group_chunks": self.group_chunks,
            "lanes": self.lanes,
            "positions": positions,  # [epoch, phase, offset] of each lane
        }

    def validation_rows(self, max_rows: int | None = None) -> Rows:
        """The held-out rows (BOS handled as in training), in store order; at most `max_rows`."""
        if not self.val_chunks:
            raise SaeError("no chunks are held out for validation (--val-chunks 0)")
        parts = [read_rows(self.store, self.site, c, keep_bos=self.keep_bos) for c in self.val_chunks]
        x, rows = torch.cat([p.x for p in parts]), torch.cat([p.rows for p in parts])
        return Rows(x[:max_rows], rows[:max_rows])

    def sample(self, n: int) -> Rows:
        """About `n` training rows (float32, CPU) with their store rows, for initialisation and the input
        statistics: the first chunks of a seeded order of all training chunks (the same on every rank and for any
        number of lanes)."""
        parts, got = [], 0
        order = _rng(self.seed, 0, 0, _ORDER).permutation(len(self.train_chunks))
        for c in (self.train_chunks[i] for i in order):
            r = read_rows(self.store, self.site, c, keep_bos=self.keep_bos)
            parts.append(r)
            got += len(r.x)
            if got >= n:
                break
        return Rows(torch.cat([r.x for r in parts])[:n].float(), torch.cat([r.rows for r in parts])[:n])

    def sample_rows(self, n: int) -> torch.Tensor:
        """The activations of `sample(n)`."""
        return self.sample(n).x

    def close(self) -> None:
        """Stop the background threads and let go of the buffer (the arena, on the device or the host, goes as soon
        as no batch uses it, not at the next garbage collection: lanes and reader refer to each other)."""
        if getattr(self, "_feed", None) is not None:
            self._feed.stop()
        for lane in getattr(self, "_lanes", {}).values():
            lane.stop()
        self._pool.shutdown()
        self._feed, self._lanes = None, {}
        with self._free_lock:
            self._arena = self._arena_bits = None
            self._free.clear()

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------------

    def _host_batch(self) -> tuple[Any, dict[int, tuple[int, int, int]]]:
        """This rank's part of the next global batch as the host prepares it, and the lanes' positions after it.
        The part is (rows on the host, their store rows), or with a device arena (a GPU) the lanes' segments, which
        `_to_device` gathers there (they keep their groups, so the arena slots they read, in use until the gather is
        enqueued)."""
        if not self._lanes:  # (close() lets go of them)
            raise SaeError("the reader was closed")
        parts, pos = [], {}
        for i, lane in self._lanes.items():
            part, pos[i] = lane.next()
            parts.append(part)
        if self._on_device:
            return [s for segments in parts for s in segments], pos
        if len(parts) == 1:
            return parts[0], pos
        xs, ids = [x for x, _ in parts], [rows for _, rows in parts]
        return (torch.cat(xs), torch.cat(ids)), pos

    def _to_device(self, part: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A `_host_batch` part as rows on the device (on a GPU: called on the side stream) and their store rows."""
        return _device_gather(part) if self._on_device else part

    def _side_stream(self) -> contextlib.AbstractContextManager:
        """The context for work on the device arena: the device and the side stream (nothing on the CPU)."""
        if self._stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self._stream))
        return stack

    def _read_to_device(self, c: int, dest: torch.Tensor, **kw: Any) -> Rows:
        """`read_rows` of chunk c into this worker's staging buffer (a raw chunk, a view of the mapped file, is
        copied there), then the whole chunk copied to `dest` on the device (non_blocking on the side stream from
        pinned memory on a GPU; a numpy copy on the CPU); `x` is `dest`."""
        stage, done = _staging(self.store.chunk_rows, self.width, self.store.dtype, self._stream is not None)
        got = read_rows(self.store, self.site, c, whole=True, out=_bits(stage).view(self._storage), **kw)
        n = len(got.x)
        if got.x.data_ptr() != stage.data_ptr():  # (numpy: no second OpenMP team beside the trainer's)
            np.copyto(_bits(stage[:n]), _bits(got.x))
        self._upload(dest[:n], stage[:n], done)
        return Rows(dest[:n], got.rows)

    def _upload(self, dest: torch.Tensor, stage: torch.Tensor, done: Any) -> None:
        """Copy staged rows to the arena: a DMA on the side stream (then `done` records it), a numpy copy on the
        CPU."""
        if self._stream is None:
            np.copyto(_bits(dest), _bits(stage))
            return
        with self._side_stream():
            dest.copy_(stage, non_blocking=True)
            done.record(self._stream)

    def _buffer(self) -> tuple[Any, int]:
        """A buffer to decode one chunk into (a tensor on the device with a device arena) and its first row in the
        arena: a free arena slot, or (none free) a buffer of its own with -1; (None, -1) for raw chunks, views of
        the mapped file."""
        if not self._decode and not self._on_device:
            return None, -1
        rows = self.store.chunk_rows
        with self._free_lock:
            if self._slots:
                if self._arena is None:
                    self._arena = self._new_rows((max(self._slots) + 1) * rows)
                    self._arena_bits = self._arena if self._on_device else self._arena.view(_BITS[self.store.dtype][0])
                s = self._slots.pop()
                return self._arena[s * rows : (s + 1) * rows], s * rows
            if self._free:
                return self._free.pop(), -1
        return self._new_rows(rows), -1

    def _new_rows(self, n: int) -> Any:
        """Uninitialised rows for chunks: on the device (in the logical dtype, allocated on the side stream, which
        uses them) with a device arena, else on the host in the stored dtype."""
        if not self._on_device:
            return np.empty((n, self.width), self._storage)
        with self._side_stream():
            return torch.empty(n, self.width, dtype=getattr(torch, self.store.dtype), device=self.device)

    def _recycle(self, buffers: list[tuple[np.ndarray | None, int]]) -> None:
        with self._free_lock:
            for buf, start in buffers:
                if start >= 0:
                    self._slots.append(start // self.store.chunk_rows)
                elif buf is not None:
                    self._free.append(buf)

    def _count_train_rows(self) -> int:
        if self.keep_bos or not self.train_chunks:
            return sum(_len(self.store.chunk_range(c)) for c in self.train_chunks)
        if len(self.train_chunks) + len(self.val_chunks) == self.store.n_chunks:
            # All chunks are ours: the manifest's BOS-free count minus the held-out chunks' share.
            total = self.store.stats(self.sites[0], skip_bos=True).n_rows
            held = sum(int((np.asarray(self.store.chunk_meta(c).position) != 0).sum()) for c in self.val_chunks)
            return total - held
        return sum(int((np.asarray(self.store.chunk_meta(c).position) != 0).sum()) for c in self.train_chunks)

    def _check_state(self, state: dict[str, Any], complete: list[int]) -> None:
        if state["site"] != self.site:
            raise SaeError(f"the checkpoint read site {state['site']!r}, this run asks for {self.site!r}")
        missing = sorted((set(state["train_chunks"]) | set(state["val_chunks"])) - set(complete))
        if missing:
            raise SaeError(
                f"the checkpoint's reader used chunks {missing[:10]} that store {self.store.path} does not list as "
                "complete; is it the same store?"
            )
        if len(state["positions"]) != int(state["lanes"]):
            raise SaeError(f"the reader state has {len(state['positions'])} lane positions for {state['lanes']} lanes")


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A reader state in the current version: version 1 (one stream, before lanes) is lane 0 of one lane."""
    v = state.get("version")
    if v == 1:
        pos = [int(state["epoch"]), int(state["phase"]), int(state["offset"])]
        rest = {k: x for k, x in state.items() if k not in ("epoch", "phase", "offset", "buffer_chunks_now")}
        return {**rest, "version": STATE_VERSION, "lanes": 1, "positions": [pos]}
    if v != STATE_VERSION:
        raise SaeError(f"reader state version {v!r} is not {STATE_VERSION}")
    return state


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One reader state from the states of several ranks' readers of the same stream: each lane's position from
    whichever rank reads it (ranks that share a lane agree on it)."""
    merged = dict(states[0])
    positions: list[Any] = [None] * int(merged["lanes"])
    for st in states:
        for i, pos in enumerate(st["positions"]):
            if pos is not None:
                if positions[i] is not None and positions[i] != pos:
                    raise SaeError(f"reader lane {i}: ranks disagree on its position ({positions[i]} vs {pos})")
                positions[i] = pos
    if any(p is None for p in positions):
        missing = [i for i, p in enumerate(positions) if p is None]
        raise SaeError(f"no rank reads reader lane(s) {missing}")
    merged["positions"] = positions
    return merged


# -- the worker pool -----------------------------------------------------------------------------------------


class _Pool:
    """Worker threads that run the most urgent job first (lowest priority value), in submission order within a
    priority. concurrent.futures' pool is first-come first-served: a batch gather would wait behind the reads of
    a whole group."""

    def __init__(self, n: int):
        self._q: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"sae-read-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, priority: int, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        f: Future = Future()
        if self._closed:
            f.cancel()
        else:
            self._q.put((priority, next(self._seq), f, fn, args, kwargs))
        return f

    def _work(self) -> None:
        while True:
            _, _, f, fn, args, kwargs = self._q.get()
            if f is None:
                return
            if not f.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:
                f.set_exception(e)
            else:
                f.set_result(result)
                del result
            # drop the job's arguments now, not at the next job: a finished gather must not keep its plan's
            # groups (and their arena slots) alive while this worker waits
            del fn, args, kwargs, f

    def shutdown(self) -> None:
        """Cancel the jobs not started; wait for the running ones."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._q.put((-1, next(self._seq), None, None, (), {}))
        for t in self._threads:
            t.join()
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item[2] is not None:
                item[2].cancel()


# -- one lane ------------------------------------------------------------------------------------------------


class _Group:
    """The chunks of one group, read, and its rows in group numbering (the chunks' kept rows, in group order)."""

    __slots__ = ("chunks", "which", "local", "rows", "arena", "at", "__weakref__")

    def __init__(
        self,
        chunks: list[np.ndarray],
        which: np.ndarray,
        local: np.ndarray,
        rows: np.ndarray,
        arena: np.ndarray | None,
        starts: np.ndarray,
    ):
        self.chunks = chunks  # stored bits of each chunk, [rows, d] (with a device arena: its rows there)
        self.which = which  # chunk (index into `chunks`) of each group row
        self.local = local  # its row inside that chunk
        self.rows = rows  # its store row
        self.arena = arena  # the arena all its chunks lie in (None: some chunk has a buffer of its own)
        self.at = starts[which] + local if arena is not None else None  # each group row's arena row


class _Plan(NamedTuple):
    """Phase (epoch, phase): where each of its rows, in drawn order, comes from."""

    epoch: int
    phase: int
    sources: list[np.ndarray]  # the chunks of G[phase-1] then G[phase]
    which: np.ndarray | None  # each row's chunk (an index into `sources`); None when `at` is set
    local: np.ndarray | None  # its row in that chunk; None when `at` is set
    rows: np.ndarray
    groups: tuple[_Group, ...]  # kept alive (their buffers unrecycled) while batches are cut from the plan
    arena: np.ndarray | None  # the one array every source lies in, if there is one (then `at` is set)
    at: np.ndarray | None  # each row's row in `arena`


class _Stopped(Exception):
    pass


class _Lane:
    """One seeded stream (see the module docstring) over `chunks`: an assembler thread plans its phases and cuts
    them into batches that the workers gather, up to AHEAD batches ahead of the consumer."""

    def __init__(
        self,
        reader: ChunkReader,
        chunks: list[int],
        key: tuple[int, ...],
        position: tuple[int, int, int],
        per_lane: int,
        part: slice,
    ):
        self.r, self.chunks, self.key = reader, chunks, key
        self.per_lane, self.part = per_lane, part
        self._ready: queue.Queue = queue.Queue(maxsize=AHEAD)
        self._stop = threading.Event()
        self._reads: dict[tuple[int, int], list[tuple[Future, tuple[np.ndarray | None, int]]]] = {}
        self._group_cache: dict[int, list[list[int]]] = {}
        self._assembler = threading.Thread(target=self._assemble, args=position, name="sae-assemble", daemon=True)
        self._assembler.start()

    def next(self) -> tuple[Any, tuple[int, int, int]]:
        """This rank's part of the lane's next batch, and the lane's (epoch, phase, offset) after it. The part is
        (its rows, float32 unless `_host_float32` is off, and their store rows), or with a device arena the segments
        of plans it is cut from."""
        while True:
            try:
                item = self._ready.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stop.is_set() or not self._assembler.is_alive() and self._ready.empty():
                    raise SaeError("the reader was closed") from None
        if isinstance(item, BaseException):
            raise item
        job, pos = item
        return (job.result() if isinstance(job, Future) else job), pos

    def stop(self) -> None:
        self._stop.set()
        while True:  # unblock an assembler waiting to hand over a batch
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        self._assembler.join(timeout=10)

    # -- the seeded plan -------------------------------------------------------------------------------------

    def _rng(self, epoch: int, j: int, tag: int) -> np.random.Generator:
        return _rng(self.r.seed, epoch, j, tag, *self.key)

    def _groups(self, epoch: int) -> list[list[int]]:
        if epoch not in self._group_cache:
            order = [self.chunks[i] for i in self._rng(epoch, 0, _ORDER).permutation(len(self.chunks))]
            h = self.r.group_chunks
            self._group_cache = {e: g for e, g in self._group_cache.items() if e >= epoch - 1}
            self._group_cache[epoch] = [order[i : i + h] for i in range(0, len(order), h)]
        return self._group_cache[epoch]

    def _advance(self, epoch: int, phase: int) -> tuple[int, int]:
        # An epoch of n groups has n + 1 phases; the last one drains the final group's second half.
        return (epoch + 1, 0) if phase >= len(self._groups(epoch)) else (epoch, phase + 1)

    def _request(self, epoch: int, j: int) -> None:
        """Start reading group j of `epoch` (if there is one and it is not being read)."""
        if (epoch, j) in self._reads:
            return
        gs = self._groups(epoch)
        r = self.r
        reads = []
        for c in gs[j] if j < len(gs) else []:
            buf, start = r._buffer()
            kw = {"keep_bos": r.keep_bos, "check": c not in r._checked}
            if r._on_device:
                job = r._pool.submit(_READ, r._read_to_device, c, buf, **kw)
            else:  # (`read_rows` is looked up at call time, so tests can wrap it)
                job = r._pool.submit(_READ, read_rows, r.store, r.site, c, whole=True, out=buf, **kw)
            reads.append((job, (buf, start)))
        self._reads[(epoch, j)] = reads

    def _wait(self, f: Future) -> Any:
        while True:
            try:
                return f.result(timeout=0.1)
            except TimeoutError:
                if self._stop.is_set():
                    raise _Stopped from None

    def _group(self, epoch: int, j: int) -> _Group | None:
        """Group j of `epoch`, read (None past the last group)."""
        self._request(epoch, j)
        reads = self._reads.pop((epoch, j))
        if not reads:
            return None
        parts: list[Rows] = [self._wait(f) for f, _ in reads]
        self.r._checked.update(self._groups(epoch)[j])
        sizes = [len(p.rows) for p in parts]
        which = np.repeat(np.arange(len(parts), dtype=np.int64), sizes)
        rows = np.concatenate([p.rows.numpy() for p in parts])
        first = [self.r.store.chunk_range(c)[0] for c in self._groups(epoch)[j]]
        local = rows - np.repeat(np.asarray(first, dtype=np.int64), sizes)
        starts = np.asarray([start for _, (_, start) in reads], np.int64)
        arena = self.r._arena_bits if (starts >= 0).all() else None
        group = _Group([p.x if self.r._on_device else _bits(p.x) for p in parts], which, local, rows, arena, starts)
        # the buffers go back to the reader once no plan or gather uses the group
        weakref.finalize(group, self.r._recycle, [b for _, b in reads])
        return group

    def _split(self, epoch: int, j: int, g: _Group) -> tuple[np.ndarray, np.ndarray]:
        """The seeded halves of group j (group row numbers): the first is drawn in phase j, the second in j+1."""
        n = len(g.rows)
        perm = self._rng(epoch, j, _SPLIT).permutation(n)
        return perm[: n // 2], perm[n // 2 :]

    def _plan(self, epoch: int, j: int, leftover: tuple[_Group, np.ndarray] | None) -> tuple[_Plan, Any]:
        """Phase j's plan from the half of G[j-1] it drains and the first half of G[j], and the half it leaves."""
        g = self._group(epoch, j)
        self._request(*self._advance(epoch, j))  # read the next group while this phase is drawn
        first = second = None
        if g is not None:
            h1, h2 = self._split(epoch, j, g)
            first, second = (g, h1), (g, h2)
        halves = [h for h in (leftover, first) if h is not None]
        groups = tuple(grp for grp, _ in halves)
        sources = [c for grp in groups for c in grp.chunks]
        # The drawn order as indices into the groups' rows laid end to end, so each field is one gather.
        ends = np.cumsum([0] + [len(grp.rows) for grp in groups])
        idx = np.concatenate([h + e for (_, h), e in zip(halves, ends, strict=False)]) if halves else _NONE
        src = idx[self._rng(epoch, j, _PHASE).permutation(len(idx))] if len(idx) else _NONE

        def field(name: str, shift: np.ndarray | None = None) -> np.ndarray:
            parts = [getattr(grp, name) + (shift[i] if shift is not None else 0) for i, grp in enumerate(groups)]
            return np.concatenate(parts)[src] if parts else _NONE

        one = groups[0].arena if groups and all(grp.arena is not None for grp in groups) else None
        if one is not None:  # each batch is one gather from the arena: no chunk-by-chunk fields needed
            plan = _Plan(epoch, j, sources, None, None, field("rows"), groups, one, field("at"))
        else:
            which = field("which", np.cumsum([0] + [len(grp.chunks) for grp in groups]))
            plan = _Plan(epoch, j, sources, which, field("local"), field("rows"), groups, None, None)
        return plan, second

    # -- background work -------------------------------------------------------------------------------------

    def _assemble(self, epoch: int, phase: int, off: int) -> None:
        try:
            leftover = None
            if phase > 0:  # resuming mid-epoch: the half of G[phase-1] that phase `phase` drains
                self._request(epoch, phase - 1)
                self._request(epoch, phase)
                g = self._group(epoch, phase - 1)
                leftover = (g, self._split(epoch, phase - 1, g)[1]) if g is not None else None
            plan, leftover = self._plan(epoch, phase, leftover)
            o, empty = off, 0
            ps, pe = self.part.start, self.part.stop
            while not self._stop.is_set():
                segments, w = [], 0  # w: rows of the lane batch cut so far
                while w < self.per_lane:
                    n = len(plan.rows)
                    if o >= n:
                        empty = empty + 1 if n == 0 else 0
                        if empty > len(self._groups(plan.epoch)) + 2:
                            raise SaeError(f"store {self.r.store.path}: the reader's chunks hold no training rows")
                        plan, leftover = self._plan(*self._advance(plan.epoch, plan.phase), leftover)
                        o = 0
                        continue
                    take = min(self.per_lane - w, n - o)
                    a, b = max(w, ps), min(w + take, pe)  # the overlap with this rank's part of the lane batch
                    if a < b:
                        segments.append((plan, o + a - w, o + b - w))
                    o += take
                    w += take
                pos = (plan.epoch, plan.phase, o) if o < len(plan.rows) else (*self._advance(plan.epoch, plan.phase), 0)
                if self.r._on_device:
                    job: Any = segments  # gathered on the device (`ChunkReader._to_device`)
                else:
                    dtype, to_float = self.r.store.dtype, self.r._host_float32
                    job = self.r._pool.submit(_GATHER, _gather, segments, pe - ps, dtype, to_float)
                if not self._put((job, pos)):
                    return
        except _Stopped:
            return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


_scratch = threading.local()
_spare: dict[tuple[int, int, str], list[np.ndarray]] = {}  # batch memory no tensor uses any more, by shape
_spare_lock = threading.Lock()


def _batch_tensor(n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """An [n, d] CPU tensor on recycled memory: a fresh allocation of a batch's size is new pages, and faulting
    them in costs about as much as filling them. The tensor wraps a numpy view of a spare block; the view lives
    as long as any tensor on its memory does (torch keeps it), and its end returns the block."""
    np_dtype = np.dtype(np.float32 if dtype == torch.float32 else np.uint16)
    key = (n, d, np_dtype.str)
    with _spare_lock:
        spare = _spare.setdefault(key, [])
        block = spare.pop() if spare else np.empty((n, d), np_dtype)
    view = block[:]
    weakref.finalize(view, _return_block, key, block)
    t = torch.from_numpy(view)
    return t if dtype == torch.float32 else t.view(dtype)


def _return_block(key: tuple[int, int, str], block: np.ndarray) -> None:
    with _spare_lock:
        if len(_spare[key]) < 2 * AHEAD:
            _spare[key].append(block)


def _scratch_rows(name: str, n: int, d: int, dtype: np.dtype) -> np.ndarray:
    """This worker thread's scratch rows `name` (reused from batch to batch: no fresh pages to fault in)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.shape[0] < n or buf.shape[1] != d or buf.dtype != dtype:
        buf = np.empty((n, d), dtype)
        setattr(_scratch, name, buf)
    return buf[:n]


def _staging(rows: int, d: int, dtype: str, pinned: bool) -> tuple[torch.Tensor, Any]:
    """This worker thread's next staging buffer for chunk uploads ([rows, d] of `dtype`, pinned for a GPU) and its
    copy event. Two per thread take turns, so a decode overlaps the previous chunk's copy; a buffer is reused
    only once its last copy is done."""
    ring = getattr(_scratch, "staging", None)
    if ring is None or ring[0][0].shape != (rows, d) or ring[0][0].dtype != getattr(torch, dtype):
        ring = [[torch.empty(rows, d, dtype=getattr(torch, dtype), pin_memory=pinned), None] for _ in range(2)]
        _scratch.staging, _scratch.turn = ring, 0
    slot = ring[_scratch.turn]
    _scratch.turn ^= 1
    if slot[1] is None:
        slot[1] = torch.cuda.Event() if pinned else None
    elif pinned:
        slot[1].synchronize()  # (releases the GIL)
    return slot[0], slot[1]


def _gather(
    segments: list[tuple[_Plan, int, int]], n: int, dtype: str, to_float: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [a, b) of each segment's plan, in order, on the host: gathered chunk by chunk into this thread's staging
    rows, put in drawn order, and converted to float32 (`to_float`) or left in the store's dtype. numpy only, so
    the GIL is released while rows move."""
    d = segments[0][0].sources[0].shape[1]
    bits_dtype = np.dtype(_BITS[dtype][0])
    if not to_float:  # in the store's dtype
        x = _batch_tensor(n, d, getattr(torch, dtype))
        out = _bits(x)
    else:
        x = _batch_tensor(n, d, torch.float32)
        out = _scratch_rows("out", n, d, bits_dtype) if dtype != "float32" else _bits(x)
    stage = _scratch_rows("stage", max(b - a for _, a, b in segments), d, bits_dtype)
    rows = np.empty(n, np.int64)
    o = 0
    for plan, a, b in segments:
        m = b - a
        rows[o : o + m] = plan.rows[a:b]
        if plan.arena is not None:  # one copy, straight into drawn order
            np.take(plan.arena, plan.at[a:b], axis=0, out=out[o : o + m], mode="clip")
            o += m
            continue
        which, local = plan.which[a:b], plan.local[a:b]
        order = np.argsort(which, kind="stable")
        counts = np.bincount(which, minlength=len(plan.sources))
        local = local[order]
        lo = 0
        for k in np.flatnonzero(counts):
            hi = lo + int(counts[k])
            np.take(plan.sources[k], local[lo:hi], axis=0, out=stage[lo:hi], mode="clip")
            lo = hi
        inverse = np.empty(m, np.int64)
        inverse[order] = np.arange(m)
        np.take(stage[:m], inverse, axis=0, out=out[o : o + m], mode="clip")
        o += m
    if to_float and dtype != "float32":
        flat = _bits(x)  # float32 bits
        if dtype == "bfloat16":  # bf16 bits are the top half of the float32
            np.copyto(flat, out, casting="safe")
            np.left_shift(flat, 16, out=flat)
        else:
            np.copyto(x.numpy(), out.view(np.float16), casting="safe")
    return x, torch.from_numpy(rows)


def _device_gather(segments: list[tuple[_Plan, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [a, b) of each segment's plan, in order, gathered from the chunks on the device (in the store's
    dtype), and their store rows. One `index_select` from the arena (indices sent from pinned memory); plans with
    a chunk outside it (no free slot) are gathered chunk by chunk."""
    rows = torch.from_numpy(np.concatenate([plan.rows[a:b] for plan, a, b in segments]))
    first = segments[0][0].sources[0]
    if all(plan.arena is not None for plan, _, _ in segments):
        arena = segments[0][0].arena
        at = torch.from_numpy(np.concatenate([plan.at[a:b] for plan, a, b in segments]))
        if arena.is_cuda:
            at = at.pin_memory().to(arena.device, non_blocking=True)
        return arena.index_select(0, at), rows
    x = torch.empty(len(rows), first.shape[1], dtype=first.dtype, device=first.device)
    o = 0
    for plan, a, b in segments:
        if plan.arena is not None:
            x[o : o + b - a] = plan.arena.index_select(0, torch.from_numpy(plan.at[a:b]).to(first.device))
        else:
            which, local = plan.which[a:b], plan.local[a:b]
            for k in np.unique(which):
                sel = np.flatnonzero(which == k)
                to = torch.from_numpy(sel + o).to(first.device)
                x.index_copy_(0, to, plan.sources[k].index_select(0, torch.from_numpy(local[sel]).to(first.device)))
        o += b - a
    return x, rows


# -- to the GPU ----------------------------------------------------------------------------------------------


class CudaFeed:
    """Batches to a GPU ahead of the step. A thread takes each batch the host prepared (`source`: a part and
    what to hand on with it) and has `move` put it on the device on a side stream (the reader's: a gather from the
    chunks already there). It runs `depth` batches ahead (double-buffered at the
    default 2), so this overlaps the step; the consumer's stream waits for it through its event (no host
    synchronisation) and converts the batch to float32 on the device."""

    def __init__(
        self,
        source: Callable[[], tuple[Any, Any]],
        move: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        stream: torch.cuda.Stream,
        depth: int = 2,
    ):
        self.device = device  # with its index: the copy thread selects it, and set_device refuses a bare "cuda"
        self._move = move
        self._stream = stream
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), name="sae-h2d", daemon=True)
        self._thread.start()

    def _run(self, source: Callable[[], tuple[Any, Any]]) -> None:
        try:
            torch.cuda.set_device(self.device)
            while not self._stop.is_set():
                part, pos = source()
                with torch.cuda.stream(self._stream):
                    xd, rows = self._move(part)
                    done = torch.cuda.Event()
                    done.record(self._stream)
                del part  # (a gathered part's arena slots may be reused now: later work on the stream follows it)
                if not self._put((xd, rows, pos, done)):
                    return
        except BaseException as exc:
            if not self._stop.is_set():
                self._put(exc)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The next batch as float32 on the device, its store rows and the lanes' positions after it."""
        while True:
            try:
                item = self._q.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._q.empty():
                    raise SaeError("the reader's copy thread stopped") from None
        if isinstance(item, BaseException):
            raise item
        xd, rows, pos, done = item
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(done)
        xd.record_stream(stream)  # allocated on the side stream, used on this one
        return xd.float(), rows, pos

    def stop(self) -> None:
        self._stop.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


def _len(r: tuple[int, int]) -> int:
    return r[1] - r[0]


def _itemsize(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
