"""The store format module (sae.store) on its own: exact round trips, shuffling, markers, finalize, refusals,
the reader API and the on-disk layout that docs/design.md describes ("The store")."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from sae import store
from sae.errors import SaeError

SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
D = 8
SEQ_LEN = 12  # shards of 32 rows do not start on context boundaries
N_CONTEXTS = 9  # 108 rows: shards of 32 (the last 12), chunks of 16 (the last 12)


def make_meta(**kw):
    meta = {
        "model": {"id": "test-model", "revision": None, "sha256": "ab" * 32, "dtype": "float32"},
        "corpus": {"paths": ["/x.jsonl"], "split": None, "text_column": "text", "sha256": "cd" * 32},
        "seq_len": SEQ_LEN,
        "n_contexts_max": None,
        "sites": SITES,
        "d_model": D,
        "dtype": "bfloat16",
        "codec": "blosc-zstd",
        "chunk_rows": 16,
        "shard_rows": 32,
        "seed": 0,
        "shuffle_buffer": 0,
    }
    meta.update(kw)
    return meta


def contexts(n=N_CONTEXTS, seq_len=SEQ_LEN, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 1000, size=(n, seq_len), dtype=np.int32)
    ids[:, 0] = 0  # BOS
    return ids


def activations(n_rows, seed=0):
    """Per-site float32 rows in planned order; BOS-like outliers and a wide range of magnitudes."""
    g = torch.Generator().manual_seed(seed)
    return {
        site: torch.randn(n_rows, D, generator=g) * torch.logspace(-3, 3, D) * (i + 1) for i, site in enumerate(SITES)
    }


def build(path, *, finish=True, shards=None, **kw):
    """A store written shard by shard from known data; returns (writer, input ids, activations)."""
    ids = contexts()
    w = store.init_store(path, make_meta(**kw), iter(ids))
    acts = activations(w.n_rows)
    for s in range(w.n_shards) if shards is None else shards:
        a, b = w.shard_range(s)
        w.write_shard(s, {k: v[a:b] for k, v in acts.items()}, ids.reshape(-1)[a:b])
    if finish:
        store.finalize(path)
    return w, ids, acts


def file_state(path: Path) -> dict[str, tuple[int, str]]:
    return {
        str(f.relative_to(path)): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor, so comparisons are exact (NaN and -0 included)."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def planned_rows(st: store.Store, i: int) -> np.ndarray:
    m = st.chunk_meta(i)
    return np.asarray(m.context) * st.seq_len + np.asarray(m.position)


# --------------------------------------------------------------------------------------------------


def test_bf16_bits_round_trip_exactly():
    specials = torch.tensor(
        [0.0, -0.0, 1.0, -1.5, 3.0e38, -3.0e38, 1e-40, -1e-40, float("inf"), float("-inf"), float("nan")]
    )
    x = torch.cat([specials, torch.randn(1000) * 100]).to(torch.bfloat16)
    stored = store.to_storage(x, "bfloat16")
    assert stored.dtype == np.uint16
    back = store.from_storage(stored, "bfloat16")
    assert back.dtype == torch.bfloat16
    assert torch.equal(bits(back), bits(x))  # bit for bit, NaN and -0 included


@pytest.mark.parametrize(
    "dtype,codec", [("bfloat16", "blosc-zstd"), ("float16", "blosc-zstd"), ("float32", "none"), ("bfloat16", "none")]
)
def test_store_returns_what_was_written(tmp_path, dtype, codec):
    w, ids, acts = build(tmp_path / "s.zarr", dtype=dtype, codec=codec)
    st = store.Store.open(tmp_path / "s.zarr")
    want_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    assert st.n_rows == N_CONTEXTS * SEQ_LEN and st.n_chunks == 7
    for site in SITES:
        expected = acts[site].to(want_dtype)
        for i in range(st.n_chunks):
            got = st.chunk(site, i)
            assert got.dtype == want_dtype and got.shape == (min(16, st.n_rows - 16 * i), D)
            assert torch.equal(bits(got), bits(expected[planned_rows(st, i)]))


def test_codec_none_chunks_are_raw_bytes(tmp_path):
    build(tmp_path / "s.zarr", codec="none", dtype="float32")
    st = store.Store.open(tmp_path / "s.zarr")
    shard_file = tmp_path / "s.zarr" / "activations" / SITES[0] / "c" / "0" / "0"
    raw = shard_file.read_bytes()
    # One shard = its chunks back to back, then the index: memory-mappable at known offsets.
    first = st.chunk_numpy(SITES[0], 0)
    second = st.chunk_numpy(SITES[0], 1)
    assert raw[: first.nbytes] == first.tobytes()
    assert raw[first.nbytes : 2 * first.nbytes] == second.tobytes()
    assert len(raw) < 2 * first.nbytes + 64


def test_rows_are_a_seeded_permutation_within_each_shard(tmp_path):
    w, ids, _ = build(tmp_path / "a.zarr")
    st = store.Store.open(tmp_path / "a.zarr")
    rows = np.concatenate([planned_rows(st, i) for i in range(st.n_chunks)])
    tokens = np.concatenate([np.asarray(st.chunk_meta(i).tokens) for i in range(st.n_chunks)])
    for s in range(w.n_shards):
        a, b = w.shard_range(s)
        shard = rows[a:b]
        assert sorted(shard) == list(range(a, b))  # every row of the shard exactly once, none from elsewhere
        assert np.array_equal(shard, a + w.permutation(s))
    assert not np.array_equal(rows, np.arange(len(rows)))  # actually shuffled
    assert np.array_equal(tokens, ids.reshape(-1)[rows])  # tokens follow their rows
    # The permutation depends on the seed only: another store with the same seed has the same order.
    build(tmp_path / "b.zarr")
    same = store.Store.open(tmp_path / "b.zarr")
    assert np.array_equal(np.asarray(same.array("context")[:]), np.asarray(st.array("context")[:]))
    build(tmp_path / "c.zarr", seed=1)
    other = store.Store.open(tmp_path / "c.zarr")
    assert not np.array_equal(np.asarray(other.array("position")[:]), np.asarray(st.array("position")[:]))


def test_marker_only_after_the_whole_shard(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    w, ids, acts = build(path, finish=False, shards=[])
    a, b = w.shard_range(1)
    real = store.checksum
    calls = []

    def failing(arr):
        calls.append(1)
        if len(calls) == 3:  # after both sites' data, before the token/context/position arrays
            raise OSError("disk full")
        return real(arr)

    monkeypatch.setattr(store, "checksum", failing)
    with pytest.raises(OSError, match="disk full"):
        w.write_shard(1, {k: v[a:b] for k, v in acts.items()}, ids.reshape(-1)[a:b])
    assert w.done() == set() and not list(path.glob("markers/*"))
    monkeypatch.setattr(store, "checksum", real)
    # A torn shard file (a write killed halfway) is simply replaced by the rewrite.
    shard_file = path / "activations" / SITES[0] / "c" / "0" / "0"
    w.write_shard(0, {k: v[0:32] for k, v in acts.items()}, ids.reshape(-1)[0:32])
    shard_file.write_bytes(shard_file.read_bytes()[:50])
    for s in range(w.n_shards):
        a, b = w.shard_range(s)
        w.write_shard(s, {k: v[a:b] for k, v in acts.items()}, ids.reshape(-1)[a:b])
    assert w.done() == set(range(w.n_shards))
    markers = sorted((path / "markers").iterdir())
    assert [m.name for m in markers] == [f"shard-{s:05d}.json" for s in range(w.n_shards)]  # no temp files left
    for m in markers:
        assert set(json.loads(m.read_text())) == {"shard", "start", "stop", "checksums", "stats"}
    st = store.finalize(path)
    assert torch.equal(st.chunk(SITES[0], 0), acts[SITES[0]].to(torch.bfloat16)[planned_rows(st, 0)])


def test_finalize_names_the_missing_shards(tmp_path):
    path = tmp_path / "s.zarr"
    build(path, finish=False, shards=[0, 2])
    with pytest.raises(SaeError, match=r"2 of 4 shards are not finished \(shards 1, 3\)"):
        store.finalize(path)
    assert not (path / "manifest.json").exists()
    with pytest.raises(SaeError, match="not finished: 2 of 4 shards"):
        store.Store.open(path)
    assert store.Store.open(path, finalized=False).complete_chunks() == []


def test_other_settings_are_refused_and_nothing_changes(tmp_path):
    path = tmp_path / "s.zarr"
    build(path)
    before = file_state(path)

    def never():
        raise AssertionError("the corpus must not be read when the store exists")
        yield

    with pytest.raises(SaeError, match=r"different settings \(seq_len: store has 12, this run 16\).*--overwrite"):
        store.init_store(path, make_meta(seq_len=16), never())
    with pytest.raises(SaeError, match="sites: store has"):
        store.init_store(path, make_meta(sites=SITES[:1]), never())
    assert file_state(path) == before
    # The same settings reopen it (a resume) without reading the corpus.
    w = store.init_store(path, make_meta(), never())
    assert w.done() == set(range(4))
    assert file_state(path) == before
    # --overwrite starts afresh.
    w = store.init_store(path, make_meta(seq_len=16), iter(contexts(seq_len=16)), overwrite=True)
    assert w.done() == set() and w.n_rows == N_CONTEXTS * 16 and not (path / "manifest.json").exists()


def test_refuses_folders_that_are_not_stores(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(SaeError, match="not an activation store"):
            store.init_store(folder, make_meta(), iter(contexts()), overwrite=overwrite)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaeError, match="not a folder"):
        store.init_store(tmp_path / "file", make_meta(), iter(contexts()))
    with pytest.raises(SaeError, match="is not an activation store"):
        store.Store.open(folder)


def test_empty_corpus_leaves_nothing_behind(tmp_path):
    with pytest.raises(SaeError, match="gave no context"):
        store.init_store(tmp_path / "s.zarr", make_meta(), iter([]))
    assert not (tmp_path / "s.zarr").exists()


def test_killed_init_is_redone(tmp_path):
    path = tmp_path / "s.zarr"
    # What a SIGKILL during init leaves: the group with its attributes, part of the arrays, no plan.
    zarr.create_group(store=str(path), attributes={"sae_store": {"format_version": 1, **make_meta()}})
    (path / "input_ids").mkdir()
    (path / "input_ids" / "junk").write_bytes(b"half")
    with pytest.raises(SaeError, match="different settings"):
        store.init_store(path, make_meta(seed=5), iter(contexts()))
    assert (path / "input_ids" / "junk").exists()
    w = store.init_store(path, make_meta(), iter(contexts()))
    assert w.n_rows == N_CONTEXTS * SEQ_LEN and not (path / "input_ids" / "junk").exists()


def test_concurrent_init_runs_once_and_others_wait(tmp_path):
    path = tmp_path / "s.zarr"
    started = threading.Event()
    consumed = {"a": 0, "b": 0}

    def slow(name):
        for row in contexts():
            consumed[name] += 1
            started.set()
            time.sleep(0.02)
            yield row

    results = {}

    def run(name):
        results[name] = store.init_store(path, make_meta(), slow(name))

    ta = threading.Thread(target=run, args=("a",))
    ta.start()
    started.wait(5)
    tb = threading.Thread(target=run, args=("b",))
    tb.start()
    ta.join(10)
    tb.join(10)
    assert consumed == {"a": N_CONTEXTS, "b": 0}  # b waited on the lock and reused a's plan
    assert results["a"].plan == results["b"].plan
    assert (path / ".init.lock").exists()
    assert np.array_equal(store.Store.open(path, finalized=False).input_ids[:], contexts())


def test_reader_api(tmp_path):
    w, ids, acts = build(tmp_path / "s.zarr")
    st = store.Store.open(tmp_path / "s.zarr")
    assert st.sites == SITES and st.d_model == D and st.seq_len == SEQ_LEN and st.chunk_rows == 16
    assert st.n_rows == 108 and st.n_chunks == 7 and st.n_contexts == N_CONTEXTS
    assert st.attrs["model"]["id"] == "test-model" and st.attrs["dtype"] == "bfloat16"
    assert st.complete_chunks() == list(range(7))
    assert np.array_equal(st.input_ids[:], ids)
    last = st.chunk_meta(6)
    assert len(last.tokens) == len(last.context) == len(last.position) == 12
    assert last.tokens.dtype == np.int32 and last.context.dtype == np.int64 and last.position.dtype == np.int32
    with pytest.raises(IndexError):
        st.chunk(SITES[0], 7)
    with pytest.raises(SaeError, match="no site 'blocks.9.hook_resid_post'.*blocks.0.hook_resid_post"):
        st.chunk("blocks.9.hook_resid_post", 0)
    # Statistics over the stored (bf16-rounded) values, with and without the BOS rows.
    position = np.arange(108) % SEQ_LEN
    for site in SITES:
        x = acts[site].to(torch.bfloat16).double()
        for skip_bos, keep in ((False, np.ones(108, bool)), (True, position != 0)):
            xs = x[torch.from_numpy(keep)]
            s = st.stats(site, skip_bos=skip_bos)
            mean = xs.mean(0)
            assert s.n_rows == int(keep.sum()) and s.mean.dtype == torch.float32
            torch.testing.assert_close(s.mean.double(), mean, rtol=1e-6, atol=1e-6)
            assert s.mean_norm == pytest.approx(float(xs.norm(dim=1).mean()), rel=1e-9)
            assert s.variance == pytest.approx(float(((xs - mean) ** 2).sum(1).mean()), rel=1e-6)
    assert st.disk_bytes() > st.disk_bytes(*SITES) > st.disk_bytes(SITES[0]) > 0


def test_disk_layout_is_the_documented_one(tmp_path):
    path = tmp_path / "run.zarr"
    build(path)
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]["sae_store"]
    assert attrs["format_version"] == 1 and "tool_version" in attrs
    for key in store.FINGERPRINT_KEYS:
        assert key in attrs
    g = zarr.open_group(path, mode="r")
    for site in SITES:
        a = g[f"activations/{site}"]
        assert a.shape == (108, D) and a.dtype == np.uint16 and a.chunks == (16, D) and a.shards == (32, D)
        assert a.attrs["logical_dtype"] == "bfloat16"
        # One file per shard, named by the shard's index.
        files = sorted(
            p.relative_to(path / "activations" / site).as_posix()
            for p in (path / "activations" / site / "c").rglob("*")
        )
        assert files == ["c/0", "c/0/0", "c/1", "c/1/0", "c/2", "c/2/0", "c/3", "c/3/0"]  # fmt: skip
    for name, dtype in (("tokens", np.int32), ("context", np.int64), ("position", np.int32)):
        a = g[name]
        assert a.shape == (108,) and a.dtype == dtype and a.chunks == (16,) and a.shards == (32,)
    assert g["input_ids"].shape == (N_CONTEXTS, SEQ_LEN) and g["input_ids"].dtype == np.int32
    plan = json.loads((path / "plan.json").read_text())
    assert plan["n_rows"] == 108 and plan["n_shards"] == 4 and plan["n_contexts"] == N_CONTEXTS
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["n_rows"] == 108 and [s["index"] for s in manifest["shards"]] == [0, 1, 2, 3]
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 32), (32, 64), (64, 96), (96, 108)]
    assert set(manifest["shards"][0]["checksums"]) == {*SITES, "tokens", "context", "position"}
    assert set(manifest["stats"][SITES[0]]) == {"all", "no_bos", "norms"}
    assert sorted(p.name for p in (path / "markers").iterdir()) == [f"shard-{s:05d}.json" for s in range(4)]


# --------------------------------------------------------------------------------------------------
# Norm statistics and massive rows


def planted(path, *, shard_rows, n_contexts=40, seq_len=16, factor=5.0):
    """A one-site store of unit-scale rows with massive rows planted at known places; returns (stored rows as
    float64 in planned order, token ids, planted rows)."""
    d = 8
    meta = make_meta(
        sites=[SITES[0]], seq_len=seq_len, chunk_rows=32, shard_rows=shard_rows, massive_factor=factor, d_model=d
    )
    rng = np.random.default_rng(3)
    ids = rng.integers(10, 60, size=(n_contexts, seq_len), dtype=np.int32)
    ids[:, 0] = 0
    n = n_contexts * seq_len
    x = torch.from_numpy(rng.normal(size=(n, d)) + 0.5).float()
    x[::seq_len] *= 50  # BOS rows: huge, but never counted as massive (statistics are over non-BOS rows)
    rows = [c * seq_len + 1 for c in range(0, n_contexts, 2)] + [c * seq_len + 7 for c in range(0, n_contexts, 8)]
    ids.reshape(-1)[rows[:12]] = 5  # most planted rows share token 5
    x[rows] *= 40
    w = store.init_store(path, meta, iter(ids))
    for s in range(w.n_shards):
        a, b = w.shard_range(s)
        w.write_shard(s, {SITES[0]: x[a:b]}, ids.reshape(-1)[a:b])
    store.finalize(path)
    return x.to(torch.bfloat16).double().numpy(), ids.reshape(-1), rows


@pytest.mark.parametrize("shard_rows", [640, 160])
def test_planted_massive_rows_are_counted_exactly(tmp_path, shard_rows):
    x, tokens, rows = planted(tmp_path / "s.zarr", shard_rows=shard_rows)
    st = store.Store.open(tmp_path / "s.zarr")
    ns = st.norm_stats(SITES[0])
    position = np.arange(len(x)) % 16
    keep = position != 0
    norms = np.linalg.norm(x[keep], axis=1)
    # Quantiles within half a histogram bin of the exact order statistics; the maximum exact.
    assert ns["n_rows"] == keep.sum()
    assert ns["median"] == pytest.approx(np.quantile(norms, 0.5, method="inverted_cdf"), rel=0.006)
    assert ns["p99"] == pytest.approx(np.quantile(norms, 0.99, method="inverted_cdf"), rel=0.006)
    assert ns["max"] == pytest.approx(norms.max(), rel=1e-12)
    m = ns["massive"]
    assert m["factor"] == 5.0 and m["exact"]
    assert m["count"] == len(rows) and m["share_rows"] == pytest.approx(len(rows) / keep.sum())
    mean = x[keep].mean(0)
    dev = ((x[keep] - mean) ** 2).sum(1)
    want = ((x[rows] - mean) ** 2).sum(1).sum() / dev.sum()
    # Exact with one shard; across shards the cross term uses each shard's own mean.
    assert m["share_variance"] == pytest.approx(want, rel=1e-9 if shard_rows == 640 else 0.01)
    assert m["positions"] == [[1, 20], [7, 5]]
    top = m["tokens"][0]
    assert top["id"] == 5 and top["count"] == 12 and top["occurrences"] == int((tokens[keep] == 5).sum())
    assert sum(t["count"] for t in m["tokens"]) == len(rows)
    by = {f["factor"]: f for f in ns["by_factor"]}
    assert by[3.0]["count"] == by[5.0]["count"] == len(rows)


def test_massive_factor_is_the_store_setting(tmp_path):
    planted(tmp_path / "s.zarr", shard_rows=640, factor=100.0)
    m = store.Store.open(tmp_path / "s.zarr").norm_stats(SITES[0])["massive"]
    assert m["factor"] == 100.0 and m["count"] == 0 and m["positions"] == [] and m["tokens"] == []


def test_stores_without_norm_statistics_still_open(tmp_path):
    build(tmp_path / "s.zarr")
    path = tmp_path / "s.zarr"
    manifest = json.loads((path / "manifest.json").read_text())
    for site in manifest["stats"]:
        del manifest["stats"][site]["norms"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    st = store.Store.open(path)
    assert st.norm_stats(SITES[0]) is None and st.stats(SITES[0]).n_rows == 108


def test_harvest_summary_prints_the_norm_statistics(tmp_path):
    from sae.harvest import summary

    planted(tmp_path / "s.zarr", shard_rows=640)
    text = "\n".join(summary(tmp_path / "s.zarr", 1.0, 0, decode=lambda ids: f"tok{ids[0]}"))
    assert f"{SITES[0]}:" in text and "row norms      over 600 non-BOS rows: median" in text
    assert "massive rows   norm > 5 × median" in text and "25 rows (4.17 % of rows)" in text
    assert "at positions 1 (80 %), 7 (20 %)" in text and "'tok5' (#5) ×12" in text
