"""Whole-store tools on dask: `sae stats`, `sae validate`, `sae concat` (stores written directly with sae.store)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from sae import store
from sae.cli import main
from sae.errors import SaeError
from sae.storetools import concat_stores, store_stats, validate_store

SITE = "blocks.1.hook_resid_post"


def make_store(path, *, n_contexts=10, seq_len=7, d=16, chunk_rows=8, shard_chunks=2, dtype="bfloat16", seed=0,
               corpus="a", poison=False):  # fmt: skip
    """A finalized store of random activations; returns (planned-order activations as float64, input_ids)."""
    meta = {
        "model": {"id": "tiny", "revision": None, "sha256": None, "dtype": "float32"},
        "corpus": {"id": corpus, "split": "train", "text_column": "text", "sha256": corpus},
        "seq_len": seq_len, "n_contexts_max": None, "sites": [SITE], "d_model": d, "dtype": dtype,
        "codec": "blosc-zstd", "chunk_rows": chunk_rows, "shard_rows": chunk_rows * shard_chunks, "seed": seed,
    }  # fmt: skip
    rng = np.random.default_rng(seed + 100)
    ids = rng.integers(1, 300, (n_contexts, seq_len), dtype=np.int32)
    writer = store.init_store(path, meta, iter(ids))
    n = n_contexts * seq_len
    x = torch.from_numpy(rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)).float()
    x[::seq_len] *= 20  # BOS rows are big, as in real models
    if poison:
        x[3, 2], x[11, 5], x[12, 5] = float("nan"), float("inf"), float("-inf")
    for s in range(writer.n_shards):
        a, b = writer.shard_range(s)
        writer.write_shard(s, {SITE: x[a:b]}, ids.reshape(-1)[a:b])
    store.finalize(path)
    # What the store holds, in logical units: rounded to the storage dtype.
    return x.to(getattr(torch, dtype)).double().numpy(), ids


def planned(path):
    """All rows of a store in planned (context-major) order, from its stored order and context/position."""
    st = store.Store.open(path)
    order = np.argsort(st.array("context")[:] * st.seq_len + st.array("position")[:])
    x = store.from_storage(st.array(SITE)[:], st.dtype).double().numpy()
    return x[order], st.array("tokens")[:][order]


def test_stats_match_numpy_and_the_manifest(tmp_path):
    # Shards of 2048 rows, each summed in several blocks, the last shard short.
    x, _ = make_store(tmp_path / "s.zarr", n_contexts=700, chunk_rows=512, shard_chunks=4)
    recorded = store.read_manifest(tmp_path / "s.zarr")["stats"][SITE]
    for skip_bos in (False, True):
        ref = x[np.arange(len(x)) % 7 != 0] if skip_bos else x
        s = store_stats(tmp_path / "s.zarr", skip_bos=skip_bos)[SITE]
        mean = ref.mean(0)
        assert s.n_rows == len(ref)
        np.testing.assert_allclose(s.mean, mean, rtol=1e-10, atol=1e-12)
        assert s.mean_norm == pytest.approx(np.linalg.norm(ref, axis=1).mean(), rel=1e-10)
        assert s.variance == pytest.approx(((ref - mean) ** 2).sum(1).mean(), rel=1e-9)
        np.testing.assert_array_equal(s.max, ref.max(0))
        assert s.nonfinite == 0
        # The harvest's own statistics code over the same shards: the manifest's numbers to the last bit.
        manifest = recorded["no_bos" if skip_bos else "all"]
        assert (s.n_rows, s.mean.tolist(), s.mean_norm, s.variance) == (
            manifest["n_rows"], manifest["mean"], manifest["mean_norm"], manifest["variance"]
        )  # fmt: skip
    assert s.norms == recorded["norms"]


def test_stats_count_nan_and_inf_and_print_json(tmp_path):
    x, _ = make_store(tmp_path / "s.zarr", dtype="float32", poison=True)
    s = store_stats(tmp_path / "s.zarr")[SITE]
    assert s.nonfinite == 3
    assert np.isnan(s.mean[2]) and np.isnan(s.mean_norm)
    assert s.max[5] == np.inf and s.max[2] == np.nanmax(x[:, 2])  # NaNs ignored by the max
    r = CliRunner().invoke(main, ["stats", str(tmp_path / "s.zarr"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)[SITE]
    assert out["nonfinite"] == 3 and out["mean_norm"] is None and len(out["max"]) == 16
    r = CliRunner().invoke(main, ["stats", str(tmp_path / "s.zarr"), "--site", "blocks.9.hook_mlp_out"])
    assert r.exit_code == 2 and "has no site 'blocks.9.hook_mlp_out'" in r.output


def _validate(path):
    r = CliRunner().invoke(main, ["validate", str(path)])
    return r.exit_code, r.output


def test_validate_accepts_a_good_store_and_finds_damage(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    assert validate_store(path) == []
    code, out = _validate(path)
    assert code == 0 and "valid" in out

    # A corrupted shard file of the activations (shard 2 = rows 32..47): bytes flipped in the middle.
    shard_file = path / "activations" / SITE / "c" / "2" / "0"
    data = bytearray(shard_file.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    # A missing marker, and a manifest whose row count disagrees with the plan.
    store.marker_path(path, 1).unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["n_rows"] += 7
    (path / "manifest.json").write_text(json.dumps(manifest))

    code, out = _validate(path)
    assert code == 1, out
    assert "shard 2 of blocks.1.hook_resid_post" in out
    assert "shard 1: no marker" in out
    assert "manifest: n_rows is 77, the plan says 70" in out
    assert "shard 0" not in out and "shard 3" not in out and "shard 4" not in out


def test_validate_finds_a_changed_row_and_a_wrong_marker_range(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    arr = zarr.open_group(path, mode="r+")["tokens"]
    arr[40] = arr[40] + 1  # shard 2, a whole-shard rewrite by zarr
    marker = json.loads(store.marker_path(path, 4).read_text())
    marker["stop"] -= 1
    store.marker_path(path, 4).write_text(json.dumps(marker))
    problems = validate_store(path)
    assert "shard 2 of tokens: checksum mismatch (the data differs from what was written)" in problems
    assert "shard 4: marker covers rows 64..69, plan 64..70" in problems
    assert len(problems) == 2, problems


def test_concat_is_the_parts_in_order_and_a_valid_store(tmp_path):
    xa, ida = make_store(tmp_path / "a.zarr", n_contexts=10, seed=1, corpus="a")
    xb, idb = make_store(tmp_path / "b.zarr", n_contexts=5, seed=2, corpus="b")
    r = CliRunner().invoke(
        main, ["concat", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "--out", str(tmp_path / "ab.zarr")]
    )
    assert r.exit_code == 0, r.output
    out = store.Store.open(tmp_path / "ab.zarr")
    assert out.n_rows == 105 and out.n_contexts == 15 and out.shard_rows == 16
    assert out.attrs["corpus"] == {"concat": [store.read_attrs(tmp_path / p)["corpus"] for p in ("a.zarr", "b.zarr")]}
    x, tokens = planned(tmp_path / "ab.zarr")
    np.testing.assert_array_equal(x, np.concatenate([xa, xb]))
    np.testing.assert_array_equal(tokens, np.concatenate([ida, idb]).reshape(-1))
    np.testing.assert_array_equal(out.input_ids[:], np.concatenate([ida, idb]))
    assert validate_store(tmp_path / "ab.zarr") == []
    ref = np.concatenate([xa, xb])
    assert out.stats(SITE).mean_norm == pytest.approx(np.linalg.norm(ref, axis=1).mean(), rel=1e-6)
    # Rows of the new store are shuffled within its own shards.
    assert not np.array_equal(out.array("position")[:16], np.arange(16) % 7)


def test_concat_reshards_and_refuses_mismatched_parts(tmp_path):
    x, _ = make_store(tmp_path / "a.zarr", seed=3)
    concat_stores([tmp_path / "a.zarr"], tmp_path / "r.zarr", chunk_rows=4, shard_chunks=3)
    out = store.Store.open(tmp_path / "r.zarr")
    assert (out.chunk_rows, out.shard_rows, len(out.manifest["shards"])) == (4, 12, 6)
    np.testing.assert_array_equal(planned(tmp_path / "r.zarr")[0], x)
    make_store(tmp_path / "wide.zarr", d=8)
    with pytest.raises(SaeError, match="differ in d_model: 16 vs 8"):
        concat_stores([tmp_path / "a.zarr", tmp_path / "wide.zarr"], tmp_path / "bad.zarr")
    with pytest.raises(SaeError, match="is one of the input stores"):
        concat_stores([tmp_path / "a.zarr"], tmp_path / "a.zarr")


def test_progress_lines_and_summaries_in_a_batch_log(tmp_path, monkeypatch):
    """Without a terminal, each tool writes a start line, a line per interval and an end line to stderr, then its
    summary paragraph to stdout."""
    make_store(tmp_path / "a.zarr")  # 70 rows of 16-row shards: 5 shards
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAE_PROGRESS_INTERVAL", "30")  # restored after the test (--progress-interval sets it)
    runner = CliRunner()
    for args, done in (
        (["stats", "a.zarr"], "stats: done in "),
        (["validate", "a.zarr"], "validate: done in "),
        (["concat", "a.zarr", "--out", "b.zarr"], "concat: done in "),
    ):
        r = runner.invoke(main, ["--progress-interval", "0.000001", *args])
        assert r.exit_code == 0, r.output
        err = r.stderr.splitlines()
        stage = args[0]
        # every tool counts the store's shards, whatever arrays it reads per shard (stats a site, validate all 4)
        assert err[0] == f"{stage}: started, 5 shards", err
        assert err[-1].startswith(f"{stage}: 5/5 shards (100.0%) "), err
        assert any(line.startswith(f"{stage}: ") and "/s ETA " in line for line in err), err
        assert err[-1].startswith(f"{stage}: ") and " in 0:00:" in err[-1], err
        out = r.stdout.splitlines()
        assert out[0].startswith(done) and all(line.startswith("  ") for line in out[1:]), out


def test_stats_report_the_manifest_norm_statistics_and_recompute_them_for_old_stores(tmp_path):
    path = tmp_path / "s.zarr"
    seq_len, d = 7, 16
    meta = {
        "model": {"id": "tiny", "revision": None, "sha256": None, "dtype": "float32"},
        "corpus": {"id": "a", "split": "train", "text_column": "text", "sha256": "a"},
        "seq_len": seq_len, "n_contexts_max": None, "sites": [SITE], "d_model": d, "dtype": "float32",
        "codec": "blosc-zstd", "chunk_rows": 8, "shard_rows": 16, "seed": 0,
    }  # fmt: skip
    rng = np.random.default_rng(1)
    ids = rng.integers(10, 300, (12, seq_len), dtype=np.int32)
    x = torch.from_numpy(rng.normal(size=(12 * seq_len, d))).float()
    rows = np.arange(0, 12, 3) * seq_len + 2
    x[rows] *= 30
    ids.reshape(-1)[rows] = 7
    writer = store.init_store(path, meta, iter(ids))
    for s in range(writer.n_shards):
        a, b = writer.shard_range(s)
        writer.write_shard(s, {SITE: x[a:b]}, ids.reshape(-1)[a:b])
    store.finalize(path)
    recorded = store.Store.open(path).norm_stats(SITE)
    s = store_stats(path)[SITE]
    assert s.norms == recorded  # the same functions over the same shards: identical numbers
    m = s.norms["massive"]
    assert m["count"] == len(rows) and m["positions"] == [[2, len(rows)]]
    assert m["tokens"][0]["id"] == 7 and m["tokens"][0]["count"] == len(rows)
    assert m["tokens"][0]["occurrences"] == int((ids[:, 1:] == 7).sum())
    assert store_stats(path, massive_factor=1000.0)[SITE].norms["massive"]["count"] == 0
    # A store finalized before norm statistics existed: sae stats computes them all the same.
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["stats"][SITE]["norms"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert store.Store.open(path).norm_stats(SITE) is None
    assert store_stats(path)[SITE].norms == recorded
    r = CliRunner().invoke(main, ["stats", str(path)])
    assert r.exit_code == 0, r.output
    assert "massive rows   norm > 3 × median" in r.output and f"{len(rows)} rows" in r.output
    assert "at positions 2 (100 %)" in r.output and "#7 ×4" in r.output
    r = CliRunner().invoke(main, ["stats", str(path), "--json"])
    assert json.loads(r.stdout)[SITE]["norms"]["massive"]["count"] == len(rows)
    r = CliRunner().invoke(main, ["stats", str(path), "--massive-factor", "-1"])
    assert r.exit_code == 2 and "--massive-factor must be positive" in r.output
