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

Reading, one path on every device (see "Reader" in docs/benchmarks.md for the measurements behind it). Shard files
are memory-mapped by the store module. A pool of `threads` workers loads each chunk whole into a slot of one arena
on the reader's device, with the GIL released: a Blosc chunk decoded from the mapped bytes, a raw one copied; on the
CPU straight into the slot, elsewhere into staging (pinned on a GPU) then copied on the reader's side stream. The
host's cores so only decode or copy sequentially. One feed thread plans the lanes and gathers each batch from the
arena in drawn order, in the store's dtype, AHEAD batches ahead: one numpy `take` on the CPU, one `index_select`
on a GPU's side stream. `next_batch` makes it float32.

A lane's groups take turns in REGIONS arena regions. The loads of group j+1 are issued as phase j is planned, once
the feed has gathered every row cut from phase j-1, the last to read the region they overwrite: on the CPU those
gathers are done, on a GPU queued before the loads' copies on the side stream. So no slot is tracked or waited for.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from sae.errors import SaeError
from sae.store import Store

STATE_VERSION = 2
MIN_BUFFER_CHUNKS = 32
AHEAD = 4  # batches the feed prepares ahead of the trainer
REGIONS = 3  # groups of a lane in the arena at once: the two its phase draws from and the next, being read
_SPLIT, _PHASE, _ORDER, _LANES = 0, 1, 2, 3  # RNG stream tags
_NONE = np.zeros(0, np.int64)
_CHECK_BLOCK = 1024  # rows per block of the non-finite scan (a block stays in cache)
# The stored bits of each dtype: the unsigned view, the exponent mask (all ones = Inf/NaN), the magnitude mask.
_BITS = {
    "bfloat16": (np.uint16, 0x7F80, 0x7FFF),
    "float16": (np.uint16, 0x7C00, 0x7FFF),
    "float32": (np.uint32, 0x7F800000, 0x7FFFFFFF),
}
_STORED = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}  # numpy dtype of the stored values


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
    """Activations [n, d_model] in the store's logical dtype, on CPU (with `read_rows(out=...)`: every row of the
    chunk, including those `rows` leaves out)."""
    rows: torch.Tensor
    """Store row index of each row, int64 [n] (with `out`: of the kept rows only; row r is x[r - start])."""


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
    """The raw bits of a float tensor on the CPU as an unsigned numpy view (no copy)."""
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
    out: np.ndarray | None = None,
    check: bool = True,
) -> Rows:
    """Chunk i of `site` with BOS rows dropped (unless `keep_bos`); SaeError naming the store row of any
    non-finite value among the kept rows (unless `check` is False: a chunk already checked).

    With `out` ([chunk_rows, width] of the stored dtype) the whole chunk goes there, BOS rows too (decoded there,
    or copied from the mapped file if raw): `x` is a view of `out` and `rows` names the kept rows.

    Several sites (a transcoder's input and target, written by one forward at the same rows): their chunks side
    by side, [rows, d_model · n_sites]."""
    start, _ = store.chunk_range(i)
    sites = [site] if isinstance(site, str) else list(site)
    site = " + ".join(sites)
    try:
        if len(sites) == 1:
            a = store.read_chunk(sites[0], i, out)
        else:
            parts = [store.read_chunk(s, i) for s in sites]
            a = np.concatenate(parts, axis=1, out=None if out is None else out[: len(parts[0])])
        if out is not None and not np.may_share_memory(a, out):  # a raw chunk: a view of the mapped file
            np.copyto(out[: len(a)], a)
            a = out[: len(a)]
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
    if out is not None:
        return Rows(x, ids)
    return Rows(x.index_select(0, torch.from_numpy(local.astype(np.int64))), ids)


def _logical(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy rows → a tensor of the logical dtype sharing their memory (bfloat16 bits reinterpreted)."""
    return torch.from_numpy(a).view(getattr(torch, dtype))


def _float32(x: torch.Tensor) -> torch.Tensor:
    """A batch as float32; on the CPU by numpy on this thread (a bf16 value is the top half of its float32): torch
    would wake an OpenMP team, far slower on a busy machine."""
    if x.dtype == torch.float32 or x.device.type != "cpu":
        return x.float()
    out = _batch_rows(x.shape, "float32")
    if x.dtype == torch.bfloat16:
        bits = _bits(out)
        np.copyto(bits, _bits(x), casting="safe")
        np.left_shift(bits, 16, out=bits)
    else:
        np.copyto(out.numpy(), x.numpy(), casting="safe")
    return out


_spare: dict[tuple, list[np.ndarray]] = {}  # CPU batch memory no tensor uses any more, by shape and dtype
_spare_lock = threading.Lock()


def _batch_rows(shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """A CPU batch tensor on recycled memory: fresh pages cost about as much to fault in as to fill. It wraps a
    numpy view of a spare block, which lives as long as any tensor on its memory does; its end returns the block."""
    key = (*shape, dtype)
    with _spare_lock:
        blocks = _spare.setdefault(key, [])
        block = blocks.pop() if blocks else np.empty(shape, _STORED[dtype])
    view = block[:]  # (the tensor keeps this very array alive; a numpy view of it would name `block` as its base)
    weakref.finalize(view, _give_back, key, block)
    return _logical(view, dtype)


def _give_back(key: tuple, block: np.ndarray) -> None:
    with _spare_lock:
        if len(_spare[key]) < 2 * AHEAD:
            _spare[key].append(block)


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

    The buffer is `buffer_mb` of stored activations per lane, at least 32 chunks; the arena on `device` holds one
    and a half buffers per lane. `threads` workers load chunks (default: `default_threads()`). `device="meta"`
    runs a device's path with nothing to copy to: chunks decoded or copied into staging and batches planned, with
    shapes but no values (the host's share of a GPU reader, for benchmarks on a machine without one).
    """

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
            chunk_mb = store.chunk_rows * self.width * np.dtype(_STORED[store.dtype]).itemsize / 2**20
            self.group_chunks = max(1, max(MIN_BUFFER_CHUNKS, int(buffer_mb / chunk_mb)) // 2)
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
        for name in [*sites, "position"]:  # open the arrays and their shard maps here: the workers then only read
            store.array(name)
            store.mapped(name)
        # The lanes under this rank's rows [lo, hi) of the global batch, with the part of each lane batch it uses.
        per_lane, lo, hi = batch_size // self.lanes, rank * batch_size // world, (rank + 1) * batch_size // world
        parts = {i: (max(lo, i * per_lane), min(hi, (i + 1) * per_lane)) for i in range(self.lanes)}
        parts = {i: slice(a - i * per_lane, b - i * per_lane) for i, (a, b) in parts.items() if a < b}
        if any(positions[i] is None for i in parts):
            raise SaeError(f"the reader state has no position for lane(s) {[i for i in parts if positions[i] is None]}")
        self._pos: dict[int, tuple[int, ...]] = {i: tuple(map(int, positions[i])) for i in parts}
        self._rows = hi - lo
        self._storage = np.dtype(_STORED[store.dtype])
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._checked: set[int] = set()  # chunks found free of NaN/Inf: not scanned again in later epochs
        chunks = {i: self.lane_chunks(i) for i in parts}
        h = min(self.group_chunks, max(len(c) for c in chunks.values()))  # chunk slots of a region
        n = len(parts) * REGIONS * h * store.chunk_rows
        if self.device.type == "cpu":  # numpy asks for huge pages: fewer TLB misses in the gathers of random rows
            self._arena = _logical(np.empty((n, self.width), self._storage), store.dtype)
        else:
            with self._side():  # (on a GPU the arena belongs to the side stream, its only user)
                self._arena = torch.empty(n, self.width, dtype=getattr(torch, store.dtype), device=self.device)
        self._arena_bits = _bits(self._arena) if self.device.type == "cpu" else None  # what host gathers read
        threads = max(1, threads) if threads is not None else default_threads()
        self._pool = ThreadPoolExecutor(threads, "sae-read")
        # Off the CPU, chunks go through staging buffers, two a worker so a decode overlaps the copy before it; a
        # buffer is taken again once its copy is done.
        self._staging: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(2 * threads if self._arena_bits is None else 0):
            stage = torch.empty_like(self._arena[: store.chunk_rows], device="cpu", pin_memory=self._stream is not None)
            self._staging.put((stage, None))
        self._ready: queue.Queue = queue.Queue(maxsize=AHEAD)
        self._stop = threading.Event()
        self._lanes = {
            i: _Lane(self, i, chunks[i], per_lane, part, k * REGIONS * h, h)
            for k, (i, part) in enumerate(parts.items())
        }
        self._feed = threading.Thread(target=self._run, name="sae-feed", daemon=True)
        self._feed.start()

    # -- public API ----------------------------------------------------------------------------------------

    @property
    def buffer_chunks(self) -> int:
        """Chunks the shuffle buffer of a lane holds (two groups)."""
        return 2 * self.group_chunks

    @functools.cached_property
    def train_rows(self) -> int:
        """Training rows per epoch (BOS rows excluded unless keep_bos)."""
        if self.keep_bos or not self.train_chunks:
            return sum(b - a for a, b in map(self.store.chunk_range, self.train_chunks))

        def kept(chunks: list[int]) -> int:
            return sum(int((np.asarray(self.store.chunk_meta(c).position) != 0).sum()) for c in chunks)

        if len(self.train_chunks) + len(self.val_chunks) == self.store.n_chunks:
            # All chunks are ours: the manifest's BOS-free count minus the held-out chunks' share.
            return self.store.stats(self.sites[0], skip_bos=True).n_rows - kept(self.val_chunks)
        return kept(self.train_chunks)

    def lane_chunks(self, lane: int) -> list[int]:
        """The training chunks lane `lane` reads (all of them with one lane)."""
        if self.lanes == 1:
            return list(self.train_chunks)
        deal = _rng(self.seed, self.lanes, _LANES).permutation(len(self.train_chunks))
        return sorted(self.train_chunks[i] for i in deal[lane :: self.lanes])

    def next_batch(self, float32: bool = True) -> Batch:
        """This rank's rows of the next global batch (all `batch_size` of them in one process) on the device, as
        float32; with `float32=False` in the store's dtype, as gathered (for a consumer that converts them)."""
        if not self._lanes:
            raise SaeError("the reader was closed")
        t0 = time.perf_counter()
        item = self._ready.get()  # (the feed hands over a batch or the exception it stopped on)
        self.wait_seconds += time.perf_counter() - t0
        if isinstance(item, BaseException):
            self.close()
            raise item
        x, rows, pos, done = item
        if done is not None:  # gathered on the side stream: this stream waits for it, not the host
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            x.record_stream(stream)
        self._pos.update(pos)
        return Batch(_float32(x) if float32 else x, torch.from_numpy(rows))

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position of the stream; pass it as `state=` to continue exactly from here. A rank's reader
        knows only its lanes' positions (None for the others): join the ranks' states with `merge_states`."""
        positions = [list(self._pos[i]) if i in self._pos else None for i in range(self.lanes)]
        return {
            "version": STATE_VERSION, "store": str(self.store.path), "site": self.site, "seed": self.seed,
            "keep_bos": self.keep_bos, "train_chunks": self.train_chunks, "val_chunks": self.val_chunks,
            "group_chunks": self.group_chunks, "lanes": self.lanes,
            "positions": positions,  # [epoch, phase, offset] of each lane
        }  # fmt: skip

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
        """Stop the threads and let go of the arena now (on a GPU: device memory), not at the next garbage
        collection (lanes and reader refer to each other); batches already handed out stay valid."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)  # (a feed waiting for a load stops waiting)
        with contextlib.suppress(queue.Empty):
            while True:  # (a feed waiting to hand over a batch stops waiting)
                self._ready.get_nowait()
        self._feed.join()
        self._pool.shutdown(wait=True)
        self._lanes, self._arena, self._arena_bits = {}, None, None

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the feed thread and the workers -----------------------------------------------------------------------

    def _side(self) -> contextlib.ExitStack:
        """On a GPU, the reader's device for this thread (a thread starts on device 0, where it would make a CUDA
        context) and its side stream, whose order puts a slot's rewrite after the gathers that read it."""
        stack = contextlib.ExitStack()
        if self._stream is not None:
            stack.enter_context(torch.cuda.device(self.device))
            stack.enter_context(torch.cuda.stream(self._stream))
        return stack

    def _run(self) -> None:
        try:
            with self._side():
                while not self._stop.is_set():
                    self._put(self._batch())
        except BaseException as exc:  # handed to the consumer, which re-raises it
            if not self._stop.is_set():
                self._put(exc)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._ready.put(item, timeout=0.1)
                return

    def _batch(self) -> tuple[torch.Tensor, np.ndarray, dict[int, tuple[int, int, int]], Any]:
        """This rank's part of the next global batch gathered from the arena, its store rows, the lanes' positions
        after it and (on a GPU) the event its gathers end with."""
        on_host, shape = self._arena_bits is not None, (self._rows, self.width)
        x = _batch_rows(shape, self.store.dtype) if on_host else self._arena.new_empty(shape)
        rows = np.empty(self._rows, np.int64)
        o, pos = 0, {}
        for i, lane in self._lanes.items():
            for at, r in lane.cut():
                if on_host:
                    np.take(self._arena_bits, at, axis=0, out=_bits(x[o : o + len(at)]), mode="clip")
                else:  # (indices from pinned memory: their copy is asynchronous too; index_select's out= variant
                    # costs the host far more than a copy on the device)
                    idx = torch.from_numpy(at)
                    idx = (idx.pin_memory() if x.is_cuda else idx).to(self.device, non_blocking=True)
                    x[o : o + len(at)] = self._arena.index_select(0, idx)
                rows[o : o + len(at)] = r
                o += len(at)
            pos[i] = lane.position
        return x, rows, pos, self._stream.record_event() if self._stream is not None else None

    def _load(self, c: int, slot: int, check: bool) -> np.ndarray:
        """A worker's job: chunk c whole into arena slot `slot`; the store rows of its kept rows."""
        n = self.store.chunk_rows
        dest = self._arena[slot * n : (slot + 1) * n]
        host, done = (dest, None) if self._arena_bits is not None else self._staging.get()
        if done is not None:
            done.synchronize()
        got = read_rows(
            self.store, self.site, c, keep_bos=self.keep_bos, out=_bits(host).view(self._storage), check=check
        )
        if host is not dest:
            with self._side():
                dest.copy_(host, non_blocking=True)
            self._staging.put((host, self._stream.record_event() if self._stream is not None else None))
        return got.rows.numpy()

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
    positions: list[Any] = [None] * int(states[0]["lanes"])
    for i, pos in ((i, p) for st in states for i, p in enumerate(st["positions"]) if p is not None):
        if positions[i] not in (None, pos):
            raise SaeError(f"reader lane {i}: ranks disagree on its position ({positions[i]} vs {pos})")
        positions[i] = pos
    if None in positions:
        raise SaeError(f"no rank reads reader lane(s) {[i for i, p in enumerate(positions) if p is None]}")
    return {**states[0], "positions": positions}


# -- one lane ------------------------------------------------------------------------------------------------

_Rows = tuple[np.ndarray, np.ndarray]  # rows of a lane: their store rows and arena rows


class _Lane:
    """One seeded stream (see the module docstring) over `chunks`, planned and cut by the reader's feed thread.
    Its groups take turns in REGIONS arena regions of `h` chunk slots from slot `base`."""

    def __init__(self, reader: ChunkReader, i: int, chunks: list[int], per_lane: int, part: slice, base: int, h: int):
        self.r, self.chunks, self.key = reader, chunks, () if reader.lanes == 1 else (reader.lanes, i)
        self.per_lane, self.part, self.base, self.h = per_lane, part, base, h
        self.position = reader._pos[i]
        """(epoch, phase, offset) after the last batch cut."""
        self._loads: dict[tuple[int, int], list[tuple[int, int, Future]]] = {}  # a group's (chunk, slot, load)
        self._requested = 0  # groups requested so far: the next takes region `_requested % REGIONS`
        self._group_cache: dict[int, list[list[int]]] = {}
        self._plan: tuple[int, int, np.ndarray, np.ndarray] | None = None  # epoch, phase, its rows in drawn order
        self._left: _Rows | None = None  # the half of the plan's group that the next phase drains
        self._off = 0

    def cut(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's pieces (arena rows, store rows) of the lane's next batch, in drawn order; `position` is
        updated after the last. The caller gathers each piece before asking for the next: planning a phase issues
        the loads that overwrite the region its predecessor's rows came from."""
        if self._plan is None:
            self._start()
        ps, pe = self.part.start, self.part.stop
        w = empty = 0  # rows of the lane batch cut so far; phases in a row without rows
        while w < self.per_lane:
            epoch, phase, rows, at = self._plan  # type: ignore[misc]
            if self._off >= len(rows):
                empty = empty + 1 if len(rows) == 0 else 0
                if empty > len(self._groups(epoch)) + 2:
                    raise SaeError(f"store {self.r.store.path}: the reader's chunks hold no training rows")
                self._plan, self._left = self._make(*self._advance(epoch, phase), self._left)
                self._off = 0
                continue
            take = min(self.per_lane - w, len(rows) - self._off)
            a, b = max(w, ps) - w + self._off, min(w + take, pe) - w + self._off  # this rank's overlap
            if a < b:
                yield at[a:b], rows[a:b]
            self._off += take
            w += take
        epoch, phase, rows, _ = self._plan  # type: ignore[misc]
        self.position = (epoch, phase, self._off) if self._off < len(rows) else (*self._advance(epoch, phase), 0)

    def _start(self) -> None:
        epoch, phase, self._off = self.position
        if phase > 0:  # resuming mid-epoch: phase-1's plan (unused) leaves the half of G[phase-1] this phase drains
            self._left = self._make(epoch, phase - 1, None)[1]
        self._plan, self._left = self._make(epoch, phase, self._left)

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
        """Start loading group j of `epoch` (if there is one and it is not loading) into the next region."""
        if (epoch, j) in self._loads:
            return
        gs = self._groups(epoch)
        chunks = gs[j] if j < len(gs) else []
        first = self.base + self._requested % REGIONS * self.h
        self._requested += bool(chunks)
        r = self.r
        self._loads[(epoch, j)] = [
            (c, first + k, r._pool.submit(r._load, c, first + k, c not in r._checked)) for k, c in enumerate(chunks)
        ]

    def _group(self, epoch: int, j: int) -> _Rows | None:
        """Group j of `epoch`, loaded: its kept rows in group order (None past the last group)."""
        self._request(epoch, j)
        loads = self._loads.pop((epoch, j))
        if not loads:
            return None
        kept = [f.result() for _, _, f in loads]  # (close() cancels them)
        self.r._checked.update(c for c, _, _ in loads)
        n = self.r.store.chunk_rows
        at = [r - self.r.store.chunk_range(c)[0] + slot * n for (c, slot, _), r in zip(loads, kept, strict=True)]
        return np.concatenate(kept), np.concatenate(at)

    def _halves(self, epoch: int, j: int, g: _Rows) -> tuple[_Rows, _Rows]:
        """The seeded halves of group j: the first is drawn in phase j, the second in j+1."""
        perm = self._rng(epoch, j, _SPLIT).permutation(len(g[0]))
        h1, h2 = perm[: len(perm) // 2], perm[len(perm) // 2 :]
        return (g[0][h1], g[1][h1]), (g[0][h2], g[1][h2])

    def _make(self, epoch: int, j: int, left: _Rows | None) -> tuple[tuple[int, int, np.ndarray, np.ndarray], Any]:
        """Phase j's plan from the half of G[j-1] it drains and the first half of G[j], and the half it leaves."""
        g = self._group(epoch, j)
        self._request(*self._advance(epoch, j))  # the next group loads while this phase is drawn
        first, second = self._halves(epoch, j, g) if g is not None else (None, None)
        halves = [h for h in (left, first) if h is not None]
        rows, at = (np.concatenate([h[f] for h in halves]) if halves else _NONE for f in (0, 1))
        perm = self._rng(epoch, j, _PHASE).permutation(len(rows))
        return (epoch, j, rows[perm], at[perm]), second
