"""Multi-process training (torchrun, gloo on CPU): 2 ranks, each reading its own reader lane (disjoint chunks),
give the weights, θ and logged losses of one process reading the same 2 lanes; a 2-rank checkpoint resumes in 1
process and a 1-process checkpoint on 2 ranks. Synthetic store (d=16)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _synthetic import SITE, make_store
from safetensors.torch import load_file

from sae.config import TrainConfig
from sae.saedir import is_complete, load_sae
from sae.train import checkpoint, trainer
from sae.train import train as run_train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24

# Run under torchrun by the resume test: rank 0 alone sees a "signal" at once; the ranks must agree to stop
# after the first step, with one checkpoint written by rank 0.
DRIVER = """
import json, os, signal, sys
from sae.config import TrainConfig
from sae.train import trainer

class StopOnRank0(trainer._StopFlag):
    def __enter__(self):
        if os.environ["RANK"] == "0" and not json.loads(sys.argv[1]).get("resume"):
            self.signum = signal.SIGTERM
        return self

trainer._StopFlag = StopOnRank0
try:
    trainer.train(TrainConfig(**json.loads(sys.argv[1])))
except trainer.TrainingInterrupted as e:
    print(e)
    sys.exit(3)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("ddp") / "s.zarr", d=16, n_contexts=200, seq_len=16, chunk_rows=64)


def _cfg(store, out, **kw):
    base = dict(
        store=store,
        site=SITE,
        out=out,
        arch=("batchtopk", "topk", "matryoshka"),
        k=(4,),
        dict_size=(64,),
        batch_size=64,
        tokens=64 * STEPS,
        checkpoint_every=64 * 12,
        decoder="dense",
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={port}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _assert_close(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "sae_weights.safetensors")), load_file(str(b / "sae_weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{a.name}/{k}: {m}")
    ta, tb = load_sae(a).cfg.theta, load_sae(b).cfg.theta
    assert (ta is None) == (tb is None) and (ta is None or abs(ta - tb) <= 1e-5 * max(1.0, abs(tb)))


def _train_log(d: Path) -> list[dict]:
    rows = [json.loads(line) for line in (d / trainer.LOG_FILE).read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """One process on the global batches of 2 ranks: the same 2 reader lanes."""
    return run_train(_cfg(store, tmp_path_factory.mktemp("ref") / "out", reader_lanes=2))


def _fields(cfg: TrainConfig) -> str:
    return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()})


def test_two_ranks_match_one_process(store, reference, tmp_path):
    out = tmp_path / "out"
    args = [str(store), "--site", SITE, "--out", str(out), "--arch", "batchtopk,topk,matryoshka", "--k", "4"]
    args += ["--dict-size", "64", "--batch-size", "64", "--tokens", str(64 * STEPS), "--checkpoint-every"]
    args += [str(64 * 12), "--decoder", "dense", "--device", "cpu"]
    res = _torchrun(["-m", "sae.cli", "train", *args])
    assert res.returncode == 0, res.stderr[-4000:]
    for ref in reference:
        d = out / ref.name
        assert is_complete(d)
        assert json.loads((d / "cfg.json").read_text())["metadata"]["reader_lanes"] == 2  # one lane per rank
        _assert_close(d, ref)
        # rank 0 logs the global-batch losses, L0 and dead fraction, not its own slice's
        got, want = _train_log(d), _train_log(ref)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for g, w in zip(got, want, strict=True):
            for k in ("loss", "fvu", "mse", "aux_loss", "l0", "dead_fraction", "grad_norm"):
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (ref.name, g["step"], k)
    assert not (out / checkpoint.DIR).exists()  # rank 0 cleaned up after every rank finished


def test_two_rank_checkpoint_resumes_in_one_process(store, reference, tmp_path):
    cfg = _cfg(store, tmp_path / "out")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    res = _torchrun([str(driver), _fields(cfg)])
    assert res.returncode != 0 and "stopped by SIGTERM after step 1 " in res.stdout, res.stdout + res.stderr[-4000:]
    assert checkpoint.exists(cfg.out) and not any(is_complete(cfg.out / r.name) for r in reference)
    dirs = run_train(replace(cfg, resume=True))
    assert [d.name for d in dirs] == [r.name for r in reference]
    for d, ref in zip(dirs, reference, strict=True):
        _assert_close(d, ref)


def test_one_process_checkpoint_resumes_on_two_ranks(store, tmp_path, monkeypatch):
    """One lane (a one-process run) stopped after a step, continued by 2 ranks that share the lane: the weights of
    the uninterrupted one-process run."""
    ref = run_train(_cfg(store, tmp_path / "ref"))

    class StopAtOnce(trainer._StopFlag):
        def __enter__(self):
            self.signum = 15
            return self

    cfg = _cfg(store, tmp_path / "out")
    monkeypatch.setattr(trainer, "_StopFlag", StopAtOnce)
    with pytest.raises(trainer.TrainingInterrupted, match="after step 1 "):
        run_train(cfg)
    monkeypatch.undo()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    res = _torchrun([str(driver), _fields(replace(cfg, resume=True))])
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    for r in ref:
        d = cfg.out / r.name
        assert is_complete(d) and json.loads((d / "cfg.json").read_text())["metadata"]["reader_lanes"] == 1
        _assert_close(d, r)
