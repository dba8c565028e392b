"""`sae train --site IN --target-site OUT [--skip]` end to end on a synthetic store whose target is a known
function of the input: SAELens-format transcoders that sae-lens loads, learning, resume after an interruption to
the very weights of an uninterrupted run, and one-line errors with nothing written."""

from __future__ import annotations

import json
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
from _synthetic import make_store, sparse_data
from click.testing import CliRunner
from safetensors.torch import load_file

from sae import cli
from sae.config import TrainConfig
from sae.errors import SaeError
from sae.saedir import load_sae
from sae.train import train as run_train
from sae.train import trainer

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
D = 16


def mlp_like(d: int = D, seed: int = 3):
    """Site 0: sparse rows; site 1: a ReLU MLP of the same rows plus a linear part (so a skip connection helps)."""
    base = sparse_data(d, seed=seed)
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(d, 4 * d, generator=g) / d**0.5, torch.randn(4 * d, d, generator=g) / (4 * d) ** 0.5
    lin = torch.randn(d, d, generator=g) / d**0.5

    def make(n: int, position: np.ndarray, shard_seed: int) -> torch.Tensor:
        k = shard_seed % 7  # make_store passes shard * 7 + site index
        x = base(n, position, shard_seed - k)
        return x if k == 0 else (x @ w1).relu() @ w2 + x @ lin

    return make


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("tc") / "s.zarr"
    return make_store(path, d=D, n_contexts=200, seq_len=16, chunk_rows=64, sites=(IN, OUT), data=mlp_like())


def cfg(store, out, **kw):
    base = dict(
        store=store, site=IN, target_site=OUT, out=out, k=(4,), dict_size=(64,), batch_size=64, tokens=64 * 120,
        device="cpu", val_chunks=2,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def log(path):
    return [json.loads(line) for line in (path / trainer.LOG_FILE).read_text().splitlines()]


def test_transcoders_and_skip_transcoders_train_and_load_in_sae_lens(store, tmp_path):
    sl = pytest.importorskip("sae_lens")
    plain = run_train(cfg(store, tmp_path / "plain", arch=("batchtopk", "relu")))
    skip = run_train(cfg(store, tmp_path / "skip", skip=True))
    want = {"batchtopk-k4-F64": "jumprelu_transcoder", "relu-F64": "transcoder"}
    for path in [*plain, *skip]:
        c = json.loads((path / "cfg.json").read_text())
        arch = "jumprelu_skip_transcoder" if path in skip else want[path.name]
        assert c["architecture"] == arch and c["d_in"] == c["d_out"] == D and c["apply_b_dec_to_input"] is False
        meta = c["metadata"]
        assert meta["hook_name"] == IN and meta["hook_name_out"] == OUT and meta["target_site"] == OUT
        assert meta["complete"] is True and meta["input_scale"] > 0 and meta["target_scale"] > 0
        assert ("W_skip" in load_file(str(path / "sae_weights.safetensors"))) == (path in skip)
        theirs = sl.SAE.load_from_disk(str(path))
        ours = load_sae(path)
        x = torch.randn(40, D)
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), ours(x))
        rows = log(path)
        train = [r for r in rows if r["split"] == "train"]
        assert train[-1]["fvu"] < train[0]["fvu"]  # it learns the target...
        val = [r for r in rows if r["split"] == "val"]
        if path.name.startswith("batchtopk"):  # ...BatchTopK well within this short run (ReLU-L1 slowly)
            assert train[-1]["fvu"] < 0.7 * train[0]["fvu"] and val[-1]["fvu_batch"] < 0.7
    fvu = {p.name: log(p)[-1]["fvu_batch"] for p in plain}
    fvu_skip = log(skip[0])[-1]["fvu_batch"]
    assert fvu_skip < fvu["batchtopk-k4-F64"]  # the linear part of the target is the skip connection's


class _StopAfter(trainer._StopFlag):
    """As if SIGTERM arrived during step 30."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    @property
    def signum(self):
        self.calls += 1
        return signal.SIGTERM if self.calls >= 30 else None

    @signum.setter
    def signum(self, value):
        pass


def test_interrupted_transcoder_resumes_to_the_uninterrupted_weights(store, tmp_path, monkeypatch):
    # one decoder for both runs: `auto` times the paths per run, and a busy machine may choose differently
    reference = run_train(cfg(store, tmp_path / "ref", skip=True, decoder="dense"))[0]
    c = cfg(store, tmp_path / "run", skip=True, decoder="dense")
    monkeypatch.setattr(trainer, "_StopFlag", _StopAfter)
    with pytest.raises(trainer.TrainingInterrupted, match="--resume"):
        run_train(c)
    monkeypatch.undo()
    got = run_train(replace(c, resume=True))[0]
    a, b = load_file(str(reference / "sae_weights.safetensors")), load_file(str(got / "sae_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_errors_are_one_line_and_write_nothing(store, tmp_path):
    out = tmp_path / "out"
    cases = [
        (dict(target_site="blocks.0.hook_resid_post"), "store .* has no such site; its sites"),
        (dict(target_site=IN, skip=True), "--skip with --target-site equal to --site"),
        (dict(target_site="", skip=True), "give --target-site too"),
        (dict(arch=("topk",)), "'topk' has no SAELens transcoder"),
    ]
    for kw, match in cases:
        with pytest.raises(SaeError, match=match):
            run_train(cfg(store, out, **kw))
        assert not out.exists()
    result = CliRunner().invoke(
        cli.main, ["train", str(store), "--site", IN, "--target-site", "blocks.3.hook_mlp_out", "--out", str(out)]
    )
    assert result.exit_code == 2 and "has no such site" in result.output and "Traceback" not in result.output
    assert not out.exists()
    # a run of another target in the same --out is refused
    run_train(cfg(store, out, tokens=64 * 20))
    with pytest.raises(SaeError, match="--target-site"):
        run_train(cfg(store, out, tokens=64 * 20, target_site=IN))


def test_two_ranks_train_the_transcoder_of_one_process(store, tmp_path):
    """torchrun, gloo on CPU: 2 ranks (one reader lane each) give the weights of one process reading both lanes."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    ref = run_train(cfg(store, tmp_path / "ref", skip=True, reader_lanes=2, decoder="dense"))[0]
    out = tmp_path / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={port}", "-m", "sae.cli", "train", str(store), "--site", IN, "--target-site", OUT]
    cmd += ["--skip", "--k", "4", "--dict-size", "64", "--batch-size", "64", "--tokens", str(64 * 120)]
    cmd += ["--decoder", "dense", "--device", "cpu", "--out", str(out)]
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    a = load_file(str(ref / "sae_weights.safetensors"))
    b = load_file(str(out / ref.name / "sae_weights.safetensors"))
    assert a.keys() == b.keys() and "W_skip" in a
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_massive_rows_of_a_transcoder_are_judged_by_its_target(store, tmp_path):
    """--exclude-massive on a transcoder drops the rows whose target (the batch's last columns) is massive, not
    those with a large input; the count lands in the exported metadata, which eval reads for the output site."""
    from sae.store import Store
    from sae.train.exclude import RowFilter
    from sae.train.reader import Batch

    s = Store.open(store)
    c = cfg(store, tmp_path / "o", exclude_massive=3.0)
    f = RowFilter(c, s, OUT, columns=slice(D, None))
    median = s.norm_stats(OUT)["median"]
    x = torch.zeros(4, 2 * D)
    x[:, 0] = x[:, D] = median  # typical input and target
    x[1, 0] = 100 * median  # a huge input: kept
    x[2, D] = 4 * median  # a massive target: dropped
    kept = f.apply(Batch(x, torch.arange(4)))
    assert torch.equal(kept, x[[0, 1, 3]]) and (f.seen, f.excluded) == (4, 1)
    run_train(c)
    meta = load_sae(tmp_path / "o" / "batchtopk-k4-F64").cfg.metadata
    assert meta["exclude"]["massive_factor"] == 3.0 and meta["exclude"]["median_norm"] == pytest.approx(median)


def test_a_finished_transcoder_run_is_done(store, tmp_path):
    """A finished transcoder run counts as finished (as an SAE run does): the same command refuses to overwrite
    it, --resume does nothing, and `sae run` would skip the stage."""
    from sae.manifest import train_done
    from sae.saedir import is_complete

    c = cfg(store, tmp_path / "o", tokens=64 * 6, val_chunks=1)
    (d,) = run_train(c)
    assert is_complete(d) and train_done(c)
    before = (d / "sae_weights.safetensors").stat().st_mtime_ns
    with pytest.raises(SaeError, match="holds a finished run"):
        run_train(c)
    assert run_train(replace(c, resume=True)) == [d]
    assert (d / "sae_weights.safetensors").stat().st_mtime_ns == before
