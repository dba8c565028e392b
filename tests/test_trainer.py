"""The trainer: it learns, sweeps write one directory per SAE, kills and preemptions resume exactly, bad input
is refused without damage. Synthetic stores (d=16) except the one slow test on real SmolLM2 activations."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _synthetic import SITE, make_store
from click.testing import CliRunner
from safetensors.torch import load_file

from sae import cli
from sae.config import TrainConfig
from sae.errors import SaeError
from sae.interrupt import EXIT_CODE
from sae.saedir import is_complete, load_sae, sweep
from sae.train import checkpoint, trainer
from sae.train import train as run_train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 6400 rows (400 contexts of 16, BOS first) in 100 chunks, from a known dictionary of 64 directions with 4
    # active per row.
    return make_store(tmp_path_factory.mktemp("trainer") / "s.zarr", d=16, n_contexts=400, seq_len=16, chunk_rows=64)


def _cfg(store, out, **kw):
    base = dict(store=store, site=SITE, out=out, k=(4,), dict_size=(64,), batch_size=64, tokens=64 * 200, device="cpu")
    return TrainConfig(**{**base, **kw})


def _log(path):
    return [json.loads(line) for line in (path / trainer.LOG_FILE).read_text().splitlines()]


def _weights(path):
    return load_file(str(path / "sae_weights.safetensors"))


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _listing(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_learns_sparse_data(store, tmp_path):
    (d,) = run_train(_cfg(store, tmp_path / "out", tokens=64 * 400, decoder="dense"))
    log = _log(d)
    train_rows = [r for r in log if r["split"] == "train"]
    val = [r for r in log if r["split"] == "val"]
    assert train_rows[0]["fvu"] > 0.8 and train_rows[-1]["fvu"] < 0.35
    assert len(val) == 10 and val[-1]["fvu_theta"] < 0.4 and val[-1]["fvu_batch"] < 0.4
    assert val[0]["fvu_theta"] is None  # θ's EMA starts after 10% of the run: no θ mode before
    assert val[-1]["fvu_batch"] < val[0]["fvu_batch"] and val[-1]["fvu_theta"] < val[1]["fvu_theta"]
    assert abs(val[-1]["l0_batch"] - 4) < 0.5 and 2.5 < val[-1]["l0_theta"] < 5.5
    # the exported SAE works in raw units: its reconstruction of raw held-out rows matches the logged FVU
    sae = load_sae(d)
    cfg = sae.cfg
    assert cfg.architecture == "jumprelu" and cfg.training_architecture == "batchtopk" and cfg.k == 4
    assert cfg.hook_name == SITE and cfg.model_name == "synthetic" and cfg.complete
    assert cfg.metadata["keep_bos"] is False and cfg.metadata["tokens_seen"] == 64 * 400
    assert cfg.metadata["store"] == str(Path(store).resolve()) and cfg.theta > 0 and cfg.input_scale > 0
    assert (d / cfg.metadata["store_relative"]).resolve() == Path(store).resolve()  # found after a move too
    assert torch.all(sae.threshold == cfg.theta)
    assert not (tmp_path / "out" / checkpoint.DIR).exists()  # removed once the SAEs are final
    assert not (tmp_path / "out" / trainer.LOG_DIR).exists()  # the logs live on in the SAE directories


def test_sweep_one_directory_per_sae(store, tmp_path):
    cfg = _cfg(
        store,
        tmp_path / "out",
        arch=("batchtopk", "topk", "relu", "jumprelu"),
        k=(2, 4),
        dict_size=(32, 48),
        l0_coeff=(0.1,),
        tokens=64 * 30,
        keep_bos=True,
        decoder="sparse",
    )
    dirs = run_train(cfg)
    names = sorted(p.name for p in dirs)
    assert names == sorted(
        [f"{a}-k{k}-F{f}" for a in ("batchtopk", "topk") for k in (2, 4) for f in (32, 48)]
        + ["relu-F32", "relu-F48", "jumprelu-l0c0.1-F32", "jumprelu-l0c0.1-F48"]
    )
    archs = {"batchtopk": "jumprelu", "topk": "topk", "relu": "standard", "jumprelu": "jumprelu"}
    for d in dirs:
        sae = load_sae(d)
        assert is_complete(d) and sae.cfg.architecture == archs[sae.cfg.training_architecture]
        assert sae.cfg.d_sae == int(d.name.rsplit("F", 1)[1]) and sae.cfg.metadata["keep_bos"] is True
        assert sae.cfg.metadata["tokens_seen"] == 64 * 30
        assert [r["step"] for r in _log(d) if r["split"] == "train"] == list(range(10, 31, 10))
        if sae.cfg.training_architecture == "jumprelu":  # θ's own lr (√d by default) and its trajectory
            assert sae.cfg.metadata["jumprelu_lr_scale"] == pytest.approx(4.0)
            assert sae.cfg.metadata["jumprelu_init_threshold"] == 1.0
            assert all("threshold_mean" in r for r in _log(d) if r["split"] == "train")


def _run_cfg(store, out, **kw):
    # 200 steps with a checkpoint every 20: a stop soon after the first checkpoint lands mid-run. --buffer-mb 0
    # keeps the reader at its 32-chunk minimum, so the resumed reader restarts inside a multi-group epoch.
    return _cfg(store, out, tokens=64 * 200, checkpoint_every=64 * 20, buffer_mb=0, decoder="dense", **kw)


def _cli_args(cfg):
    return [
        str(cfg.store), "--site", cfg.site, "--out", str(cfg.out), "--k", "4", "--dict-size", "64",
        "--batch-size", "64", "--tokens", str(cfg.tokens), "--checkpoint-every", str(cfg.checkpoint_every),
        "--buffer-mb", "0", "--device", "cpu", "--decoder", "dense",
    ]  # fmt: skip


def _wait_for_checkpoint(out, alive, timeout=300):
    t0 = time.monotonic()
    while not checkpoint.exists(out):
        assert alive() and time.monotonic() - t0 < timeout
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """An uninterrupted run."""
    (d,) = run_train(_run_cfg(store, tmp_path_factory.mktemp("ref") / "out"))
    return d


def _assert_same_as_reference(out, reference):
    d = out / reference.name
    keys = ("step", "loss", "fvu", "l0", "theta", "dead_fraction", "lr", "fvu_theta", "l0_theta")
    strip = lambda rows: [{k: r.get(k) for k in keys} for r in rows]
    assert strip(_log(d)) == strip(_log(reference))  # the log continues where the checkpoint left it
    assert is_complete(d) and _same_weights(d, reference)  # bit-identical weights, θ included


def test_sigkill_then_resume_is_exact(store, reference, tmp_path):
    cfg = _run_cfg(store, tmp_path / "out")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sae.cli", "train", *_cli_args(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(cfg.out, lambda: proc.poll() is None)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    assert not is_complete(cfg.out / reference.name)
    before = _listing(cfg.out)
    with pytest.raises(SaeError, match="--resume"):  # without --resume: refused, nothing touched
        run_train(cfg)
    assert _listing(cfg.out) == before
    run_train(replace(cfg, resume=True))
    _assert_same_as_reference(cfg.out, reference)


def test_sigterm_checkpoints_and_exits(store, reference, tmp_path):
    cfg = _run_cfg(store, tmp_path / "out")
    seen = []

    def preempt():  # what a cluster scheduler does: SIGTERM while the job runs
        _wait_for_checkpoint(cfg.out, lambda: True)
        seen.append(checkpoint.latest_name(cfg.out))
        os.kill(os.getpid(), signal.SIGTERM)

    # A SIGTERM landing after `train` returned must not end pytest: catch it out here.
    old = signal.signal(signal.SIGTERM, lambda *a: seen.append("late"))
    try:
        threading.Thread(target=preempt, daemon=True).start()
        result = CliRunner().invoke(cli.main, ["train", *_cli_args(cfg)])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert result.exit_code == EXIT_CODE, result.output
    assert "done in" not in result.stdout  # a stopped stage prints no summary
    last = checkpoint.latest_name(cfg.out)
    message = " ".join(result.stderr.split())
    assert "stopped by SIGTERM" in message and "--resume" in message
    assert f"checkpoint written to {cfg.out / checkpoint.DIR / last}" in message
    assert last >= seen[0] and not is_complete(cfg.out / reference.name)
    assert sorted(p.name for p in (cfg.out / checkpoint.DIR).iterdir()) == sorted([checkpoint.LATEST, last])
    run_train(replace(cfg, resume=True))
    _assert_same_as_reference(cfg.out, reference)


class _StopAtOnce(trainer._StopFlag):
    """As if SIGTERM arrived during the first step."""

    def __enter__(self):
        self.signum = signal.SIGTERM
        return self


def test_checkpoint_files_are_safetensors_and_json(store, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "_StopFlag", _StopAtOnce)
    with pytest.raises(trainer.TrainingInterrupted, match="after step 1 of"):
        run_train(_cfg(store, tmp_path / "out"))
    ck = tmp_path / "out" / checkpoint.DIR
    assert (ck / checkpoint.LATEST).read_text().strip() == "step-000000001"
    assert sorted(p.name for p in (ck / "step-000000001").iterdir()) == ["state.json", "tensors.safetensors"]
    loaded = checkpoint.load(tmp_path / "out")
    assert loaded.state["step"] == 1 and loaded.state["reader"]["positions"] == [[0, 0, 64]]
    assert "batchtopk-k4-F64/opt/0/exp_avg" in loaded.tensors
    # a write killed half-way leaves a temporary folder, which neither counts nor survives the next save
    (ck / ".step-000000002.junk").mkdir()
    assert checkpoint.load(tmp_path / "out").path.name == "step-000000001"
    checkpoint.save(tmp_path / "out", 2, {"t": torch.ones(2)}, {"step": 2})
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-000000002"]


def test_bad_inputs_are_refused_without_damage(tmp_path, monkeypatch):
    sites = (SITE, "blocks.1.hook_resid_post")
    store = make_store(tmp_path / "s.zarr", d=16, n_contexts=64, sites=sites)
    out = tmp_path / "out"
    with pytest.raises(SaeError, match=f"no site 'blocks.9.hook_mlp_out'; its sites: {SITE}, {sites[1]}"):
        run_train(_cfg(store, out, site="blocks.9.hook_mlp_out"))
    unfinished = make_store(tmp_path / "unfinished.zarr", d=16, n_contexts=64, done=False)
    with pytest.raises(SaeError, match="not finished"):
        run_train(_cfg(unfinished, out))
    assert not out.exists()

    # a run with a checkpoint (interrupted at step 1)
    monkeypatch.setattr(trainer, "_StopFlag", _StopAtOnce)
    with pytest.raises(trainer.TrainingInterrupted):
        run_train(_cfg(store, out))
    monkeypatch.undo()
    before = _listing(out)
    with pytest.raises(SaeError, match="holds a run with a checkpoint.*--resume"):
        run_train(_cfg(store, out))
    with pytest.raises(SaeError, match=r"other settings \(--k: run has \[4\], now \[8\]"):
        run_train(_cfg(store, out, k=(8,), resume=True))
    with pytest.raises(SaeError, match=f"--site: run has '{SITE}', now '{sites[1]}'"):
        run_train(_cfg(store, out, site=sites[1], resume=True))
    wider = make_store(tmp_path / "wider.zarr", d=32, n_contexts=64, sites=sites)
    with pytest.raises(SaeError, match="trained on d_model 16, but store .* has d_model 32"):
        run_train(_cfg(wider, out, resume=True))
    assert _listing(out) == before

    # a folder holding something else
    foreign = tmp_path / "foreign"
    (foreign / "batchtopk-k4-F64").mkdir(parents=True)
    (foreign / "batchtopk-k4-F64" / "notes.txt").write_text("mine")
    with pytest.raises(SaeError, match="not ours"):
        run_train(_cfg(store, foreign))
    assert _listing(foreign) == {"batchtopk-k4-F64/notes.txt": b"mine"}
    with pytest.raises(SaeError, match="no training run to resume"):
        run_train(_cfg(store, tmp_path / "empty", resume=True))


def test_non_finite_rows_stop_training(tmp_path):
    bad = make_store(tmp_path / "nan.zarr", d=16, n_contexts=64, chunk_rows=64, poison={100: float("inf")})
    with pytest.raises(SaeError, match=r"NaN or Inf \(store rows \d+\)"):
        run_train(_cfg(bad, tmp_path / "out", tokens=64 * 40, val_chunks=1))
    assert not is_complete(tmp_path / "out" / "batchtopk-k4-F64")


def test_plan_defaults_scale_with_the_run():
    cfg = TrainConfig(batch_size=100)
    p = trainer.make_plan(cfg, train_rows=100_000, input_scale=1.0)
    assert (p.steps, p.warmup_steps, p.decay_steps, p.theta_start) == (1000, 50, 200, 100)
    assert p.dead_tokens == 10_000 and p.checkpoint_steps == 100 and p.theta_decay == 0.99
    short = trainer.make_plan(replace(cfg, tokens=4500), train_rows=100_000, input_scale=1.0)
    assert short.steps == 45 and short.theta_decay == pytest.approx(1 - 1 / 4.5)  # θ keeps up in short runs
    big = trainer.make_plan(replace(cfg, batch_size=4096), train_rows=10**9, input_scale=1.0)
    assert (big.warmup_steps, big.theta_start, big.dead_tokens) == (1000, 1000, 10_000_000)
    lrs = [p.lr_factor(s) for s in range(p.steps)]
    assert lrs[0] == 1 / 50 and lrs[49] == 1 and lrs[799] == 1 and lrs[-1] == 1 / 200
    assert trainer.default_lr(2**14) == 2e-4 and trainer.default_lr(4 * 2**14) == 1e-4
    with pytest.raises(SaeError, match="less than one batch"):
        trainer.make_plan(replace(cfg, tokens=50), train_rows=100_000, input_scale=1.0)


def test_default_length_makes_enough_steps_on_a_small_store():
    """Without --tokens: one pass, or more passes over a small store until MIN_STEPS (at most
    MAX_DEFAULT_PASSES); a run still shorter is warned about with the fix."""
    from sae.train.plan import MAX_DEFAULT_PASSES, MIN_STEPS, short_run_warning

    cfg = TrainConfig(batch_size=4096)
    one = trainer.make_plan(cfg, train_rows=4096 * (MIN_STEPS + 5), input_scale=1.0)
    assert one.steps == MIN_STEPS + 5 and short_run_warning(one, 4096 * (MIN_STEPS + 5), False) is None
    small = trainer.make_plan(cfg, train_rows=4096 * 20, input_scale=1.0)  # 20 steps a pass: 4 passes
    assert small.steps == 80 and small.steps >= MIN_STEPS and short_run_warning(small, 4096 * 20, False) is None
    tiny = trainer.make_plan(cfg, train_rows=4096, input_scale=1.0)
    assert tiny.steps == MAX_DEFAULT_PASSES
    warning = short_run_warning(tiny, 4096, False)
    assert warning.startswith(f"warning: only {MAX_DEFAULT_PASSES} optimizer steps") and "--batch-size" in warning
    given = trainer.make_plan(replace(cfg, tokens=4096 * 10), train_rows=4096 * 100, input_scale=1.0)
    assert given.steps == 10 and "more --tokens" in short_run_warning(given, 4096 * 100, True)


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory):
    """65,536 tokens of SmolLM2-135M's blocks.15 residual stream (8 chunks of 8192 rows) harvested from the
    shared test corpus, once per session."""
    from sae.config import HarvestConfig
    from sae.harvest import harvest

    corpus = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "train.jsonl.gz"
    if not corpus.exists():
        pytest.skip(f"{corpus} is not available")
    out = tmp_path_factory.mktemp("smollm2") / "l15.zarr"
    harvest(
        HarvestConfig(
            out=out,
            model="smollm2-135m",
            dataset=str(corpus),
            sites=("blocks.15.hook_resid_post",),
            seq_len=128,
            max_tokens=65536,
            batch_size=16,
            shard_chunks=4,
        )  # fmt: skip
    )
    return out


@pytest.mark.slow
def test_smollm2_theta_mode_l0_matches_k(smollm2_store, tmp_path):
    """On held-out rows of real activations, the exported θ (JumpReLU) gives a mean L0 within 10% of k after a
    short run, with the FVU of batch mode."""
    k = 32
    (d,) = run_train(
        TrainConfig(
            store=smollm2_store,
            site="blocks.15.hook_resid_post",
            out=tmp_path / "out",
            k=(k,),
            expansion=(4,),
            batch_size=1024,
            tokens=2 * 7 * 8192,
            val_chunks=1,
            device="cpu",
        )  # fmt: skip
    )
    final = [r for r in _log(d) if r["split"] == "val"][-1]
    assert final["rows"] > 4000  # every second held-out row (the others calibrate θ)
    assert abs(final["l0_theta"] - k) <= 0.1 * k, final
    assert final["fvu_theta"] < 0.5 and abs(final["fvu_theta"] - final["fvu_batch"]) < 0.05, final
    sae = load_sae(d)
    # SAELens users load the model by model_name: the hub id; our alias stays in metadata.model
    assert (
        sae.cfg.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
        and sae.cfg.metadata["model"]["id"] == "smollm2-135m"
    )
    assert sae.cfg.metadata["model_source"]["gguf"].endswith(".Q4_1.gguf")  # what the weights really were
    assert sae.cfg.hook_name == "blocks.15.hook_resid_post"


def test_progress_lines_and_summary_when_not_a_tty(store, tmp_path, monkeypatch, capsys):
    """A batch log (stderr not a terminal) gets plain progress lines with done/total, tok/s, ETA and each SAE's
    figures by name, then a summary paragraph per SAE with the final validation numbers."""
    monkeypatch.setenv("SAE_PROGRESS_INTERVAL", "1e-9")  # a line on every step
    cfg = _cfg(store, tmp_path / "out", arch=("batchtopk", "topk"), tokens=64 * 20, log_every=1)
    with monkeypatch.context() as m:  # a preempted run's log ends with how far it got, and no summary
        m.setattr(trainer, "_StopFlag", _StopAtOnce)
        with pytest.raises(trainer.TrainingInterrupted, match="train stopped by SIGTERM after step 1 of 20"):
            run_train(replace(cfg, out=tmp_path / "stopped"))
    captured = capsys.readouterr()
    assert "train: done" not in captured.out
    last = captured.err.splitlines()[-1]
    assert last.startswith("train: 64/1,280 tok (5.0%) ") and "| batchtopk-k4-F64: loss " in last, last
    dirs = run_train(replace(cfg, log_every=5))
    captured = capsys.readouterr()
    err, out = captured.err.splitlines(), captured.out.splitlines()
    # a run of 20 steps says first that it is too short, and how to lengthen it
    assert err[0].startswith("warning: only 20 optimizer steps (1,280 tokens") and "--batch-size" in err[0]
    assert err[1] == "train: started, 1,280 tok"
    lines = [s for s in err if s.startswith("train: ") and " tok (" in s]
    assert len(lines) >= 20 and all(" tok/s " in s for s in lines)
    assert lines[5].startswith("train: 384/1,280 tok (30.0%) ") and " ETA 0:" in lines[5]
    assert "| batchtopk-k4-F64: loss " in lines[5] and " | topk-k4-F64: loss " in lines[5]
    assert lines[-1].startswith("train: 1,280/1,280 tok (100.0%) ") and " in 0:" in lines[-1]
    assert " L0 4.0 dead " in lines[-1] and "%" in lines[-1]
    head = out.index(next(s for s in out if s.startswith("train: done in ")))
    assert re.match(r"train: done in \d+:\d\d:\d\d \(1,280 tok, [\d.]+k? tok/s\)", out[head])
    for d, line in zip(dirs, out[head + 1 : head + 3], strict=True):
        val = [r for r in _log(d) if r["split"] == "val"][-1]
        assert line.startswith(f"  {d.name}: L0 {val['l0_theta']:.1f}, FVU {val['fvu_theta']:.3f} on ")
        assert f"on {val['rows']:,} validation rows" in line and re.search(r"dead \d+\.\d%$", line)
    assert "batch mode L0 " in out[head + 1]  # BatchTopK: exported threshold and batch mode both


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_tty_labels_figures_by_sae(store, tmp_path, monkeypatch, capsys):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    run_train(_cfg(store, tmp_path / "out", arch=("batchtopk", "topk"), tokens=64 * 20, log_every=5))
    text = term.getvalue()
    assert "train: started" not in text and "\r" in text  # a tqdm bar, not plain lines
    assert re.search(r"tok/s, batchtopk-k4-F64: loss \S+ L0 \S+ dead \S+% \| topk-k4-F64: loss \S+ L0", text)
    assert "loss=" not in text  # not the old unlabelled a/b pairs
    assert "train: done in " in capsys.readouterr().out


def test_checkpoint_holds_no_cuda_rng(store, tmp_path, monkeypatch):
    """Only the RNGs a run draws from are saved: none of the 11 GPUs' CUDA RNGs (their keys would sort as
    strings, cuda/10 before cuda/2) and a resume does not touch them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # Adam asks (CUDA build, no GPU)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 11)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(8, dtype=torch.uint8)] * 11)

    def refuse(*a):
        raise AssertionError("set_rng_state_all called")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    monkeypatch.setattr(trainer, "_StopFlag", _StopAtOnce)
    with pytest.raises(trainer.TrainingInterrupted):
        run_train(_cfg(store, tmp_path / "out"))
    loaded = checkpoint.load(tmp_path / "out")
    assert [k for k in loaded.tensors if k.startswith("rng/")] == ["rng/torch"]
    cfg = _cfg(store, tmp_path / "out")
    runs = [trainer.make_run(cfg, p, 16, torch.device("cpu"), 1.0, 1.0) for p in sweep(cfg)]
    checkpoint.restore_run(loaded, runs, truncate_logs=False)
