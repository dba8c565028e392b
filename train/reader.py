"""The shuffled chunk reader: one site of a store as an endless, seeded stream of training batches.

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

Background threads read whole chunks (one contiguous slice each; integer-array reads on sharded arrays are
10-20x slower), drop BOS rows, reject non-finite rows, and assemble the next phase while the current one is
consumed. Batches leave the reader in the store's dtype and become float32 on the target device.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from sae.errors import SaeError
from sae.store import Store

STATE_VERSION = 2
MIN_BUFFER_CHUNKS = 32
_SPLIT, _PHASE, _ORDER, _LANES = 0, 1, 2, 3  # RNG stream tags


class Batch(NamedTuple):
    """One batch of training rows."""

    x: torch.Tensor
    """Activations [B, d_model], float32 on the reader's device, in raw (unscaled) units."""
    rows: torch.Tensor
    """Store row index (chunk start + offset) of each row, int64 on CPU."""


class Rows(NamedTuple):
    """Rows of one or more chunks as read from the store."""

    x: torch.Tensor
    """Activations [n, d_model] in the store's logical dtype, on CPU."""
    rows: torch.Tensor
    """Store row index of each row, int64 [n]."""


class _Half(NamedTuple):
    parts: list[Rows]  # the group's chunks, in group order
    offsets: torch.Tensor  # first row of each chunk in the group's numbering, and the total [n_parts + 1]
    idx: torch.Tensor  # the half's rows (group numbering), in drawn order


class _Phase(NamedTuple):
    epoch: int
    phase: int
    x: torch.Tensor
    rows: torch.Tensor


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


def read_rows(store: Store, site: str, i: int, *, keep_bos: bool) -> Rows:
    """Chunk i of `site` with BOS rows dropped (unless `keep_bos`); SaeError naming the store row of any
    non-finite value among the kept rows."""
    start, _ = store.chunk_range(i)
    try:
        x = store.chunk(site, i)
        ids = torch.arange(start, start + x.shape[0])
        if not keep_bos:
            keep = torch.from_numpy(np.asarray(store.array("position")[start : start + x.shape[0]]) != 0)
            x, ids = x[keep], ids[keep]
    except SaeError:
        raise
    except Exception as e:
        raise SaeError(f"store {store.path}: could not read chunk {i} of {site}: {e}") from e
    # A NaN/Inf anywhere makes the row sum non-finite (cheap: isfinite on bf16 is 30x slower); rows flagged only
    # by fp32 overflow of the sum are confirmed element-wise.
    flagged = (~torch.isfinite(x.sum(1, dtype=torch.float32))).nonzero().flatten()
    if len(flagged):
        bad = flagged[~torch.isfinite(x[flagged]).all(1)]
        if len(bad):
            shown = ", ".join(str(int(r)) for r in ids[bad[:10]])
            raise SaeError(
                f"store {store.path}, site {site}: {len(bad)} row(s) of chunk {i} hold NaN or Inf "
                f"(store rows {shown}{' ...' if len(bad) > 10 else ''}); refusing to train on them. "
                "Re-harvest those shards (e.g. with --dtype float32 or bfloat16 if float16 overflowed)"
            )
    return Rows(x, ids)


class ChunkReader:
    """Seeded, resumable stream of shuffled training batches from one site of a store, plus held-out rows.

    Use as a context manager (or call `close`) so its threads stop. `state_dict()` after `next_batch()` k times
    and `ChunkReader(..., state=that)` yields exactly the batches k+1, k+2, ... of the original reader.

    `batch_size` is the global batch, drawn in equal parts from `lanes` lanes. With `world` > 1 the reader is rank
    `rank`'s: `next_batch` returns its contiguous 1/world of each global batch and reads only the lanes under it;
    `state_dict` then holds only those lanes' positions (`merge_states` joins the ranks' states).

    The buffer is `buffer_mb` of stored activations per lane, at least 32 chunks. With the phase being drawn, the
    next one assembled and the next group being read, each lane holds up to about twice that in memory.
    """

    def __init__(
        self,
        store: Store,
        site: str,
        *,
        batch_size: int,
        seed: int = 0,
        buffer_mb: float = 1024,
        val_chunks: int = 2,
        keep_bos: bool = False,
        device: str | torch.device = "cpu",
        threads: int = 4,
        lanes: int = 1,
        rank: int = 0,
        world: int = 1,
        state: dict[str, Any] | None = None,
    ):
        if site not in store.sites:
            raise SaeError(f"store {store.path} has no site {site!r}; its sites: {', '.join(store.sites)}")
        if batch_size <= 0:
            raise SaeError(f"--batch-size must be positive, got {batch_size}")
        if not 0 <= rank < world:
            raise SaeError(f"rank {rank} is not one of the {world} ranks")
        self.store, self.site, self.batch_size = store, site, batch_size
        self.device = torch.device(device)
        complete = store.complete_chunks()
        if not complete:
            raise SaeError(f"store {store.path} lists no complete chunk; finish the harvest first")
        if state is None:
            self.seed, self.keep_bos, self.lanes = int(seed), bool(keep_bos), int(lanes)
            self.val_chunks = held_out_chunks(complete, val_chunks)
            held = set(self.val_chunks)
            self.train_chunks = [c for c in complete if c not in held]
            chunk_mb = store.chunk_rows * store.d_model * _itemsize(store.dtype) / 2**20
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
        # Touch the arrays once here: the worker threads then only read.
        store.array(site)
        store.array("position")
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="sae-read")
        # The lanes under this rank's rows [lo, hi) of the global batch, with the part of each lane batch it uses.
        per_lane, lo, hi = batch_size // self.lanes, rank * batch_size // world, (rank + 1) * batch_size // world
        self._lanes: dict[int, _Lane] = {}
        self._parts: list[tuple[int, slice]] = []
        try:
            for i in range(self.lanes):
                a, b = max(lo, i * per_lane), min(hi, (i + 1) * per_lane)
                if a >= b:
                    continue
                if positions[i] is None:
                    raise SaeError(f"the reader state has no position for lane {i}")
                key = () if self.lanes == 1 else (self.lanes, i)
                epoch, phase, offset = (int(v) for v in positions[i])
                self._lanes[i] = _Lane(self, self.lane_chunks(i), key, epoch, phase, offset)
                self._parts.append((i, slice(a - i * per_lane, b - i * per_lane)))
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
        per_lane = self.batch_size // self.lanes
        xs, ids = [], []
        for i, part in self._parts:
            x, rows = self._lanes[i].take(per_lane)
            xs.append(x[part])
            ids.append(rows[part])
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        rows = ids[0] if len(ids) == 1 else torch.cat(ids)
        # Move in the stored dtype (half the bytes of fp32), convert on the device.
        return Batch(x.to(self.device, non_blocking=True).float(), rows)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position of the stream; pass it as `state=` to continue exactly from here. A rank's reader
        knows only its lanes' positions (None for the others): join the ranks' states with `merge_states`."""
        positions = [list(self._lanes[i].position()) if i in self._lanes else None for i in range(self.lanes)]
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

    def sample_rows(self, n: int) -> torch.Tensor:
        """About `n` training rows (float32, CPU) for initialisation: the first chunks of a seeded order of all
        training chunks (the same on every rank and for any number of lanes)."""
        parts, got = [], 0
        order = _rng(self.seed, 0, 0, _ORDER).permutation(len(self.train_chunks))
        for c in (self.train_chunks[i] for i in order):
            r = read_rows(self.store, self.site, c, keep_bos=self.keep_bos)
            parts.append(r.x)
            got += len(r.x)
            if got >= n:
                break
        return torch.cat(parts)[:n].float()

    def close(self) -> None:
        """Stop the background threads."""
        for lane in getattr(self, "_lanes", {}).values():
            lane.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def _count_train_rows(self) -> int:
        if self.keep_bos or not self.train_chunks:
            return sum(_len(self.store.chunk_range(c)) for c in self.train_chunks)
        if len(self.train_chunks) + len(self.val_chunks) == self.store.n_chunks:
            # All chunks are ours: the manifest's BOS-free count minus the held-out chunks' share.
            total = self.store.stats(self.site, skip_bos=True).n_rows
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


class _Lane:
    """One seeded stream (see the module docstring) over `chunks`, assembled by a background thread."""

    def __init__(self, reader: ChunkReader, chunks: list[int], key: tuple[int, ...], epoch: int, phase: int, off: int):
        self.r, self.chunks, self.key = reader, chunks, key
        self.epoch, self.phase = epoch, phase
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._cur: _Phase | None = None
        self._off = 0
        self._assembler = threading.Thread(target=self._assemble, args=(epoch, phase), name="sae-assemble", daemon=True)
        self._assembler.start()
        if off:
            self._next_phase()
            self._off = off

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The lane's next `n` rows (store dtype, CPU) and their store row indices."""
        xs, ids = [], []
        while n:
            if self._cur is None or self._off >= len(self._cur.rows):
                self._next_phase()
                continue
            take = min(n, len(self._cur.rows) - self._off)
            xs.append(self._cur.x[self._off : self._off + take])
            ids.append(self._cur.rows[self._off : self._off + take])
            self._off += take
            n -= take
        return (xs[0], ids[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ids))

    def position(self) -> tuple[int, int, int]:
        """(epoch, phase, offset) of the next row."""
        if self._cur is not None and self._off >= len(self._cur.rows):
            return self._advance(self._cur.epoch, self._cur.phase) + (0,)
        return self.epoch, self.phase, self._off

    def stop(self) -> None:
        self._stop.set()
        while True:  # unblock an assembler waiting to hand over a phase
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        self._assembler.join(timeout=10)

    # -- the seeded plan -------------------------------------------------------------------------------------

    def _rng(self, epoch: int, j: int, tag: int) -> np.random.Generator:
        return _rng(self.r.seed, epoch, j, tag, *self.key)

    def _groups(self, epoch: int) -> list[list[int]]:
        order = [self.chunks[i] for i in self._rng(epoch, 0, _ORDER).permutation(len(self.chunks))]
        h = self.r.group_chunks
        return [order[i : i + h] for i in range(0, len(order), h)]

    def _advance(self, epoch: int, phase: int) -> tuple[int, int]:
        # An epoch of n groups has n + 1 phases; the last one drains the final group's second half.
        return (epoch + 1, 0) if phase >= len(self._groups(epoch)) else (epoch, phase + 1)

    def _split(self, epoch: int, j: int, parts: list[Rows]) -> tuple[_Half, _Half]:
        """The seeded halves of group j: the first is drawn in phase j, the second in phase j+1."""
        sizes = torch.tensor([0] + [len(p.rows) for p in parts])
        offsets = torch.cumsum(sizes, 0)
        n = int(offsets[-1])
        perm = torch.from_numpy(self._rng(epoch, j, _SPLIT).permutation(n))
        return _Half(parts, offsets, perm[: n // 2]), _Half(parts, offsets, perm[n // 2 :])

    def _build(self, halves: list[_Half], perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `perm` of the concatenated halves, gathered straight from the chunks (one copy per row, no
        intermediate concatenation), into pinned memory when the batches go to a GPU."""
        n, d = len(perm), self.r.store.d_model
        dtype = getattr(torch, self.r.store.dtype)
        x = torch.empty(n, d, dtype=dtype, pin_memory=self.r.device.type == "cuda")
        ids = torch.empty(n, dtype=torch.int64)
        base = 0
        for h in halves:
            pos = ((perm >= base) & (perm < base + len(h.idx))).nonzero().squeeze(1)
            g = h.idx[perm[pos] - base]  # row numbers inside the half's group
            c = torch.searchsorted(h.offsets[1:], g, right=True)  # which chunk holds each
            order = torch.argsort(c, stable=True)
            pos, g = pos[order], g[order]
            bounds = torch.cumsum(torch.bincount(c, minlength=len(h.parts)), 0).tolist()
            lo = 0
            for i, hi in enumerate(bounds):
                if hi > lo:
                    local = g[lo:hi] - h.offsets[i]
                    x.index_copy_(0, pos[lo:hi], h.parts[i].x.index_select(0, local))
                    ids.index_copy_(0, pos[lo:hi], h.parts[i].rows.index_select(0, local))
                lo = hi
            base += len(h.idx)
        return x, ids

    # -- background work -------------------------------------------------------------------------------------

    def _submit(self, chunks: list[int]) -> list[Future]:
        r = self.r
        return [r._pool.submit(read_rows, r.store, r.site, c, keep_bos=r.keep_bos) for c in chunks]

    def _assemble(self, epoch: int, phase: int) -> None:
        try:
            groups = self._groups(epoch)
            pending: dict[tuple[int, int], list[Future]] = {}

            def fetch(e: int, j: int) -> list[Future]:
                if (e, j) not in pending:
                    gs = groups if e == epoch_now else self._groups(e)
                    pending[(e, j)] = self._submit(gs[j]) if j < len(gs) else []
                return pending[(e, j)]

            epoch_now = epoch
            leftover = None
            if phase > 0:  # resuming mid-epoch: rebuild the half of G[phase-1] that phase `phase` drains
                leftover = self._split(epoch, phase - 1, [f.result() for f in fetch(epoch, phase - 1)])[1]
                pending.pop((epoch, phase - 1))
            while not self._stop.is_set():
                e, j = epoch_now, phase
                futures = fetch(e, j)
                ne, nj = self._advance(e, j)
                fetch(ne, nj)  # prefetch the next group while this phase is built and consumed
                first = second = None
                if futures:
                    first, second = self._split(e, j, [f.result() for f in futures])
                pending.pop((e, j))
                halves = [h for h in (leftover, first) if h is not None]
                n = sum(len(h.idx) for h in halves)
                perm = torch.from_numpy(self._rng(e, j, _PHASE).permutation(n)) if n else torch.zeros(0)
                x, ids = self._build(halves, perm.long())
                self._put(_Phase(e, j, x, ids))
                leftover = second
                if ne != e:
                    epoch_now, groups = ne, self._groups(ne)
                phase = nj
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next_phase(self) -> None:
        item = self._ready.get()
        if isinstance(item, BaseException):
            self.r.close()
            raise item
        self._cur, self._off = item, 0
        self.epoch, self.phase = item.epoch, item.phase


def _len(r: tuple[int, int]) -> int:
    return r[1] - r[0]


def _itemsize(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
