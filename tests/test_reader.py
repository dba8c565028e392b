"""The shuffled chunk reader: determinism, exactly-once epochs, held-out chunks, exact state restore, and lanes:
ranks that read disjoint chunks yet together make the global batches of one process."""

from __future__ import annotations

import gc
import hashlib
import json
import random
import time
import weakref

import numpy as np
import pytest
import torch
from _synthetic import SITE, make_store

from sae.errors import SaeError
from sae.store import MappedArray, Store
from sae.train import reader as reader_mod
from sae.train.reader import ChunkReader


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 100 chunks of 16 rows: with the 32-chunk minimum buffer an epoch has 7 groups, so phases, group halves and
    # epoch boundaries are all exercised.
    path = make_store(tmp_path_factory.mktemp("reader") / "s.zarr", n_contexts=100, seq_len=16, chunk_rows=16)
    return Store.open(path)


def _reader(store, site=SITE, cls=ChunkReader, **kw):
    kw.setdefault("batch_size", 50)
    kw.setdefault("buffer_mb", 0)
    return cls(store, site, **kw)


def _take(reader, n):
    batches = [reader.next_batch() for _ in range(n)]
    return torch.cat([b.x for b in batches]), torch.cat([b.rows for b in batches])


def _positions(store):
    return np.concatenate([np.asarray(store.chunk_meta(i).position) for i in range(store.n_chunks)])


def test_deterministic_whatever_the_thread_timing(store, monkeypatch):
    with _reader(store, seed=3, threads=4) as r:
        x1, rows1 = _take(r, 80)  # > 2 epochs
    real = reader_mod.read_rows
    jitter = random.Random(0)

    def slow(*a, **kw):
        time.sleep(jitter.random() * 0.004)
        return real(*a, **kw)

    monkeypatch.setattr(reader_mod, "read_rows", slow)
    with _reader(store, seed=3, threads=3) as r:
        x2, rows2 = _take(r, 80)
    assert torch.equal(rows1, rows2) and torch.equal(x1, x2)
    with _reader(store, seed=4, threads=1) as r:
        _, rows3 = _take(r, 80)
    assert not torch.equal(rows1, rows3)


@pytest.mark.parametrize(
    "kw, digest",
    [
        (dict(seed=3, batch_size=50), "923b871823b0d05f"),
        (dict(seed=1, batch_size=48, lanes=2), "bb1a7f5db8892b7a"),
        (dict(seed=2, batch_size=37, keep_bos=True, val_chunks=3), "87b27b74bd80797f"),
        (dict(seed=4, batch_size=400), "761ca0fa9ea271ae"),  # a batch spans several phases
    ],
)
def test_the_seeded_stream_is_pinned(store, kw, digest):
    # The rows a seed gives, over 3 epochs, are fixed: a checkpoint's reader state names a position in this stream,
    # so a change to it would make resumed runs read other rows than the run they continue.
    with _reader(store, **kw) as r:
        _, rows = _take(r, -(-3 * r.train_rows // r.batch_size))
    assert hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16] == digest


@pytest.mark.parametrize("keep_bos", [False, True])
def test_every_training_row_once_per_epoch(store, keep_bos):
    pos = _positions(store)
    with _reader(store, seed=1, keep_bos=keep_bos, val_chunks=3) as r:
        assert r.buffer_chunks == 32 and len(r.train_chunks) == 97
        expected = np.concatenate([np.arange(*store.chunk_range(c)) for c in r.train_chunks])
        if not keep_bos:
            expected = expected[pos[expected] != 0]
        assert r.train_rows == len(expected)
        n = r.train_rows
        x, rows = _take(r, -(-3 * n // r.batch_size))
    for e in range(3):
        epoch = rows[e * n : (e + 1) * n].numpy()
        assert len(epoch) == n
        assert np.array_equal(np.sort(epoch), expected)  # every training row exactly once
    assert not np.array_equal(rows[:n].numpy(), rows[n : 2 * n].numpy())  # a new order each epoch
    assert keep_bos == bool((pos[rows.numpy()] == 0).any())
    # the rows are the stored values, as float32
    order = torch.argsort(rows[:n])
    stored = torch.cat([store.chunk(SITE, i) for i in range(store.n_chunks)]).float()
    assert x.dtype == torch.float32
    assert torch.equal(x[:n][order], stored[torch.from_numpy(expected)])


def test_batches_mix_many_chunks(store):
    with _reader(store, seed=0, batch_size=64) as r:
        _, rows = _take(r, 1)
    # drawn from a 32-chunk buffer (16 rows each), not from one or two chunks
    assert len(set((rows // store.chunk_rows).tolist())) >= 12


def test_held_out_chunks_never_trained_on(store):
    with _reader(store, seed=2, val_chunks=4) as r:
        held = r.val_chunks
        assert len(held) == 4 and not set(held) & set(r.train_chunks)
        _, rows = _take(r, 3 * r.train_rows // r.batch_size)
        val = r.validation_rows()
    assert not set((rows // store.chunk_rows).tolist()) & set(held)
    assert set((val.rows // store.chunk_rows).tolist()) == set(held)
    assert (_positions(store)[val.rows.numpy()] != 0).all()
    with _reader(store, seed=9, val_chunks=4) as r:
        assert r.val_chunks == held  # the held-out set does not depend on the seed


@pytest.mark.parametrize("k", [0, 1, 5, 17, 18, 19, 40])
def test_state_restore_continues_exactly(store, k):
    with _reader(store, seed=5, batch_size=37) as r:
        _take(r, k) if k else None
        state = json.loads(json.dumps(r.state_dict()))  # what a checkpoint stores
        x1, rows1 = _take(r, 25)
    # the state wins over the arguments
    with _reader(store, seed=123, batch_size=37, buffer_mb=4096, state=state) as r2:
        x2, rows2 = _take(r2, 25)
    assert torch.equal(rows1, rows2) and torch.equal(x1, x2)


def test_non_finite_rows_are_reported_by_row(tmp_path):
    path = make_store(tmp_path / "nan.zarr", n_contexts=8, seq_len=16, chunk_rows=16, poison={37: float("nan")})
    store = Store.open(path)
    # the planned row 37 lands somewhere in its shard (rows are shuffled within shards)
    bad = int(np.flatnonzero(np.concatenate([np.asarray(store.chunk_meta(i).context) for i in range(8)]) == 2)[5])
    with pytest.raises(SaeError, match="NaN or Inf") as e, _reader(store, val_chunks=0, batch_size=16) as r:
        _take(r, 10)
    assert str(bad) in str(e.value)


def test_bad_arguments(store):
    with pytest.raises(SaeError, match=f"no site 'nope'.*{SITE}"):
        ChunkReader(store, "nope", batch_size=4)
    with pytest.raises(SaeError, match="val-chunks"):
        ChunkReader(store, SITE, batch_size=4, val_chunks=100)
    with _reader(store) as r:
        state = r.state_dict()
    state["train_chunks"] = [1000]
    with pytest.raises(SaeError, match="same store"):
        ChunkReader(store, SITE, batch_size=4, state=state)
    with pytest.raises(SaeError, match="divisible by the reader's 3 lane"):
        ChunkReader(store, SITE, batch_size=4, lanes=3)
    with pytest.raises(SaeError, match="divisible by the number of ranks"):
        ChunkReader(store, SITE, batch_size=6, lanes=2, world=4)
    with pytest.raises(SaeError, match="200 reader lanes need at least as many training chunks"):
        ChunkReader(store, SITE, batch_size=200, lanes=200)


class _ChunkLog:
    """Records the chunks `read_rows` reads (the reader's only way to the store's activations)."""

    def __init__(self, monkeypatch):
        self.chunks: set[int] = set()
        real = getattr(reader_mod.read_rows, "real", reader_mod.read_rows)  # not an earlier log's wrapper

        def logged(store, site, i, **kw):
            self.chunks.add(i)
            return real(store, site, i, **kw)

        logged.real = real
        monkeypatch.setattr(reader_mod, "read_rows", logged)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_read_their_lanes_and_make_one_process_batches(store, monkeypatch, world):
    steps = 70  # > one epoch of a lane (~49 chunks of 15 rows, 24 rows a step from each lane)
    with _reader(store, seed=1, batch_size=48, lanes=2) as r:
        x, rows = _take(r, steps)
        lanes = [r.lane_chunks(0), r.lane_chunks(1)]
    # the lanes deal out the training chunks
    assert not set(lanes[0]) & set(lanes[1]) and sorted(lanes[0] + lanes[1]) == r.train_chunks
    assert abs(len(lanes[0]) - len(lanes[1])) <= 1
    xs, ids, read = [], [], []
    for rank in range(world):
        log = _ChunkLog(monkeypatch)
        with _reader(store, seed=1, batch_size=48, lanes=2, rank=rank, world=world) as rr:
            xr, rowsr = _take(rr, steps)
        xs.append(xr.view(steps, -1, xr.shape[1]))
        ids.append(rowsr.view(steps, -1))
        read.append(log.chunks)
    # step by step, the ranks' rows in rank order are the one-process global batch
    assert torch.equal(torch.cat(ids, 1).flatten(), rows)
    assert torch.equal(torch.cat(xs, 1).flatten(0, 1), x)
    # each rank read exactly the chunks of the one lane under its rows: disjoint reads across lanes
    lane_of_rank = [rank * 2 // world for rank in range(world)]
    for rank in range(world):
        assert read[rank] == set(lanes[lane_of_rank[rank]]), rank
    if world == 2:
        assert not read[0] & read[1]
    # within a lane, no row comes twice before the lane's epoch ends
    lane0 = rows.view(steps, 48)[:, :24].flatten().numpy()
    n0 = int(sum((_positions(store)[np.arange(*store.chunk_range(c))] != 0).sum() for c in lanes[0]))
    assert len(np.unique(lane0[:n0])) == n0 and set(lane0[:n0] // store.chunk_rows) == set(lanes[0])


@pytest.mark.parametrize("k", [0, 3, 41])
def test_lane_state_restores_with_another_number_of_ranks(store, k):
    def run(world, rank, state=None):
        with _reader(store, seed=6, batch_size=40, lanes=2, rank=rank, world=world, state=state) as r:
            _take(r, k) if k and state is None else None
            st = json.loads(json.dumps(r.state_dict()))
            return st, _take(r, 20)

    one_state, (x1, rows1) = run(1, 0)
    rank_states = [run(2, rank)[0] for rank in range(2)]
    assert [s["positions"][1 - i] for i, s in enumerate(rank_states)] == [None, None]  # a rank knows its lanes only
    merged = reader_mod.merge_states(rank_states)
    assert merged == one_state
    # one process's checkpoint continued on 2 ranks, and on 4; the rows of a step are the same
    for world in (2, 4):
        parts = [run(world, rank, state=one_state)[1] for rank in range(world)]
        got = torch.cat([p[1].view(20, -1) for p in parts], 1).flatten()
        assert torch.equal(got, rows1), world
        assert torch.equal(torch.cat([p[0].view(20, -1, x1.shape[1]) for p in parts], 1).flatten(0, 1), x1)
    with pytest.raises(SaeError, match="no rank reads reader lane"):
        reader_mod.merge_states(rank_states[:1])


def test_version_1_state_still_restores(store):
    """Checkpoints written before lanes existed (one stream, position at the top level) continue exactly."""
    with _reader(store, seed=5, batch_size=37) as r:
        _take(r, 19)
        state = json.loads(json.dumps(r.state_dict()))
        x1, rows1 = _take(r, 10)
    epoch, phase, offset = state.pop("positions")[0]
    state = {**state, "version": 1, "epoch": epoch, "phase": phase, "offset": offset}
    del state["lanes"]
    with _reader(store, batch_size=37, state=state) as r2:
        x2, rows2 = _take(r2, 10)
    assert torch.equal(rows1, rows2) and torch.equal(x1, x2)


# --------------------------------------------------------------------------------------------------
# Shard files read memory-mapped through the zarr v3 shard index (sae.store.MappedArray).


@pytest.mark.parametrize("codec", ["none", "blosc-zstd"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_mapped_chunks_are_the_zarr_chunks(tmp_path, codec, dtype):
    # 800 rows in chunks of 24: the last chunk and the last shard are partial
    path = make_store(tmp_path / "s.zarr", n_contexts=50, chunk_rows=24, shard_chunks=3, codec=codec, dtype=dtype)
    store = Store.open(path)
    mapped = store.mapped(SITE)
    assert mapped is not None and mapped.raw == (codec == "none")
    for i in range(store.n_chunks):
        a, b = store.chunk_range(i)
        for name in (SITE, "position"):
            got, want = store.read_chunk(name, i), np.asarray(store.array(name)[a:b])
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (name, i)
    first, again = store.read_chunk(SITE, 5), store.read_chunk(SITE, 5)
    if codec == "none":  # zero-copy: views of the one mapping of the shard file
        assert not first.flags.owndata and np.shares_memory(first, again)
    else:  # decoded into the buffer given
        buf = np.zeros((store.chunk_rows, store.d_model), first.dtype)
        assert np.shares_memory(store.read_chunk(SITE, 5, buf), buf) and buf.tobytes() == first.tobytes()


def _stream(store, n=60, **kw):
    with _reader(store, seed=7, batch_size=40, **kw) as r:
        return _take(r, n)


def test_raw_compressed_and_zarr_reads_give_one_stream(tmp_path, monkeypatch):
    kw = dict(n_contexts=60, chunk_rows=16, shard_chunks=4)
    raw = Store.open(make_store(tmp_path / "raw.zarr", codec="none", **kw))
    packed = Store.open(make_store(tmp_path / "packed.zarr", **kw))
    x1, rows1 = _stream(raw)  # > 2 epochs
    x2, rows2 = _stream(packed)
    assert torch.equal(rows1, rows2) and torch.equal(x1, x2)
    # a layout the store module does not map is read through zarr, with the same result
    monkeypatch.setattr(MappedArray, "open", classmethod(lambda cls, root, arr: None))
    plain = Store.open(packed.path)
    assert plain.mapped(SITE) is None
    x3, rows3 = _stream(plain)
    assert torch.equal(rows1, rows3) and torch.equal(x1, x3)


def test_damaged_shard_index_is_one_clear_error(tmp_path):
    path = make_store(tmp_path / "s.zarr", n_contexts=16, chunk_rows=16, shard_chunks=4)
    shard = next((path / "activations" / SITE).rglob("c/*/*"))
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF  # inside the index, before its crc32c
    shard.write_bytes(bytes(data))
    with pytest.raises(SaeError, match="shard index fails its checksum"), _reader(Store.open(path), val_chunks=0) as r:
        _take(r, 40)


@pytest.mark.parametrize("case", ["bfloat16", "float16", "float32", "raw", "two raw sites"])
def test_batches_hold_the_stored_rows(tmp_path, case):
    # Every chunk goes whole into the reader's arena (decoded, or copied from the mapped file if raw) and each batch
    # is gathered from it: the stored values, as float32 or, with float32=False, in the store's dtype. Also when a
    # batch spans several phases, whose loads rewrite arena regions between its pieces.
    sites = ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out") if case == "two raw sites" else (SITE,)
    kw = dict(n_contexts=60, chunk_rows=16, shard_chunks=4, sites=sites)
    if case in ("raw", "two raw sites"):
        kw["codec"] = "none"
    else:
        kw["dtype"] = case
    st = Store.open(make_store(tmp_path / "s.zarr", **kw))
    site = list(sites) if len(sites) > 1 else SITE
    stored = torch.cat([torch.cat([st.chunk(s, i) for s in sites], 1) for i in range(st.n_chunks)])
    for batch_size, lanes in ((40, 1), (40, 2), (400, 1)):
        with _reader(st, site=site, seed=7, batch_size=batch_size, lanes=lanes, threads=2) as r:
            x, rows = _take(r, -(-3 * r.train_rows // batch_size))  # 3 epochs: every arena region reused
            raw = r.next_batch(float32=False)
        assert x.dtype == torch.float32 and torch.equal(x, stored[rows].float()), (batch_size, lanes)
        assert raw.x.dtype == stored.dtype and torch.equal(raw.x, stored[raw.rows])


def test_a_device_gets_the_cpu_stream(tmp_path):
    # On a device, chunks go through staging buffers to the arena there and batches are gathered there
    # (test_cuda_batches_are_the_cpu_stream checks the values on a GPU). The meta device runs that path with shapes
    # and no values: the CPU reader's rows in the same order, in lanes and after a restore.
    st = Store.open(make_store(tmp_path / "s.zarr", n_contexts=60, chunk_rows=16, shard_chunks=4))
    for lanes in (1, 2):
        opts = dict(seed=7, batch_size=40, lanes=lanes, threads=2)
        with _reader(st, **opts) as r:
            _, rows1 = _take(r, 60)  # > 2 epochs
        with _reader(st, device="meta", **opts) as r:
            first = r.next_batch()
            _, rows2 = _take(r, 24)
            state = json.loads(json.dumps(r.state_dict()))
        assert first.x.device.type == "meta" and first.x.dtype == torch.float32 and first.x.shape == (40, st.d_model)
        with _reader(st, device="meta", state=state, **opts) as r:
            _, rows3 = _take(r, 35)
        assert torch.equal(torch.cat([first.rows, rows2, rows3]), rows1)


@pytest.mark.cuda
@pytest.mark.parametrize("codec", ["blosc-zstd", "none"])
def test_cuda_batches_are_the_cpu_stream(tmp_path, codec):
    # On CUDA, chunks (decoded, or raw ones copied from the mapped file) go through pinned staging to the arena on
    # the GPU and the batches are gathered there, on the side stream that also carries the uploads. The batches are
    # the CPU reader's, bit for bit and in order, as float32 on the GPU. Over 3 epochs every arena region is
    # rewritten many times, so a gather that ran after its region's next upload would show; batches of 1024 span
    # several phases, so regions are rewritten between the gathers of one batch.
    st = Store.open(make_store(tmp_path / "s.zarr", codec=codec, n_contexts=100, chunk_rows=32, shard_chunks=4))
    for batch_size, lanes in ((64, 1), (64, 2), (1024, 1)):
        kw = dict(seed=5, batch_size=batch_size, lanes=lanes, threads=3)
        with _reader(st, **kw) as r:
            n = -(-3 * r.train_rows // batch_size)
            x1, rows1 = _take(r, n)
        with _reader(st, device="cuda", **kw) as r:
            batches = [r.next_batch() for _ in range(n)]
        assert all(b.x.is_cuda and b.x.dtype == torch.float32 for b in batches)
        assert torch.equal(torch.cat([b.rows for b in batches]), rows1)
        assert torch.equal(torch.cat([b.x for b in batches]).cpu(), x1)


def test_close_lets_go_of_the_arena(tmp_path):
    # Lanes and reader refer to each other, so without close() dropping them the arena (on a GPU: one and a half
    # buffers in device memory) would wait for the next garbage collection; batches already handed out stay valid.
    st = Store.open(make_store(tmp_path / "s.zarr", n_contexts=60, chunk_rows=16, shard_chunks=4))
    gc.disable()
    try:
        with _reader(st, seed=1, batch_size=40, threads=2) as r:
            x, rows = _take(r, 10)
            arena = weakref.ref(r._arena)
        assert arena() is None
        with pytest.raises(SaeError, match="the reader was closed"):
            r.next_batch()
        assert x.shape == (400, st.d_model) and torch.isfinite(x).all() and len(rows.unique()) == 400
    finally:
        gc.enable()
