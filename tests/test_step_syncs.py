"""Host reads of the training step: what is logged does not change what is trained, and on a GPU
a step between log steps reads back only the sizes that depend on the data (sae.train.trainer.train_step says
which). The GPU half is marked `cuda` and skips without one."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _synthetic import SITE, make_store
from safetensors.torch import load_file

from sae.config import TrainConfig
from sae.saedir import sweep
from sae.train import train as run_train
from sae.train import trainer
from sae.train.archs import REGISTRY

D = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("syncs") / "s.zarr", d=D, n_contexts=120, seq_len=16, chunk_rows=64)


def _rows(d) -> dict[int, dict]:
    rows = [json.loads(line) for line in (d / trainer.LOG_FILE).read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


@pytest.mark.parametrize("decoder", ["sparse", "dense"])
def test_logging_every_step_changes_nothing(store, tmp_path, decoder):
    """log_every=1 reads every step's figures back; log_every=4 lets three steps in four run without a read. The
    runs are the same: equal rows at the shared steps and equal final weights."""
    base = dict(
        store=store,
        site=SITE,
        arch=("batchtopk", "topk", "matryoshka", "relu", "jumprelu"),
        k=(4,),
        dict_size=(64,),
        batch_size=64,
        tokens=64 * 20,
        decoder=decoder,
        device="cpu",
        l1_coeff=0.5,
    )
    every = run_train(TrainConfig(out=tmp_path / "every", log_every=1, **base))
    fourth = run_train(TrainConfig(out=tmp_path / "fourth", log_every=4, **base))
    for a, b in zip(every, fourth, strict=True):
        ra, rb = _rows(a), _rows(b)
        assert sorted(rb) == [4, 8, 12, 16, 20] and len(ra) == 20
        for step, row in rb.items():
            assert {k: v for k, v in ra[step].items() if k != "tokens_per_s"} == {
                k: v for k, v in row.items() if k != "tokens_per_s"
            }, (a.name, step)
        wa, wb = (load_file(str(d / "sae_weights.safetensors")) for d in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), a.name


@pytest.mark.cuda
@pytest.mark.parametrize("decoder", ["sparse", "dense"])
@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_steps_between_logs_read_back_only_data_dependent_sizes(tmp_path, arch, decoder):
    """torch's sync debug mode flags every host read of the device (item, a non-pinned copy, nonzero's count,
    bincount's range). A step may read the selection's size (one) and, with AuxK, the dead latents' (one); the
    rest (CSR pointers, the tie cut, counts, θ, the clip, Adam) stays on the device."""
    device = torch.device("cuda")
    cfg = TrainConfig(
        arch=(arch,), k=(4,), dict_size=(256,), batch_size=256, tokens=256 * 20, decoder=decoder, device="cuda",
        out=tmp_path, l1_coeff=0.5,
    )  # fmt: skip
    point = sweep(cfg)[0]
    r = trainer.make_run(cfg, point, D, device, 1.0, float(D))
    plan = trainer.make_plan(cfg, train_rows=256 * 20, input_scale=1.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(256, D, device=device, generator=g) for _ in range(8)]
    for step in range(4):  # first calls: allocations, library handles, θ's EMA start
        trainer.train_step(r, xs[step], 1e-3, step, plan, cfg, autocast, n_rows=256)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(4, 8):
                trainer.train_step(r, xs[step], 1e-3, step, plan, cfg, autocast, n_rows=256)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
    allowed = 1 + int(r.sae.uses_aux)  # per step: the selection's size, AuxK's dead latents
    assert len(syncs) <= 4 * allowed, syncs
