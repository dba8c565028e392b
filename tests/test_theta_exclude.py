"""θ calibrated on held-out rows hits k on other held-out rows; rows left out of training (massive rows,
positions, token ids) are counted exactly and recorded in the SAE's metadata `exclude`."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _synthetic import SITE, make_store, sparse_data
from click.testing import CliRunner

from sae import cli
from sae.config import TrainConfig
from sae.errors import SaeError
from sae.rowtypes import exclusion_from_metadata
from sae.saedir import load_sae
from sae.store import Store
from sae.train import train as run_train
from sae.train import trainer
from sae.train.reader import ChunkReader, Rows
from sae.train.validate import VAL_MAX_ROWS

ROOT = Path(__file__).resolve().parents[1]

MASSIVE_POSITION = 7
"""Every row at this position is planted 20× longer than the others."""


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    # 32768 rows (2048 contexts of 16) in 64 chunks of 512, d=32, from a dictionary of 128 directions, 4 active
    return make_store(tmp_path_factory.mktemp("theta") / "s.zarr", d=32, n_contexts=2048, seq_len=16, chunk_rows=512)


@pytest.fixture(scope="module")
def massive_store(tmp_path_factory):
    base = sparse_data(16)

    def data(n, position, shard):
        x = base(n, position, shard)
        x[torch.from_numpy(position == MASSIVE_POSITION)] *= 20
        return x

    def tokens(rows):
        return rows * 7919 % 97 + 1  # every id in 1..97, about 1 row in 97 each

    path = tmp_path_factory.mktemp("massive") / "m.zarr"
    return make_store(path, d=16, n_contexts=400, seq_len=16, data=data, tokens=tokens)


def _val_rows(d):
    return [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines() if '"val"' in line]


def _held_out_halves(store, site, val_chunks):
    with ChunkReader(Store.open(store), site, batch_size=64, val_chunks=val_chunks) as r:
        held = r.validation_rows(2 * VAL_MAX_ROWS)
    return held.x[0::2].float(), held.x[1::2].float()


def test_calibrated_theta_hits_k_on_other_held_out_rows(big_store, tmp_path):
    k = 8
    base = dict(store=big_store, site=SITE, k=(k,), dict_size=(256,), batch_size=512, tokens=512 * 120)
    (d,) = run_train(TrainConfig(**base, out=tmp_path / "cal", val_chunks=32, device="cpu"))
    (e,) = run_train(TrainConfig(**base, out=tmp_path / "ema", val_chunks=32, theta="ema", device="cpu"))
    val_half, cal_half = _held_out_halves(big_store, SITE, 32)
    assert len(val_half) > 7000 and len(cal_half) > 7000

    sae = load_sae(d)
    meta = sae.cfg.metadata
    assert meta["theta_mode"] == "calibrated" and meta["theta_calibration_rows"] == len(cal_half)
    assert sae.cfg.theta == meta["theta_calibrated"] and torch.all(sae.threshold == sae.cfg.theta)
    with torch.no_grad():
        # on the calibration rows exactly k per row; on the other held-out rows within ±2 % of k
        assert (sae.encode(cal_half) > 0).sum().item() == round(k * len(cal_half))
        l0 = (sae.encode(val_half) > 0).float().sum(1).mean().item()
    assert abs(l0 - k) <= 0.02 * k, l0
    assert abs(_val_rows(d)[-1]["l0_theta"] - l0) < 1e-4  # the logged θ-mode L0 is that of the exported θ

    # --theta ema exports the EMA (the same run: the EMA of both runs is the same), which misses k by more
    ema = load_sae(e)
    assert ema.cfg.metadata["theta_mode"] == "ema" and ema.cfg.theta == pytest.approx(meta["theta_ema"])
    assert ema.cfg.metadata["theta_calibrated"] == pytest.approx(sae.cfg.theta)
    with torch.no_grad():
        l0_ema = (ema.encode(val_half) > 0).float().sum(1).mean().item()
    assert abs(l0_ema - k) > abs(l0 - k)


def test_calibrated_theta_needs_held_out_rows(big_store, tmp_path):
    with pytest.raises(SaeError, match="--val-chunks"):
        run_train(TrainConfig(store=big_store, site=SITE, out=tmp_path / "o", val_chunks=0, device="cpu"))
    assert not (tmp_path / "o").exists()


def _expected_excluded(store_path, factor, positions, tokens, val_chunks):
    """Rows of the training chunks (BOS dropped) that the exclusions cover, counted straight from the store."""
    store = Store.open(store_path)
    with ChunkReader(store, SITE, batch_size=64, val_chunks=val_chunks) as r:
        chunks = r.train_chunks
    threshold = factor * store.norm_stats(SITE)["median"]
    hit = train_rows = 0
    for c in chunks:
        a, b = store.chunk_range(c)
        x = store.chunk(SITE, c).float()
        pos = np.asarray(store.array("position")[a:b])
        tok = np.asarray(store.array("tokens")[a:b])
        norm = torch.linalg.vector_norm(x, dim=1).numpy()
        drop = (norm > threshold) | np.isin(pos, positions) | np.isin(tok, tokens)
        hit += int((drop & (pos != 0)).sum())
        train_rows += int((pos != 0).sum())
    return hit, train_rows


@pytest.mark.parametrize(
    "factor,positions,tokens", [(3.0, (), ()), (None, (3,), ()), (None, (), (42,)), (3.0, (3, 5), (42, 17))]
)
def test_exclusion_counts_are_exact(massive_store, tmp_path, factor, positions, tokens):
    # a batch size that divides the training rows, so that the run is exactly one epoch (BOS rows are shuffled
    # within shards, so the chunks hold different numbers of non-BOS rows)
    rows = {v: _expected_excluded(massive_store, 1.0, (), (), v)[1] for v in (2, 3, 4, 5, 6)}
    val_chunks, batch = next((v, b) for v in rows for b in range(40, 200) if rows[v] % b == 0)
    want, train_rows = _expected_excluded(massive_store, factor if factor else np.inf, positions, tokens, val_chunks)
    assert want > 0
    cfg = TrainConfig(
        store=massive_store,
        site=SITE,
        out=tmp_path / "o",
        k=(4,),
        dict_size=(64,),
        batch_size=batch,
        tokens=train_rows,
        val_chunks=val_chunks,
        exclude_massive=factor,
        exclude_positions=positions,
        exclude_tokens=tokens,
        device="cpu",
    )
    (d,) = run_train(cfg)
    meta = load_sae(d).cfg.metadata
    ex = meta["exclude"]
    assert meta["tokens_seen"] == train_rows  # one whole epoch: every training row was drawn once
    assert ex["n_excluded"] == want and ex["share_excluded"] == pytest.approx(want / train_rows)
    assert ex["positions"] == list(positions) and ex["token_ids"] == list(tokens)
    assert ex["massive_factor"] == factor
    if factor:
        assert ex["massive_threshold"] == pytest.approx(factor * ex["median_norm"])
    back = exclusion_from_metadata(meta)  # what eval reads
    assert back.any and back.positions == tuple(positions) and back.token_ids == tuple(tokens)


def test_massive_exclusion_drops_the_planted_rows_only(massive_store, tmp_path):
    """The planted rows are exactly the massive ones: excluding them removes one row in 15 of the non-BOS rows."""
    want, train_rows = _expected_excluded(massive_store, 3.0, (MASSIVE_POSITION,), (), 2)
    only, _ = _expected_excluded(massive_store, 3.0, (), (), 2)
    assert only == want and abs(want / train_rows - 1 / 15) < 0.01


def test_cli_has_the_options(tmp_path):
    out = CliRunner().invoke(cli.main, ["train", "--help"]).output
    for flag in ("--theta [ema|calibrated]", "--exclude-massive", "--exclude-positions", "--exclude-tokens"):
        assert flag in " ".join(out.split()), flag
    bad = CliRunner().invoke(cli.main, ["train", "--store", str(tmp_path / "none"), "--theta", "mean"])
    assert bad.exit_code == 2


class _StopAtOnce(trainer._StopFlag):
    """As if SIGTERM arrived during the first step."""

    def __enter__(self):
        self.signum = signal.SIGTERM
        return self


def test_exclusion_counts_survive_a_resume(massive_store, tmp_path, monkeypatch):
    """A run stopped after its first step and resumed counts the excluded rows as an uninterrupted run does, and
    ends with the same weights and θ."""
    base = dict(store=massive_store, site=SITE, k=(4,), dict_size=(64,), batch_size=64, tokens=64 * 30)
    # one decoder for both runs: `auto` times the paths per run, and a busy machine may choose differently
    cfg = TrainConfig(**base, exclude_massive=3.0, exclude_positions=(3,), decoder="dense", device="cpu")
    (whole,) = run_train(replace(cfg, out=tmp_path / "whole"))
    with monkeypatch.context() as m:
        m.setattr(trainer, "_StopFlag", _StopAtOnce)
        with pytest.raises(trainer.TrainingInterrupted):
            run_train(replace(cfg, out=tmp_path / "cut"))
    (cut,) = run_train(replace(cfg, out=tmp_path / "cut", resume=True))
    a, b = load_sae(whole), load_sae(cut)
    assert a.cfg.metadata["exclude"] == b.cfg.metadata["exclude"] and a.cfg.metadata["exclude"]["n_excluded"] > 0
    assert a.cfg.theta == b.cfg.theta and torch.equal(a.W_enc, b.W_enc)


def test_two_ranks_count_the_exclusions_of_one_process(massive_store, tmp_path):
    """Under torchrun each rank drops its own rows; the recorded counts are the global ones, as one process reading
    the same two lanes records them."""
    base = dict(store=massive_store, site=SITE, k=(4,), dict_size=(64,), batch_size=64, tokens=64 * 20)
    cfg = TrainConfig(**base, out=tmp_path / "one", exclude_massive=3.0, exclude_positions=(3,), reader_lanes=2)
    (one,) = run_train(replace(cfg, device="cpu", decoder="dense"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    args = [str(massive_store), "--site", SITE, "--out", str(tmp_path / "two"), "--k", "4", "--dict-size", "64"]
    args += ["--batch-size", "64", "--tokens", str(64 * 20), "--exclude-massive", "3", "--exclude-positions", "3"]
    args += ["--decoder", "dense", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={port}", "-m", "sae.cli", "train", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    two = tmp_path / "two" / one.name
    assert load_sae(two).cfg.metadata["exclude"] == load_sae(one).cfg.metadata["exclude"]
    assert load_sae(one).cfg.metadata["exclude"]["n_excluded"] > 0


def test_excluded_rows_leave_the_input_scale_and_variance(massive_store, tmp_path, monkeypatch):
    """With massive rows excluded, the input scale and the loss normaliser σ² are the kept rows' (the sample covers
    this small store's every training row, so they equal a brute-force pass); without exclusions, the store's."""
    seen = []

    def spy(cfg, point, d_in, device, input_scale, variance, **kw):
        seen.append((input_scale, variance))
        return make_run(cfg, point, d_in, device, input_scale, variance, **kw)

    make_run = trainer.make_run
    monkeypatch.setattr(trainer, "make_run", spy)
    store = Store.open(massive_store)
    with ChunkReader(store, SITE, batch_size=64, val_chunks=2) as r:
        x = torch.cat([_training_rows(store, c).x.double() for c in r.train_chunks])
    norms = torch.linalg.vector_norm(x, dim=1)
    base = TrainConfig(store=massive_store, site=SITE, k=(4,), dict_size=(64,), batch_size=64, tokens=640,
                       val_chunks=2, device="cpu")  # fmt: skip
    for factor in (None, 3.0):
        if factor:
            kept = x[norms <= factor * store.norm_stats(SITE)["median"]]
            mean = kept.mean(0)
            raw_var = float(kept.square().sum(1).mean() - mean @ mean)
            scale = math.sqrt(x.shape[1]) / float(torch.linalg.vector_norm(kept, dim=1).mean())
        else:  # every row: the store's statistics (validation chunks included)
            stats = store.stats(SITE, skip_bos=True)
            raw_var, scale = stats.variance, math.sqrt(x.shape[1]) / stats.mean_norm
        run_train(replace(base, out=tmp_path / f"o{factor}", exclude_massive=factor))
        got_scale, got_var = seen[-1]
        assert got_scale == pytest.approx(scale, rel=1e-4) and got_var == pytest.approx(raw_var * scale**2, rel=1e-4)
    assert seen[1][1] < 0.5 * seen[0][1]  # the planted rows held most of the variance


def _training_rows(store, c):
    """Chunk c's non-BOS rows, as the trainer reads them."""
    a, b = store.chunk_range(c)
    keep = torch.from_numpy(np.asarray(store.array("position")[a:b]) != 0)
    return Rows(store.chunk(SITE, c).float()[keep], torch.arange(a, b)[keep])
