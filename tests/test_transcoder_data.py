"""A transcoder's data: its input and target sites read row-aligned by the chunk reader, and the one-line errors
for a target site the store lacks or a skip connection onto the input itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _synthetic import make_store

from sae.config import TrainConfig
from sae.errors import SaeError
from sae.store import Store, from_storage
from sae.train.reader import ChunkReader
from sae.train.rundir import store_identity, target_site

SITES = ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")


@pytest.mark.parametrize("codec", ["blosc-zstd", "none"])
def test_reader_gives_both_sites_row_aligned(tmp_path, codec):
    st = Store.open(make_store(tmp_path / "s.zarr", d=8, sites=SITES, codec=codec))
    full = {s: from_storage(np.asarray(st.array(s)[:]), st.dtype).float() for s in SITES}
    kw = dict(batch_size=32, seed=3, val_chunks=1, buffer_mb=0.001, threads=2)
    with ChunkReader(st, list(SITES), **kw) as both, ChunkReader(st, SITES[0], **kw) as one:
        assert both.sites == list(SITES) and both.width == 16
        for _ in range(5):
            b, a = both.next_batch(), one.next_batch()
            assert b.x.shape == (32, 16)
            assert torch.equal(b.rows, a.rows)  # the same stream, only wider
            assert torch.equal(b.x[:, :8], full[SITES[0]][b.rows]) and torch.equal(b.x[:, 8:], full[SITES[1]][b.rows])
        state = both.state_dict()
        want = both.next_batch()
        val = both.validation_rows()
        assert val.x.shape[1] == 16 and torch.equal(val.x[:, 8:].float(), full[SITES[1]][val.rows])
        assert both.sample_rows(50).shape == (50, 16)
    assert state["site"] == list(SITES)
    with ChunkReader(st, list(SITES), **kw, state=state) as again:
        got = again.next_batch()
        assert torch.equal(got.x, want.x) and torch.equal(got.rows, want.rows)
    with pytest.raises(SaeError, match="the checkpoint read site"):
        ChunkReader(st, SITES[0], **kw, state=state)
    with pytest.raises(SaeError, match="has no site 'blocks.0.hook_resid_mid'"):
        ChunkReader(st, [SITES[0], "blocks.0.hook_resid_mid"], **kw)


def test_non_finite_rows_of_the_target_are_named(tmp_path):
    st = Store.open(make_store(tmp_path / "s.zarr", d=8, sites=SITES, poison={70: float("nan")}))
    from sae.train.reader import read_rows

    with pytest.raises(SaeError, match=r"site blocks.0.ln2.hook_normalized \+ blocks.0.hook_mlp_out: .*store rows"):
        for c in range(st.n_chunks):  # (rows are permuted within their shard)
            read_rows(st, list(SITES), c, keep_bos=True)


def test_target_site_errors(tmp_path):
    path = make_store(tmp_path / "s.zarr", d=8, sites=SITES)
    st = Store.open(path)

    def cfg(**kw):
        return TrainConfig(store=path, site=SITES[0], **kw)

    assert target_site(cfg(), st, SITES[0]) is None
    assert target_site(cfg(target_site=SITES[1], skip=True), st, SITES[0]) == SITES[1]
    assert target_site(cfg(target_site=SITES[0]), st, SITES[0]) == SITES[0]  # no skip: an SAE-like transcoder
    with pytest.raises(SaeError, match="--target-site 'blocks.0.hook_resid_post': store .* has no such site; its"):
        target_site(cfg(target_site="blocks.0.hook_resid_post"), st, SITES[0])
    with pytest.raises(SaeError, match="--skip with --target-site equal to --site"):
        target_site(cfg(target_site=SITES[0], skip=True), st, SITES[0])
    with pytest.raises(SaeError, match="give --target-site too"):
        target_site(cfg(skip=True), st, SITES[0])
    assert "target_site" not in store_identity(st, SITES[0])
    assert store_identity(st, SITES[0], SITES[1])["target_site"] == SITES[1]
