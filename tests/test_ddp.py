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
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from _synthetic import SITE, make_store
from safetensors.torch import load_file

from sae.config import TrainConfig
from sae.errors import SaeError
from sae.saedir import is_complete, load_sae
from sae.train import checkpoint, ddp, trainer
from sae.train import train as run_train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24

# Run under torchrun by the resume test: rank 0 alone sees a "signal" at once; the ranks must agree to stop
# at the first step where they compare flags (trainer.STOP_CHECK_STEPS), with one checkpoint written by rank 0.
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
    stop = f"stopped by SIGTERM after step {trainer.STOP_CHECK_STEPS} "  # (before the checkpoint at step 12)
    assert res.returncode != 0 and stop in res.stdout, res.stdout + res.stderr[-4000:]
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


# Units of sae.train.ddp, in this process.


def test_local_rank_beyond_the_gpus_is_one_clear_line(monkeypatch):
    """torchrun with more processes than GPUs: a SaeError naming both counts, before any CUDA call."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def no_cuda(*a, **k):
        raise AssertionError("a CUDA call before the check")

    monkeypatch.setattr(torch.cuda, "set_device", no_cuda)
    with pytest.raises(SaeError, match=r"LOCAL_RANK=2 .* this node has 2 GPU\(s\): start one process per GPU"):
        ddp.init_distributed(TrainConfig(device="cuda", batch_size=64))


def test_process_group_timeout_is_generous_and_configurable(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def init(backend, **kw):
        seen.update(backend=backend, **kw)
        raise Stop

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(ddp.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(ddp.dist, "init_process_group", init)
    with pytest.raises(Stop):
        ddp.init_distributed(TrainConfig(device="cpu", batch_size=64))
    assert seen == {"backend": "gloo", "timeout": timedelta(hours=2)}
    monkeypatch.setenv("SAE_DIST_TIMEOUT", "90")
    with pytest.raises(Stop):
        ddp.init_distributed(TrainConfig(device="cpu", batch_size=64))
    assert seen["timeout"] == timedelta(seconds=90)
    monkeypatch.setenv("SAE_DIST_TIMEOUT", "soon")
    with pytest.raises(SaeError, match="SAE_DIST_TIMEOUT must be a positive number of seconds, got 'soon'"):
        ddp.init_distributed(TrainConfig(device="cpu", batch_size=64))


@pytest.fixture
def world_of_one():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield ddp.Dist(0, 1, dist.group.WORLD, dist.group.WORLD)
    finally:
        ddp.destroy_process_group()  # (right after a collective: torch < 2.8 could hang here)


def test_gradient_all_reduce_starts_during_backward(world_of_one, monkeypatch):
    """The decoder's all-reduce is launched while the encoder's backward has not run yet (so the two overlap);
    after `wait()` every gradient is the reduced one; a backward outside arm()/wait() launches nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    enc = model[0].weight
    launched = {}
    real = ddp.dist.all_reduce

    def record(t, *a, **k):
        name = next(n for n, p in model.named_parameters() if p.grad is t)
        launched[name] = enc.grad is None  # whether the encoder's backward was still to come
        return real(t, *a, **k)

    monkeypatch.setattr(ddp.dist, "all_reduce", record)
    sync = ddp.GradSync(model, world_of_one)
    x = torch.randn(32, 16)
    model(x).square().sum().backward()  # not armed: nothing reduced
    assert launched == {}
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    sync.arm()
    model(x).square().sum().backward()
    sync.wait()
    assert set(launched) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert launched["2.weight"] and launched["2.bias"] and not launched["0.weight"]
    assert all(torch.equal(p.grad, want[n]) for n, p in model.named_parameters())  # one rank: the sum is itself
    sync.remove()


def test_stop_flag_and_rank_0_values_travel_on_the_host(world_of_one):
    assert ddp.any_rank(True, world_of_one) is True and ddp.any_rank(False, world_of_one) is False
    assert ddp.broadcast_float(0.25, world_of_one) == 0.25 and ddp.broadcast_float(None, world_of_one) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_world_with_a_gloo_group_trains(store, tmp_path, monkeypatch):
    """The GPU code path of DDP on one GPU: an NCCL world of one rank (already initialised, as a caller's would
    be), the gloo group beside it for barriers and the stop flag, the overlapped gradient all-reduce."""
    import torch.distributed as dist

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # (the world stays the one of 1 rank: only the DDP path is taken)
    try:
        dirs = run_train(_cfg(store, tmp_path / "out", device="cuda"))
    finally:
        dist.destroy_process_group()
    assert all(is_complete(d) for d in dirs) and not (tmp_path / "out" / checkpoint.DIR).exists()
