"""The architecture table and modules: registry facts, Matryoshka BatchTopK, ReLU-L1's recipe, the fixed
reconstruction normaliser, fp32 selection under bf16 autocast, and no branches on architecture names."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from test_sae import VAR, D, F, batch, grads, make

from sae import architectures
from sae.config import TrainConfig
from sae.errors import SaeError
from sae.saedir import ARCHITECTURES, SweepPoint, sweep
from sae.train.archs import REGISTRY, check_config, make_sae
from sae.train.archs.matryoshka import resolve_widths

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (8, 32, F)


class Plan(NamedTuple):
    """The fields of the trainer's Plan that architectures read."""

    steps: int = 100
    theta_start: int = 0
    theta_decay: float = 0.9


# --------------------------------------------------------------------------------------------------
# The table


def test_every_table_entry_has_its_class_and_consistent_facts():
    assert set(REGISTRY) == set(architectures.NAMES)
    cfg_fields = set(TrainConfig.__dataclass_fields__)
    for a in architectures.TABLE:
        cls = REGISTRY[a.name]
        assert cls.arch == a.name and a.exports_as in ARCHITECTURES
        assert set(a.fields) <= cfg_fields, a.name
        if a.sweep is not None:
            assert a.sweep in cfg_fields and a.sweep in SweepPoint._fields and a.sweep in a.fields
        sae = make(a.name)
        if a.has_theta:
            sae.update_theta(torch.tensor(0.2))
        exported = sae.export()
        assert exported.cfg.architecture == a.exports_as and exported.cfg.training_architecture == a.name
        assert exported.batch_topk == a.batch_mode
        assert (exported.cfg.theta is not None) == a.has_theta
    with pytest.raises(SaeError, match="not one of"):
        architectures.get("gated")


def test_sweep_names_come_from_the_table():
    cfg = TrainConfig(arch=("matryoshka", "batchtopk", "relu"), k=(16, 32), expansion=(4,))
    names = [p.name for p in sweep(cfg)]
    assert names == ["matryoshka-k16-x4", "matryoshka-k32-x4", "batchtopk-k16-x4", "batchtopk-k32-x4", "relu-x4"]
    assert [p.k for p in sweep(cfg)][:2] == [16, 32]


def test_no_branches_on_architecture_names_outside_the_modules():
    """`arch == "…"`, `arch in (…)` and the like live only in train/archs and sae.architectures."""
    pattern = re.compile(r"\b(arch|\.arch|training_architecture|trained)\s*(==|!=|not in|in)\s*[(\[{\"']")
    allowed = {ROOT / "pipeline" / "architectures.py"}
    hits = []
    for folder in ("pipeline", "train", "evaluate", "harvest"):
        for path in (ROOT / folder).rglob("*.py"):
            if path in allowed or (ROOT / "train" / "archs") in path.parents:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


# --------------------------------------------------------------------------------------------------
# Matryoshka


def _matryoshka_reference(sae, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The Matryoshka loss written naively: dense a, one dense decode per prefix, plain autograd."""
    b = x.shape[0]
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    flat = pre.relu().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, int(sae.k) * b).indices] = True
    a = (flat * mask).view(b, F)
    terms = [((a[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum() / (b * sae.variance)) for m in sae.widths]
    recon = torch.stack(terms).mean()
    x_hat = a @ sae.W_dec + sae.b_dec
    n_dead = int(dead.sum())
    k_aux = min(sae.k_aux, n_dead)
    masked = torch.where(dead[None], pre, torch.full_like(pre, -math.inf))
    top = torch.topk(masked, k_aux, dim=1)
    a_aux = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    e = (x - x_hat).detach()
    aux = (a_aux @ sae.W_dec - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return recon + sae.aux_alpha * min(n_dead / sae.k_aux, 1.0) * aux


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
def test_matryoshka_matches_naive_reference(decoder):
    x = batch(32)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::5] = True
    sae = make("matryoshka", widths=WIDTHS)
    out = sae(x, dead, decoder=decoder)
    out.loss.backward()
    ref = make("matryoshka", widths=WIDTHS)
    loss = _matryoshka_reference(ref, x, dead)
    loss.backward()
    assert out.sparse == (decoder == "sparse") and out.n_dead == int(dead.sum())
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(sae)[name], g, rtol=1e-4, atol=1e-5, msg=name)
    # the prefixes matter: the whole-dictionary term alone (BatchTopK's loss on the same weights) differs
    btk = make("batchtopk")
    assert abs(btk(x, dead, decoder=decoder).loss.item() - out.loss.item()) > 1e-3
    torch.testing.assert_close(btk(x, dead, decoder=decoder).x_hat, out.x_hat, rtol=1e-5, atol=1e-5)


def test_matryoshka_selects_once_over_the_whole_dictionary():
    x = batch(40)
    m, b = make("matryoshka", widths=WIDTHS), make("batchtopk")
    om, ob = m(x, decoder="sparse"), b(x, decoder="sparse")
    assert torch.equal(om.rows, ob.rows) and torch.equal(om.cols, ob.cols)  # one global BatchTopK selection
    assert om.rows.numel() == 4 * 40


def test_matryoshka_widths_are_validated():
    assert resolve_widths((0.25, 0.5, 1), 64) == (16, 32, 64)
    assert resolve_widths((16, 40, 64), 64) == (16, 40, 64)
    assert resolve_widths((1.0,), 64) == (64,)
    bad = {
        (): "empty",
        (16, 8, 64): "increase",
        (16, 32): "last width must be the dictionary size 64",
        (0.25, 0.5): "end at 1",
        (-8, 64): "positive",
        (0, 64): "positive",
        (16.5, 64): "whole numbers",
        (0.01, 0.011, 1): "increase",  # both round to 1 latent of 64
    }
    for widths, msg in bad.items():
        with pytest.raises(SaeError, match=msg) as e:
            resolve_widths(widths, 64)
        assert "\n" not in str(e.value) and "--matryoshka-widths" in str(e.value)
    cfg = TrainConfig(arch=("batchtopk", "matryoshka"), matryoshka_widths=(8, 32, 48), dict_size=(64,))
    with pytest.raises(SaeError, match="dictionary size 64"):
        check_config(cfg, sweep(cfg), D)
    check_config(TrainConfig(arch=("matryoshka",), matryoshka_widths=(8, 32, 64), dict_size=(64,)), [], D)


def test_matryoshka_exports_widths_and_loads_in_sae_lens(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = make("matryoshka", widths=WIDTHS)
    sae.set_input_scale(2.0)
    sae.update_theta(torch.tensor(0.3))
    path = sae.save(tmp_path / "m", model_name="gpt2", hook_name="blocks.0.hook_resid_post", complete=True)
    theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    assert theirs.cfg.architecture() == "jumprelu"
    assert list(theirs.cfg.metadata.matryoshka_widths) == list(WIDTHS)
    assert theirs.cfg.metadata.training_architecture == "matryoshka"
    raw = batch(8) / 2.0
    ours = sae.export()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(raw), ours.encode(raw), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.threshold, torch.full((F,), 0.3))


# --------------------------------------------------------------------------------------------------
# ReLU-L1 as documented (Anthropic, April 2024)


def test_relu_decoder_rows_are_free_and_lambda_warms_up():
    sae = make("relu")
    assert sae.W_dec.norm(dim=1).sub(0.1).abs().max() < 1e-5  # the recipe's initial decoder norm
    x = batch(32)
    plan = Plan(steps=100)  # warm-up over 5 steps
    sae.before_step(0, plan)
    first = sae(x, decoder="sparse")
    assert sae.l1_factor == pytest.approx(0.2)
    assert first.loss.item() == pytest.approx(first.mse.item() + 0.2 * sae.l1_coeff * first.sparsity_loss.item())
    first.loss.backward()
    sae.remove_parallel_grad()
    g = sae.W_dec.grad
    assert (torch.einsum("fd,fd->f", g, sae.W_dec).abs() > 1e-6).any()  # the norms get gradient
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, F)[:, None])
    before = sae.W_dec.detach().norm(dim=1)
    sae.after_step(first, 32, 0, plan)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), before)  # no renormalisation
    sae.before_step(4, plan)
    assert sae.l1_factor == 1.0
    sae.before_step(50, plan)
    assert sae.l1_factor == 1.0 and sae.metadata() == {"l1_coeff": sae.l1_coeff, "l1_warmup_fraction": 0.05}


# --------------------------------------------------------------------------------------------------
# The reconstruction term does not depend on which rows share the batch


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_loss_stays_flat_when_a_massive_row_enters_the_batch(arch):
    """With the fixed dataset variance, adding one row changes B·loss by that row's own error only (exactly with
    a per-row selection; BatchTopK's shared budget moves a little). The per-batch FVU is still reported."""
    x = batch(32)
    massive = torch.full((1, D), 40.0)  # ‖x‖ = 160, ~25× the other rows'
    sae = make(arch, widths=WIDTHS)
    small = sae(x, decoder="sparse")
    big = sae(torch.cat([x, massive]), decoder="sparse")
    own = big.recon_loss.item() * 33 - small.recon_loss.item() * 32
    if arch == "topk":  # per-row selection: the other rows' reconstructions are unchanged, exactly
        err = (big.x_hat[32] - massive[0]).pow(2).sum().item() / VAR
        assert own == pytest.approx(err, rel=1e-5)
        torch.testing.assert_close(big.x_hat[:32], small.x_hat)
    assert own > 0
    xb = torch.cat([x, massive])
    fvu = (big.x_hat - xb).pow(2).sum() / (xb - xb.mean(0)).pow(2).sum()
    assert big.fvu.item() == pytest.approx(fvu.item(), rel=1e-5)  # the batch's own FVU, logged beside it
    typical = (big.x_hat[:32] - x).pow(2).sum().item() / (32 * VAR)
    assert typical == pytest.approx((small.x_hat - x).pow(2).sum().item() / (32 * VAR), rel=0.5)


# --------------------------------------------------------------------------------------------------
# Precision under bf16 autocast (selection, θ, STE and both decoders in fp32)


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "matryoshka", "jumprelu", "relu"])
def test_bf16_autocast_changes_no_selection_and_decoders_agree(arch):
    x = batch(64)
    ref = make(arch, widths=WIDTHS)(x, decoder="sparse")
    outs = {}
    for decoder in ("sparse", "dense"):
        sae = make(arch, widths=WIDTHS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x, decoder=decoder)
        out.loss.backward()
        outs[decoder] = out
        assert out.x_hat.dtype == torch.float32 and out.loss.dtype == torch.float32
        assert all(p.grad.dtype == torch.float32 for p in sae.parameters())
    s, d = outs["sparse"], outs["dense"]
    assert torch.equal(s.rows, ref.rows) and torch.equal(s.cols, ref.cols)
    assert s.min_act.item() == ref.min_act.item()  # θ's EMA sees the fp32 value
    torch.testing.assert_close(d.x_hat, s.x_hat, rtol=1e-5, atol=1e-5)  # the same precision on both paths
    torch.testing.assert_close(d.loss, s.loss, rtol=1e-5, atol=1e-6)


def test_jumprelu_threshold_gradient_is_fp32_under_autocast():
    x = batch(64)
    grads_ = {}
    for auto in (False, True):
        sae = make("jumprelu")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto):
            out = sae(x, decoder="dense")
        out.loss.backward()  # outside autocast, as the trainer does (and torch recommends)
        grads_[auto] = sae.threshold.grad
    torch.testing.assert_close(grads_[True], grads_[False], rtol=1e-5, atol=1e-6)


def test_theta_update_runs_through_after_step():
    sae = make("batchtopk")
    out = sae(batch(32))
    sae.after_step(out, 32, 0, Plan(theta_start=1))
    assert int(sae.theta_updates) == 0  # before θ's warm-up ends
    sae.after_step(out, 32, 1, Plan(theta_start=1))
    assert sae.theta.item() == pytest.approx(out.min_act.item()) and sae.theta_ready()
    assert make_sae("matryoshka", D, F, variance=VAR, k=4).theta_ready() is False


# --------------------------------------------------------------------------------------------------
# DDP: each rank's loss and gradients are its share of one process's on the whole batch


def _ddp_worker(rank: int, world: int, init_file: str, x: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    from sae.train.ddp import destroy_process_group

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sae = make("matryoshka", widths=WIDTHS)
        sae.process_group = dist.group.WORLD
        dead = torch.zeros(F, dtype=torch.bool)
        dead[::3] = True
        out = sae(x.chunk(world)[rank], dead, decoder="sparse")
        out.loss.backward()
        torch.save({"loss": out.loss.detach(), "grads": grads(sae), "fired": out.fired}, f"{out_dir}/{rank}.pt")
    finally:
        destroy_process_group()  # (right after a collective: torch < 2.8 could hang here)


def test_matryoshka_under_ddp_sums_to_one_process(tmp_path):
    world, x = 2, batch(40)
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(world, str(tmp_path / "init"), x, str(tmp_path)), nprocs=world, join=True,
        start_method="fork",
    )  # fmt: skip
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    sae = make("matryoshka", widths=WIDTHS)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    one = sae(x, dead, decoder="sparse")
    one.loss.backward()
    assert sum(g["loss"] for g in got).item() == pytest.approx(one.loss.item(), rel=1e-5)
    for name, g in grads(sae).items():
        torch.testing.assert_close(got[0]["grads"][name] + got[1]["grads"][name], g, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(g["fired"], one.fired) for g in got)


# --------------------------------------------------------------------------------------------------
# In a sweep beside BatchTopK, from one data pass; a run cut after a checkpoint resumes bit-exactly


def test_matryoshka_in_a_sweep_resumes_exactly(tmp_path, monkeypatch):
    from dataclasses import replace

    from _synthetic import SITE, make_store
    from safetensors.torch import load_file

    from sae.saedir import is_complete, load_sae
    from sae.train import checkpoint
    from sae.train import train as run_train

    store = make_store(tmp_path / "s.zarr", d=D, n_contexts=120, seq_len=16, chunk_rows=64)
    cfg = TrainConfig(
        store=store, site=SITE, out=tmp_path / "ref", arch=("batchtopk", "matryoshka"), k=(4,), dict_size=(64,),
        matryoshka_widths=(8, 16, 64), batch_size=64, tokens=64 * 40, checkpoint_every=64 * 10, buffer_mb=0,
        decoder="sparse", device="cpu", log_every=5,
    )  # fmt: skip
    ref = run_train(cfg)
    assert [d.name for d in ref] == ["batchtopk-k4-F64", "matryoshka-k4-F64"]
    m = load_sae(ref[1])
    assert m.cfg.architecture == "jumprelu" and m.cfg.metadata["matryoshka_widths"] == [8, 16, 64]
    assert m.cfg.theta is not None and m.cfg.k == 4

    class Cut(Exception):
        pass

    save = checkpoint.save_run

    def save_then_die(*a, **kw):
        save(*a, **kw)
        raise Cut  # as a kill right after the first checkpoint

    monkeypatch.setattr(checkpoint, "save_run", save_then_die)
    cut = replace(cfg, out=tmp_path / "cut")
    with pytest.raises(Cut):
        run_train(cut)
    monkeypatch.undo()
    run_train(replace(cut, resume=True))
    for d in ref:
        got = cut.out / d.name
        assert is_complete(got)
        a, b = load_file(str(d / "sae_weights.safetensors")), load_file(str(got / "sae_weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d.name
        assert _log_rows(got) == _log_rows(d)


def _log_rows(d: Path) -> list[dict]:
    """An SAE's log without its timings."""
    keys = ("step", "loss", "recon_loss", "fvu", "l0", "theta", "l0_theta", "fvu_theta", "fvu_batch")
    return [{k: r.get(k) for k in keys} for r in map(json.loads, (d / "train_log.jsonl").read_text().splitlines())]


def test_bad_widths_are_one_line_exit_2_and_write_nothing(tmp_path):
    from _synthetic import SITE, make_store
    from click.testing import CliRunner

    from sae import cli

    store = make_store(tmp_path / "s.zarr", d=D, n_contexts=20, seq_len=16, chunk_rows=64)
    out = tmp_path / "out"
    args = ["train", str(store), "--site", SITE, "--out", str(out), "--arch", "batchtopk,matryoshka"]
    args += ["--dict-size", "64", "--matryoshka-widths", "8,4,64", "--device", "cpu"]
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --matryoshka-widths 8,4,64: widths must increase")
    assert not out.exists()
