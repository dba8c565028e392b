"""SIGINT and SIGTERM stop every stage alike: exit code EXIT_CODE, one `interrupted:` line on stderr saying what
was kept and how to continue, no end-of-stage summary; then continuing as the line says finishes the work.

The signals are real (os.kill of this process) and sent from inside the stage at a chosen moment, by wrapping a
function the stage calls; the commands run in-process through click's CliRunner, in the main thread.
"""

from __future__ import annotations

import importlib
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from _synthetic import SITE as STORE_SITE
from _synthetic import make_store
from click.testing import CliRunner
from conftest import TINY_TEXT, make_model, make_tokenizer

from sae.cli import main
from sae.config import TrainConfig
from sae.interrupt import EXIT_CODE
from sae.saedir import SaeConfig, is_complete, save_sae
from sae.store import Store, done_shards
from sae.train import checkpoint
from sae.train import train as run_train

SITE = "blocks.1.hook_resid_post"
SIGNALS = [signal.SIGINT, signal.SIGTERM]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interrupt")
    p = {"model": root / "model", "corpus": root / "corpus.txt", "store": make_store(root / "store.zarr")}
    make_model("llama", n_layers=2).save_pretrained(p["model"])
    make_tokenizer().save_pretrained(p["model"])
    p["corpus"].write_text((TINY_TEXT + "\n\n") * 20)
    eye = torch.eye(64)
    weights = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(128), "W_dec": torch.cat([eye, -eye], 0)}
    weights |= {"b_dec": torch.zeros(64), "threshold": torch.zeros(128)}
    meta = {"model": {"id": str(p["model"]), "revision": None, "sha256": None}, "keep_bos": False}
    cfg = SaeConfig(architecture="jumprelu", d_in=64, d_sae=128, hook_name=SITE, complete=True, metadata=meta)
    p["sae"] = save_sae(weights, cfg, root / "sae")
    return p


def signal_on_call(monkeypatch, module: str, name: str, sig: int, *, call: int = 1, times: int = 1) -> None:
    """Replace `module.name` by a wrapper that sends `sig` to this process (`times` times) on its `call`-th call
    and then carries on: the handler runs as soon as os.kill returns, in the stage's own code."""
    mod = importlib.import_module(module)
    original = getattr(mod, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return original(*args, **kwargs)

    monkeypatch.setattr(mod, name, wrapper)


def interrupted_line(result, sig: int, stage: str) -> str:
    """The one `interrupted:` line of a command whose `stage` was stopped, after checking the exit code, that the
    stage printed no summary and that there is no traceback."""
    assert result.exit_code == EXIT_CODE, (result.exit_code, result.output, result.exc_info)
    assert f"{stage}: done" not in result.stdout and "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and result.stderr.splitlines()[-1] == lines[0], result.stderr
    assert f" stopped by {signal.Signals(sig).name}" in lines[0] and "error:" not in result.output, lines[0]
    return lines[0]


def harvest_args(env, out: Path) -> list[str]:
    return [
        "harvest", "--model", str(env["model"]), "--dataset", str(env["corpus"]), "--site", SITE, "--out", str(out),
        "--seq-len", "16", "--max-tokens", "512", "--chunk-rows", "32", "--shard-chunks", "1", "--batch-size", "2",
        "--device", "cpu", "--model-dtype", "float32",
    ]  # fmt: skip


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_harvest_keeps_finished_shards_and_the_same_command_continues(env, tmp_path, monkeypatch, sig):
    out = tmp_path / "s.zarr"
    with monkeypatch.context() as m:
        signal_on_call(m, "sae.harvest.loop", "compute_shard", sig, call=3)  # while shard 2 is computed
        line = interrupted_line(CliRunner().invoke(main, harvest_args(env, out)), sig, "harvest")
    assert done_shards(out) == {0, 1}  # the shard being written when the signal came got its marker
    assert line == (
        f"interrupted: harvest stopped by {sig.name}; 2 finished shards kept in {out}; "
        "rerun the same command to continue (finished shards are skipped)"
    )
    result = CliRunner().invoke(main, harvest_args(env, out))
    assert result.exit_code == 0, result.output
    assert Store.open(out).n_rows == 512 and "this run harvested 448 tokens" in " ".join(result.stdout.split())


def train_args(env, out: Path) -> list[str]:
    return [
        "train", str(env["store"]), "--site", STORE_SITE, "--out", str(out), "--arch", "topk", "--k", "4",
        "--dict-size", "32", "--batch-size", "64", "--tokens", str(64 * 20), "--device", "cpu", "--decoder", "dense",
    ]  # fmt: skip


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_train_checkpoints_and_resume_continues(env, tmp_path, monkeypatch, sig):
    out = tmp_path / "saes"
    with monkeypatch.context() as m:
        signal_on_call(m, "sae.train.trainer", "train_step", sig, call=3)
        line = interrupted_line(CliRunner().invoke(main, train_args(env, out)), sig, "train")
    path = out / checkpoint.DIR / checkpoint.latest_name(out)
    assert line == (
        f"interrupted: train stopped by {sig.name} after step 3 of 20; checkpoint written to {path}; "
        "continue with the same command plus --resume"
    )
    result = CliRunner().invoke(main, [*train_args(env, out), "--resume"])
    assert result.exit_code == 0 and result.stdout.startswith("train: done in "), result.output
    assert is_complete(out / "topk-k4-F32")


@pytest.mark.parametrize("step", [0, 3])
def test_a_second_ctrl_c_stops_at_once_and_says_what_is_kept(env, tmp_path, monkeypatch, step):
    """The first SIGINT asks for a checkpoint at the end of the step; a second one stops at once. What is kept is
    the last scheduled checkpoint (every 2 steps here), if there is one yet."""
    out = tmp_path / "saes"
    with monkeypatch.context() as m:
        signal_on_call(m, "sae.train.trainer", "train_step", signal.SIGINT, call=step + 1, times=2)
        line = interrupted_line(CliRunner().invoke(main, train_args(env, out)), signal.SIGINT, "train")
    again = []
    if step == 0:
        assert not checkpoint.exists(out)
        assert line.endswith("; no checkpoint was written yet; rerun the same command to continue"), line
    else:
        kept = out / checkpoint.DIR / checkpoint.latest_name(out)
        assert line.endswith(f"; the last checkpoint, {kept}, is kept; continue with the same command plus --resume")
        again = ["--resume"]
    assert line.startswith("interrupted: train stopped by SIGINT; ")
    result = CliRunner().invoke(main, [*train_args(env, out), *again])
    assert result.exit_code == 0 and is_complete(out / "topk-k4-F32"), result.output


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_eval_keeps_no_partial_report(env, tmp_path, monkeypatch, sig):
    args = ["eval", str(env["sae"]), "--dataset", str(env["corpus"]), "--out", str(tmp_path / "rep"), "--seq-len", "16"]
    args += ["--max-tokens", "128", "--batch-size", "4", "--bootstrap", "0", "--device", "cpu"]
    signal_on_call(monkeypatch, "sae.evaluate.evaluate", "run_pass", sig)
    line = interrupted_line(CliRunner().invoke(main, args), sig, "eval")
    assert line == (
        f"interrupted: eval stopped by {sig.name}; no new report in {tmp_path / 'rep'}: eval writes it only at the "
        "end; rerun the same command to continue"
    )
    assert not (tmp_path / "rep" / "report.json").exists()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_inspect_keeps_nothing_partial(env, tmp_path, monkeypatch, sig):
    cfg = TrainConfig(store=env["store"], site=STORE_SITE, out=tmp_path / "saes", arch=("topk",), k=(4,))
    [sae_dir] = run_train(TrainConfig(**{**cfg.__dict__, "dict_size": (32,), "batch_size": 64, "tokens": 640}))
    signal_on_call(monkeypatch, "sae.evaluate.inspect", "first_pass", sig)
    args = ["inspect", str(sae_dir), "--out", str(tmp_path / "site"), "--model", "none", "--device", "cpu"]
    line = interrupted_line(CliRunner().invoke(main, args), sig, "inspect")
    assert line == (
        f"interrupted: inspect stopped by {sig.name}; nothing unfinished is kept: outputs are written only once "
        "complete; rerun the same command to continue"
    )
    assert not (tmp_path / "site").exists()


def test_sae_run_says_rerun_it_and_resumes_training(env, tmp_path, monkeypatch):
    manifest = tmp_path / "run.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "harvest": {
                    "model": str(env["model"]),
                    "dataset": str(env["corpus"]),
                    "sites": [SITE],
                    "seq_len": 16,
                    "max_tokens": 1024,
                    "chunk_rows": 32,
                    "shard_chunks": 2,
                    "device": "cpu",
                    "model_dtype": "float32",
                },  # fmt: skip
                "train": {"arch": ["topk"], "k": [4], "expansion": [2], "batch_size": 64, "tokens": 1280},
                "eval": {"max_tokens": 128, "seq_len": 16, "device": "cpu"},
            }
        )
    )
    with monkeypatch.context() as m:
        signal_on_call(m, "sae.train.trainer", "train_step", signal.SIGTERM, call=2)
        line = interrupted_line(CliRunner().invoke(main, ["run", str(manifest)]), signal.SIGTERM, "train")
    # `sae run` has no --resume: it resumes training by itself when rerun
    assert line.startswith("interrupted: train stopped by SIGTERM after step 2 of 20; checkpoint written to ")
    assert line.endswith("; rerun the same command to continue") and "--resume" not in line, line
    result = CliRunner().invoke(main, ["run", str(manifest), "--stage", "train"])
    assert result.exit_code == 0 and "resuming from the checkpoint" in result.stdout, result.output
