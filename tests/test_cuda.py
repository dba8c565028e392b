"""The CUDA paths: exact batch top-k with ties, dense against sparse decoder (forward and gradients), resume against
an uninterrupted run, one tiny training run per architecture, one tiny evaluation, a 1-rank NCCL group and a
torchrun launch, and (with two GPUs) a 2-rank NCCL run against one process.

Every test runs once per device. The cpu half runs everywhere and checks the test itself; the cuda half is marked
`cuda` and skips without a GPU (`pytest -m cuda` on a GPU machine runs only these). Only public entry points are
used (sae.train.train, sae.evaluate.evaluate, the config classes, sae.saedir), so that refactors of the internals
leave these tests standing; the architectures come from TrainConfig's own list, so a new one is tested as soon as
it is allowed there.

Training on CUDA runs under bf16 autocast: a bf16 value has 8 significant bits (relative spacing 2⁻⁸ ≈ 0.4 %), so
quantities computed through it are compared with percent-level tolerances, and fp32 ones on the CPU with 1e-5."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import typing
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest
import torch
from _synthetic import SITE, make_store
from conftest import TINY_TEXT, make_model, make_tokenizer
from safetensors.torch import load_file

from sae.config import EvalConfig, TrainConfig, field_types
from sae.errors import SaeError
from sae.evaluate import evaluate
from sae.saedir import (
    SaeConfig,
    SparseAutoencoder,
    batch_topk_indices,
    checkpoint_path,
    is_complete,
    load_sae,
    save_sae,
)
from sae.train import train

ROOT = Path(__file__).resolve().parents[1]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
LOG = "train_log.jsonl"  # the training log in every SAE directory (README: "What a run leaves on disk")
B, F, K = 64, 64, 4


def allowed(cls: type, name: str) -> tuple:
    """The values a config field's Literal type allows (also inside tuple[...] and Optional[...])."""
    tp = field_types(cls)[name]
    while typing.get_origin(tp) is not Literal:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis and a is not type(None)]
        assert args, f"{cls.__name__}.{name} is not a Literal field: cannot list its values"
        tp = args[0]
    return typing.get_args(tp)


ARCHS = allowed(TrainConfig, "arch")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 3200 rows (200 contexts of 16, BOS first) in 50 chunks of 64, d=16, from a known sparse dictionary
    return make_store(tmp_path_factory.mktemp("cuda") / "s.zarr", d=16, n_contexts=200, seq_len=16, chunk_rows=64)


def _cfg(store: Path, out: Path, device: str, steps: int, **kw) -> TrainConfig:
    base = dict(
        store=store,
        site=SITE,
        out=out,
        arch=ARCHS,
        k=(K,),
        dict_size=(F,),
        batch_size=B,
        tokens=B * steps,
        log_every=1,
        decoder="dense",
        device=device,
    )
    return TrainConfig(**{**base, **kw})


def _by_arch(dirs: list[Path]) -> dict[str, Path]:
    """The sweep's SAE directories by training architecture (one SAE per architecture in these tests)."""
    out = {load_sae(d).cfg.training_architecture: d for d in dirs}
    assert len(out) == len(dirs)
    return out


def _log(d: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (d / LOG).read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "sae_weights.safetensors"))


# --------------------------------------------------------------------------------------------------
# Batch top-k: exact, ties to the lower flat index, on every device and in the dtypes autocast produces


def _reference_indices(pre: torch.Tensor, k_total: int) -> torch.Tensor:
    """Flat indices of the k_total largest positive entries, ties to the lower index: a stable sort on the CPU."""
    flat = pre.detach().double().cpu().reshape(-1)
    pos = (flat > 0).nonzero().squeeze(1)
    order = torch.sort(-flat[pos], stable=True).indices
    return pos[order[:k_total]].sort().values


def _pre(case: str) -> tuple[torch.Tensor, int]:
    g = torch.Generator().manual_seed(7)
    if case == "integers":  # thousands of entries equal to the cut; the sampled path (k_total·4 < n)
        return torch.randint(-20, 21, (256, 512), generator=g).float(), 256 * 8
    if case == "bf16-rounded":  # continuous values rounded to bf16, as pre-activations under autocast are
        return torch.randn(512, 1024, generator=g).bfloat16().float(), 512 * 32
    if case == "all-equal":
        return torch.ones(64, 128), 64 * 16
    if case == "few-positives":  # fewer positive entries than k_total: all of them come back
        sign = torch.where(torch.rand(128, 256, generator=g) < 0.01, 1.0, -1.0)
        return sign * torch.rand(128, 256, generator=g), 128 * 8
    if case == "dense":  # k_total·4 ≥ n: no sampling
        return torch.randint(-3, 4, (8, 16), generator=g).float(), 8 * 6
    raise ValueError(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["integers", "bf16-rounded", "all-equal", "few-positives", "dense"])
def test_batch_topk_is_exact_with_ties(device, dtype, case):
    pre, k_total = _pre(case)
    pre = pre.to(dtype)  # every case is exactly representable in bf16, so the reference is the same
    want = _reference_indices(pre, k_total)
    got = batch_topk_indices(pre.to(device), k_total)
    _sync(device)
    assert got.device.type == device and got.dtype == torch.long
    assert torch.equal(got.cpu(), want), f"{case}: {got.numel()} indices, {want.numel()} expected"
    if case != "few-positives":
        assert got.numel() == k_total


@pytest.mark.parametrize("device", DEVICES)
def test_encode_batch_keeps_exactly_k_per_row_on_average(device):
    """A BatchTopK SAE's `encode_batch` on integer inputs and weights (exact in fp32, TF32 and bf16, so the
    pre-activations tie massively): exactly round(k·N) entries, the reference's, with their pre-activation values."""
    d, f, k, n = 16, 96, 5, 200
    g = torch.Generator().manual_seed(3)
    cfg = SaeConfig(architecture="jumprelu", d_in=d, d_sae=f, k=k, training_architecture="batchtopk", theta=0.5)
    sae = SparseAutoencoder(cfg, device=device)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-2, 3, (d, f), generator=g).float())
        sae.W_dec.copy_(torch.randn(f, d, generator=g))
        sae.threshold.fill_(0.5)
    x = torch.randint(-2, 3, (n, d), generator=g).float()
    with torch.no_grad():
        a = sae.encode_batch(x.to(device))
        pre = sae.pre_acts(x.to(device))
        x_hat = sae.decode(a)
    _sync(device)
    assert a.device.type == device and x_hat.device.type == device
    want = _reference_indices(pre, k * n)
    got = (a.reshape(-1) != 0).nonzero().squeeze(1).cpu()
    assert torch.equal(got, want)
    assert torch.equal(a.reshape(-1)[want.to(device)].cpu(), pre.reshape(-1)[want.to(device)].cpu())
    assert torch.isfinite(x_hat).all()


# --------------------------------------------------------------------------------------------------
# Dense and sparse decoder: the same forward, the same gradients, the same training trajectory


@pytest.mark.parametrize("device", DEVICES)
def test_dense_and_sparse_decoders_agree(store, tmp_path, device):
    """Every architecture, one sweep per decoder from the same init and batches.

    Forward and gradient norm: the first logged step is computed at the initial weights, so its loss terms and
    grad_norm (before clipping) must agree. Gradient direction: Adam's first update is lr·g/(|g| + eps), i.e. ±lr
    for every entry with a gradient and 0 without one, so after one step two weight tensors differ by about 2·lr
    exactly where the gradients disagree in sign or in being zero, and by rounding elsewhere. Trajectory: six steps
    with a dead window of one batch (AuxK from step 2 on) keep the logged losses together."""
    fp32 = device == "cpu"
    rtol = 1e-5 if fp32 else 3e-2
    flips_allowed = 0.03  # on CUDA (bf16 gradients): entries whose gradient is within bf16 rounding of 0

    big = dict(dict_size=(256,))  # k·B = 256 selections over 256 latents: many never fire, so AuxK has work
    one = {
        dec: _by_arch(train(_cfg(store, tmp_path / f"one-{dec}", device, 1, decoder=dec, **big)))
        for dec in ("dense", "sparse")
    }
    for arch in ARCHS:
        dense, sparse = one["dense"][arch], one["sparse"][arch]
        (rd,), (rs,) = _log(dense), _log(sparse)
        assert rd["decoder"] == "dense" and rs["decoder"] == "sparse", arch
        for key in ("loss", "fvu", "mse", "aux_loss", "sparsity_loss", "l0", "grad_norm"):
            assert rs[key] == pytest.approx(rd[key], rel=rtol, abs=1e-6), (arch, key)
        cfg = load_sae(dense).cfg
        lr = cfg.metadata["lr"]
        c = cfg.input_scale  # exported units: W_enc·c, b_dec/c (threshold and b_enc unscaled)
        unit = {"W_enc": c, "b_enc": 1.0, "b_dec": 1 / c, "threshold": 1.0}
        wd, ws = _weights(dense), _weights(sparse)
        assert wd.keys() == ws.keys()
        for name, u in unit.items():
            if name not in wd or (name == "threshold" and arch != "jumprelu"):
                continue
            moved = (wd[name] - ws[name]).abs() > 0.5 * lr * u
            allowed_flips = 0 if fp32 else 1 + int(flips_allowed * moved.numel())
            assert int(moved.sum()) <= allowed_flips, (arch, name, int(moved.sum()), moved.numel())
        # W_dec: rows renormalised after the step, so compare values, not steps
        torch.testing.assert_close(ws["W_dec"], wd["W_dec"], rtol=0, atol=4 * lr / c, msg=lambda m, a=arch: f"{a}: {m}")

    six = {
        dec: _by_arch(train(_cfg(store, tmp_path / f"six-{dec}", device, 6, decoder=dec, dead_tokens=B, **big)))
        for dec in ("dense", "sparse")
    }
    for arch in ARCHS:
        ld, ls = _log(six["dense"][arch]), _log(six["sparse"][arch])
        assert [r["step"] for r in ld] == [r["step"] for r in ls] == list(range(1, 7))
        for rd, rs in zip(ld, ls, strict=True):
            for key in ("loss", "fvu", "aux_loss", "l0", "grad_norm"):
                tol = rtol if rd["step"] == 1 else (1e-4 if fp32 else 5e-2)
                assert rs[key] == pytest.approx(rd[key], rel=tol, abs=1e-6), (arch, rd["step"], key)
        if arch in ("batchtopk", "topk"):
            assert any(r["n_dead_aux"] > 0 for r in ld[1:]), f"{arch}: AuxK never ran; the test lost its point"


# --------------------------------------------------------------------------------------------------
# Resume: a run stopped by SIGTERM and resumed ends with the weights of an uninterrupted run


def _interrupted(cfg: TrainConfig) -> str:
    """Run `cfg`, SIGTERM it once its first checkpoint exists (as a cluster scheduler would), return the message."""

    def preempt():
        t0 = time.monotonic()
        while not checkpoint_path(cfg.out).exists():
            if time.monotonic() - t0 > 300:
                return
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGTERM)

    late = []
    old = signal.signal(signal.SIGTERM, lambda *a: late.append(a))  # a SIGTERM after train() returned
    try:
        threading.Thread(target=preempt, daemon=True).start()
        with pytest.raises(SaeError, match="--resume") as e:
            train(cfg)
    finally:
        time.sleep(0.05)
        signal.signal(signal.SIGTERM, old)
    return str(e.value)


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in ("step", "loss", "fvu", "l0", "grad_norm", "theta")} for r in rows]


@pytest.fixture
def deterministic(monkeypatch):
    """Deterministic kernels for this test (CUDA's float atomics, e.g. in index_add_, sum in a varying order;
    cuBLAS needs a fixed workspace for it). warn_only: kthvalue has no flagged-deterministic CUDA kernel, but its
    value output, the only one used, does not depend on the order."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(was, warn_only=was_warn)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_is_bit_exact(store, tmp_path, device, deterministic):
    """Bit-exact on CUDA too, with deterministic kernels: the checkpoint holds every fp32 tensor and the reader's
    position, and no CUDA RNG is used. Two uninterrupted runs are compared first, so a failure says whether the
    device or the resume is at fault."""
    cfg = _cfg(store, tmp_path / "run", device, 40, checkpoint_every=B * 10, buffer_mb=0)
    ref = _by_arch(train(replace(cfg, out=tmp_path / "ref")))
    again = _by_arch(train(replace(cfg, out=tmp_path / "again")))
    for arch in ARCHS:
        a, b = _weights(ref[arch]), _weights(again[arch])
        same = [k for k in a if torch.equal(a[k], b[k])]
        assert len(same) == len(a), f"{arch}: two uninterrupted {device} runs differ in {sorted(set(a) - set(same))}"

    message = _interrupted(cfg)
    assert "stopped by SIGTERM" in message
    assert not any(is_complete(cfg.out / d.name) for d in ref.values())
    got = _by_arch(train(replace(cfg, resume=True)))
    for arch in ARCHS:
        a, b = _weights(ref[arch]), _weights(got[arch])
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{arch}/{k}: max |Δ| {float((a[k] - b[k]).abs().max()):.3g} ({message})"
        assert load_sae(got[arch]).cfg.theta == load_sae(ref[arch]).cfg.theta
        assert _strip(_log(got[arch])) == _strip(_log(ref[arch])), arch


# --------------------------------------------------------------------------------------------------
# One tiny training run per architecture


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_training_run(store, tmp_path, device, arch):
    """30 steps with the decoder chosen by timing on the device. It learns, batchtopk keeps exactly k·B entries in
    every step (ties included), topk at most k per row, and the SAE loads and runs on the device. On CUDA the first
    step (computed at the initial weights, under bf16 autocast) matches the same step on the CPU."""
    # The April-2024 ReLU recipe's λ = 5 is tuned for runs of many thousand steps; in 30 steps it kills features
    # faster than the decoder learns, so this device test uses a small λ.
    extra = {"l1_coeff": 0.1} if arch == "relu" else {}
    cfg = _cfg(store, tmp_path / "out", device, 30, arch=(arch,), decoder="auto", **extra)
    (d,) = train(cfg)
    assert is_complete(d)
    rows = _log(d)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["fvu"], r["grad_norm"]])).all() for r in rows)
    first, last = rows[0]["fvu"], sum(r["fvu"] for r in rows[-5:]) / 5
    assert last < first, f"{arch} on {device}: FVU {first:.3f} → {last:.3f}"
    if arch == "batchtopk":
        assert all(r["l0"] == pytest.approx(K, abs=1e-6) for r in rows), [r["l0"] for r in rows]
    if arch == "topk":
        assert all(r["l0"] <= K + 1e-6 for r in rows)
    val = _log(d, "val")
    assert val and val[-1]["step"] == 30 and val[-1]["fvu_batch"] < 1.0

    sae = load_sae(d, device=device)
    x = torch.randn(32, sae.d_in, device=device)
    with torch.no_grad():
        x_hat = sae(x)
    _sync(device)
    assert x_hat.device.type == device and torch.isfinite(x_hat).all()

    if device == "cuda":
        (c,) = train(replace(cfg, out=tmp_path / "cpu", device="cpu"))
        want = _log(c)[0]
        for key in ("loss", "fvu", "grad_norm"):
            assert rows[0][key] == pytest.approx(want[key], rel=0.1), (key, rows[0][key], want[key])


# --------------------------------------------------------------------------------------------------
# One tiny evaluation


@pytest.fixture(scope="module")
def eval_env(tmp_path_factory):
    """A saved tiny Llama (4 layers, d=64) with its tokenizer, and a held-out text file."""
    root = tmp_path_factory.mktemp("cuda-eval")
    make_model("llama", n_layers=4, d_model=64).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    words = TINY_TEXT.split()
    text = "\n\n".join(" ".join(words[(7 * i + j) % len(words)] for j in range(40)) for i in range(100))
    (root / "heldout.txt").write_text(text + "\n")
    eye = torch.eye(64)
    ident = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(128), "W_dec": torch.cat([eye, -eye], 0)}
    ident |= {"b_dec": torch.zeros(64), "threshold": torch.zeros(128)}
    g = torch.Generator().manual_seed(0)
    w_dec = torch.nn.functional.normalize(torch.randn(256, 64, generator=g), dim=1)
    rand = {"W_enc": w_dec.T.contiguous(), "b_enc": -0.05 * torch.rand(256, generator=g), "W_dec": w_dec}
    rand |= {"b_dec": torch.zeros(64)}
    site = "blocks.1.hook_resid_post"
    save_sae(ident, SaeConfig(architecture="jumprelu", d_in=64, d_sae=128, hook_name=site), root / "saes" / "identity")
    save_sae(rand, SaeConfig(architecture="standard", d_in=64, d_sae=256, hook_name=site), root / "saes" / "random")
    return root


def _evaluate(env: Path, out: Path, device: str) -> dict[str, dict]:
    cfg = EvalConfig(
        sae_dirs=(env / "saes",),
        out=out,
        model=str(env / "model"),
        dataset=str(env / "heldout.txt"),
        max_tokens=16 * 24,
        seq_len=16,
        batch_size=8,
        device=device,
    )
    return {r["name"]: r for r in json.loads((evaluate(cfg) / "report.json").read_text())}


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_evaluate(eval_env, tmp_path, device):
    """An identity SAE (x̂ = relu(x) − relu(−x) = x exactly, in fp32 from bf16 too) changes nothing: FVU 0, CE and
    KL unchanged. On CUDA (a bf16 model) the clean CE and a random SAE's metrics match the CPU's (fp32 model)."""
    r = _evaluate(eval_env, tmp_path / "report", device)
    ident, rand = r["identity"], r["random"]
    assert ident["fvu"] == 0.0 and ident["nmse"] == 0.0
    assert ident["ce_sae"] == pytest.approx(ident["ce_clean"], abs=1e-5) and ident["kl"] == pytest.approx(0, abs=1e-5)
    assert ident["ce_clean"] == rand["ce_clean"]  # one clean pass for both
    assert 0 < rand["fvu"] and 0 < rand["l0"] < 256 and rand["kl"] > 0
    for e in r.values():
        assert all(isinstance(e[k], (int, float)) and e[k] == e[k] for k in ("ce_clean", "ce_sae", "kl", "fvu", "l0"))
    if device == "cuda":
        cpu = _evaluate(eval_env, tmp_path / "report-cpu", "cpu")
        for key in ("ce_clean", "ce_zero", "ce_mean"):
            assert ident[key] == pytest.approx(cpu["identity"][key], rel=2e-2), key
        for key in ("fvu", "nmse", "l0", "cosine"):
            assert rand[key] == pytest.approx(cpu["random"][key], rel=5e-2), key


# --------------------------------------------------------------------------------------------------
# torch.distributed: a 1-rank NCCL group, a torchrun launch, and a 2-GPU run when there are two GPUs

GROUP_SCRIPT = """
import sys, torch, torch.distributed as dist
from sae.saedir import batch_topk_indices
from sae.train.ddp import destroy_process_group
backend, device, init = sys.argv[1:4]
dev = torch.device("cuda", 0) if device == "cuda" else torch.device(device)
if dev.type == "cuda":
    torch.cuda.set_device(dev)
dist.init_process_group(backend, init_method=f"file://{init}", rank=0, world_size=1)
try:
    t = torch.arange(4.0, device=dev)
    dist.all_reduce(t)
    m = torch.tensor([3], device=dev)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    parts = [torch.zeros(2, device=dev)]
    dist.all_gather(parts, torch.ones(2, device=dev))
    objs = [None]
    dist.all_gather_object(objs, {"rank": dist.get_rank()})
    dist.broadcast(t, 0)
    dist.barrier()
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0] and int(m) == 3 and parts[0].tolist() == [1.0, 1.0], (t, m, parts)
    assert objs == [{"rank": 0}], objs
    # the distributed selection's collectives on this backend: one rank selects what no group selects
    pre = torch.randint(-5, 6, (64, 96), generator=torch.Generator().manual_seed(0)).float().to(dev)
    got = batch_topk_indices(pre, 64 * 4, group=dist.group.WORLD)
    assert torch.equal(got, batch_topk_indices(pre, 64 * 4))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("group ok", dist.get_backend())
finally:
    destroy_process_group()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("device", DEVICES)
def test_one_rank_process_group(tmp_path, device):
    """init_process_group (nccl on CUDA, gloo on the CPU) and the collectives training uses, in a fresh process."""
    backend = "nccl" if device == "cuda" else "gloo"
    res = subprocess.run(
        [sys.executable, "-c", GROUP_SCRIPT, backend, device, str(tmp_path / "init")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and f"group ok {backend}" in res.stdout, res.stdout + res.stderr[-4000:]


def _cli_args(store: Path, out: Path, device: str, steps: int) -> list[str]:
    return [
        str(store), "--site", SITE, "--out", str(out), "--arch", "batchtopk,topk", "--k", str(K),
        "--dict-size", str(F), "--batch-size", str(B), "--tokens", str(B * steps), "--decoder", "dense",
        "--device", device, "--log-every", "1",
    ]  # fmt: skip


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*cmd, "-m", "sae.cli", "train", *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torchrun_one_process(store, tmp_path, device):
    """`torchrun --nproc_per_node=1 sae train --device cuda`: the launcher's environment (RANK, LOCAL_RANK,
    WORLD_SIZE=1) trains and writes finished SAEs."""
    out = tmp_path / "out"
    res = _torchrun(1, _cli_args(store, out, device, 12))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    for name in ("batchtopk-k4-F64", "topk-k4-F64"):
        assert is_complete(out / name) and len(_log(out / name)) == 12


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_ddp_matches_one_process(store, tmp_path):
    """2 NCCL ranks (one GPU each) against one process reading the same 2 reader lanes on one GPU. Both run bf16
    autocast on the same rows; the ranks' GEMMs see half the batch, so rounding differs and the weights agree to
    bf16 precision, not bit for bit."""
    steps = 16
    ref = train(_cfg(store, tmp_path / "ref", "cuda", steps, arch=("batchtopk", "topk"), reader_lanes=2))
    out = tmp_path / "ddp"
    res = _torchrun(2, _cli_args(store, out, "cuda", steps))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    for r in ref:
        d = out / r.name
        assert is_complete(d) and load_sae(d).cfg.metadata["reader_lanes"] == 2
        for g, w in zip(_log(d), _log(r), strict=True):
            for key in ("loss", "fvu", "l0", "grad_norm"):
                assert g[key] == pytest.approx(w[key], rel=3e-2, abs=1e-6), (r.name, g["step"], key)
        wa, wb = _weights(d), _weights(r)
        for k in wa:
            rel = float((wa[k] - wb[k]).norm() / wb[k].norm().clamp_min(1e-12))
            assert rel < 2e-2, (r.name, k, rel)
