"""`sae harvest` end to end on tiny models: stored rows equal a plain forward, a SIGKILL at any moment is resumed
to the very bytes of an uninterrupted run, array tasks running at once equal one process, bad input is refused
with nothing touched."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCHS, make_model, make_tokenizer

from sae.config import HarvestConfig
from sae.errors import SaeError
from sae.harvest import harvest, shard_task
from sae.interrupt import EXIT_CODE
from sae.store import Store, from_storage

HELDOUT = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "heldout.jsonl.gz"

# Shards of 128 rows straddle the 48-token contexts; 4800 tokens make 38 shards, the last one of 64 rows.
# The device and the model dtype are pinned: the defaults (`auto`) would harvest with a bfloat16 model on a GPU
# machine, and these tests compare rows with a float32 CPU forward exactly or to float32 tolerances.
SITES = ("blocks.1.hook_resid_post", "blocks.2.hook_mlp_out")
SMALL = dict(
    seq_len=48, chunk_rows=64, shard_chunks=2, max_tokens=4800, batch_size=8, sites=SITES, device="cpu",
    model_dtype="float32",
)  # fmt: skip


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    # Under a SLURM array job every plain run would otherwise become one array task.
    for k in [k for k in os.environ if k.startswith("SLURM_ARRAY")]:
        monkeypatch.delenv(k)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The held-out test corpus when present, else a small generated one (the tests need ~5k tokens)."""
    if HELDOUT.is_file():
        return HELDOUT
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rng = np.random.default_rng(0)
    words = "the king is dead long live the queen to be or not def f x return import os print".split()
    with open(path, "w") as f:
        for _ in range(600):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 60))}) + "\n")
    return path


def save_model(path: Path, arch: str = "llama") -> Path:
    make_model(arch).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("tiny-llama"))


def config(out, model_dir, corpus, **kw) -> HarvestConfig:
    return HarvestConfig(**{"out": Path(out), "model": str(model_dir), "dataset": str(corpus), **SMALL, **kw})


def cli_args(cfg: HarvestConfig) -> list[str]:
    """The `sae harvest` command line of a config (only what differs from the defaults)."""
    args = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        if f.name == "sites":
            args += [a for s in value for a in ("--site", s)]
        elif value is True:
            args.append("--" + f.name.replace("_", "-"))
        else:
            args += ["--" + f.name.replace("_", "-"), str(value)]
    return [sys.executable, "-m", "sae.cli", "harvest", *args]


def subprocess_env() -> dict[str, str]:
    # One torch thread in every process that writes a store compared byte for byte (the baseline too): equal
    # thread counts make equal float results, and three processes on two cores do not fight over spinning threads.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, llama_dir, corpus):
    """One uninterrupted single-process run: what every resumed or array-job store must equal."""
    out = tmp_path_factory.mktemp("baseline") / "store.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (see subprocess_env)
    try:
        harvest(config(out, llama_dir, corpus))
    finally:
        torch.set_num_threads(threads)
    return out


def contents(path: Path) -> dict[str, np.ndarray]:
    st = Store.open(path)
    return {name: np.asarray(st.array(name)[:]) for name in (*st.sites, "tokens", "context", "position", "input_ids")}


def assert_same_store(path: Path, reference: Path) -> None:
    got, want = json.loads((path / "manifest.json").read_text()), json.loads((reference / "manifest.json").read_text())
    assert got["shards"] == want["shards"]  # per-shard checksums of every array
    assert got["stats"] == want["stats"]
    a, b = contents(path), contents(reference)
    for name in b:
        assert np.array_equal(a[name], b[name]), name
    # Every (context, position) exactly once.
    st = Store.open(path)
    rows = a["context"] * st.seq_len + a["position"]
    assert np.array_equal(np.sort(rows), np.arange(st.n_rows))
    assert np.array_equal(a["tokens"], a["input_ids"].reshape(-1)[rows])


def file_state(path: Path) -> dict[str, tuple[int, str]]:
    return {
        str(f.relative_to(path)): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


# --------------------------------------------------------------------------------------------------
# Correctness against a plain forward.


def reference_activations(model, arch: str, ids: torch.Tensor, layer_kinds) -> dict[str, torch.Tensor]:
    """Hidden states of `model(..., output_hidden_states=True)` and hooks on the sub-layer modules, written out
    independently of sae.sites."""
    blocks = model.base_model.h if arch == "gpt2" else model.base_model.layers
    modules = {
        "gpt2": ("attn", "mlp"),
        "llama": ("self_attn", "mlp"),
        "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),  # what is added to the residual
        "gpt_neox": ("attention", "mlp"),
    }[arch]
    # resid_mid is the input of the norm before the MLP; ln2.hook_normalized the MLP's own input.
    mlp_norm = {"gpt2": "ln_2", "gemma2": "pre_feedforward_layernorm"}.get(arch, "post_attention_layernorm")
    grabbed: dict[str, torch.Tensor] = {}
    handles = []
    for layer, kind in layer_kinds:
        name = f"blocks.{layer}.ln2.hook_normalized" if kind == "ln2_normalized" else f"blocks.{layer}.hook_{kind}"
        if kind in ("attn_out", "mlp_out"):
            mod = blocks[layer].get_submodule(modules[kind == "mlp_out"])
            handles.append(
                mod.register_forward_hook(
                    lambda m, a, out, name=name: grabbed.__setitem__(name, out[0] if isinstance(out, tuple) else out)
                )
            )
        elif kind in ("resid_mid", "ln2_normalized"):
            mod = blocks[layer].get_submodule(mlp_norm if kind == "resid_mid" else "mlp")
            handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: grabbed.__setitem__(name, a[0])))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    for layer, kind in layer_kinds:
        if kind == "resid_pre":
            grabbed[f"blocks.{layer}.hook_resid_pre"] = hidden[layer]
        elif kind == "resid_post":
            assert layer < len(blocks) - 1  # the last hidden state has the final norm applied
            grabbed[f"blocks.{layer}.hook_resid_post"] = hidden[layer + 1]
    return grabbed


def check_against_forward(out: Path, model, arch: str, pick: list[int], *, rtol: float, atol: float):
    """The stored rows of contexts `pick`, mapped back through context/position, equal a plain forward."""
    if isinstance(model, Path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    st = Store.open(out)
    ids = torch.from_numpy(np.asarray(st.input_ids[:])[pick]).long()
    suffix = {"ln2.hook_normalized": "ln2_normalized"}
    layer_kinds = [(int(s.split(".")[1]), suffix.get(s.split(".", 2)[2], s.split("hook_")[1])) for s in st.sites]
    ref = reference_activations(model, arch, ids, layer_kinds)
    context = np.asarray(st.array("context")[:])
    position = np.asarray(st.array("position")[:])
    for site in st.sites:
        acts = np.asarray(st.array(site)[:])
        for i, c in enumerate(pick):
            rows = np.flatnonzero(context == c)
            rows = rows[np.argsort(position[rows])]
            assert np.array_equal(position[rows], np.arange(st.seq_len))  # the whole context, once
            got = from_storage(acts[rows], st.dtype).float()
            want = ref[site][i].float()
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, s=site: f"{arch} {s}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_equal_a_plain_forward(tmp_path, corpus, arch):
    model_dir = save_model(tmp_path / arch, arch)
    sites = ("blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.2.hook_mlp_out", "blocks.2.hook_resid_post")
    cfg = config(tmp_path / "s.zarr", model_dir, corpus, sites=sites, max_tokens=48 * 30, batch_size=7)
    harvest(cfg)
    # bf16 storage: within about one bf16 rounding step of the float32 forward.
    check_against_forward(cfg.out, model_dir, arch, [0, 13, 29], rtol=2**-7, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_transcoder_sites_equal_a_plain_forward(tmp_path, corpus, arch):
    """resid_mid and ln2.hook_normalized (a transcoder's input) are harvested beside mlp_out (its target); the
    default GPT-NeoX (parallel attention) has no resid_mid and refuses it before writing anything."""
    model_dir = save_model(tmp_path / arch, arch)
    sites = ("blocks.1.hook_resid_mid", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    cfg = config(tmp_path / "s.zarr", model_dir, corpus, sites=sites, max_tokens=48 * 20, batch_size=7)
    if arch == "gpt_neox":
        with pytest.raises(SaeError, match=r"no resid_mid.*hook one of hook_resid_pre, hook_attn_out, ln2\.hook_"):
            harvest(cfg)
        assert not cfg.out.exists()
        cfg = dataclasses.replace(cfg, sites=sites[1:])
    harvest(cfg)
    assert Store.open(cfg.out).sites == list(cfg.sites)
    check_against_forward(cfg.out, model_dir, arch, [0, 19], rtol=2**-7, atol=1e-4)


def test_float32_store_equals_the_forward_closely(tmp_path, llama_dir, corpus):
    cfg = config(tmp_path / "s.zarr", llama_dir, corpus, dtype="float32", codec="none", max_tokens=48 * 12)
    harvest(cfg)
    check_against_forward(cfg.out, llama_dir, "llama", [0, 5, 11], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_rows_equal_a_plain_forward(tmp_path, corpus):
    from sae.models import load_model

    sites = ("blocks.3.hook_resid_post", "blocks.5.hook_attn_out", "blocks.5.hook_mlp_out")
    cfg = HarvestConfig(
        out=tmp_path / "s.zarr", model="smollm2-135m", dataset=str(corpus), sites=sites, seq_len=64,
        max_tokens=64 * 6, batch_size=4, chunk_rows=128, shard_chunks=2, device="cpu", model_dtype="float32",
    )  # fmt: skip
    harvest(cfg)
    st = Store.open(cfg.out)
    assert st.attrs["model"]["id"] == "smollm2-135m" and st.attrs["model"]["sha256"] and st.d_model == 576
    model, _, _ = load_model("smollm2-135m", device="cpu")
    check_against_forward(cfg.out, model, "llama", [0, 5], rtol=2**-7, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Resume after SIGKILL, array jobs.


def n_markers(out: Path) -> int:
    try:
        return sum(name.startswith("shard-") for name in os.listdir(out / "markers"))
    except FileNotFoundError:
        return 0


def test_sigkill_at_any_moment_then_rerun_gives_the_uninterrupted_store(tmp_path, llama_dir, corpus, baseline):
    out = tmp_path / "store.zarr"
    cmd = cli_args(config(out, llama_dir, corpus))
    log = tmp_path / "log.txt"
    # Each run is killed (SIGKILL) at another moment: the first while it packs the corpus into the new store,
    # the second (resuming from a half-made init) while it writes shards. Each subprocess costs seconds of imports.
    moments = [
        ("during init", lambda: (out / "zarr.json").exists()),
        ("during the shard writes", lambda: n_markers(out) >= 5),
    ]
    for name, reached in moments:
        with open(log, "ab") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=f, env=subprocess_env())
        deadline = time.monotonic() + 300
        while not reached() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert p.returncode == -signal.SIGKILL, f"harvest ended before the kill {name}: {log.read_text()[-2000:]}"
        assert not (out / "manifest.json").exists()
    n_shards = len(json.loads((baseline / "manifest.json").read_text())["shards"])
    assert 0 < n_markers(out) < n_shards  # killed mid-way, with work left to resume
    # The same command again finishes the store; the result is the uninterrupted run's, byte for byte.
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finalized" in result.stdout
    assert_same_store(out, baseline)


def test_sigterm_stops_a_harvest_process_with_one_line_then_the_same_command_finishes(
    tmp_path, llama_dir, corpus, baseline
):
    """What a scheduler's preemption or `kill` does (Ctrl-C is the same path, tested in-process in
    test_interrupt.py): the process exits with sae.interrupt.EXIT_CODE, not killed by the signal."""
    out = tmp_path / "store.zarr"
    cmd = cli_args(config(out, llama_dir, corpus))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    deadline = time.monotonic() + 300
    while n_markers(out) < 2 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == EXIT_CODE, stderr[-3000:]
    n = n_markers(out)
    assert stderr.splitlines()[-1] == (
        f"interrupted: harvest stopped by SIGTERM; {n} finished shards kept in {out}; "
        "rerun the same command to continue (finished shards are skipped)"
    )
    assert "harvest: done" not in stdout and "Traceback" not in stderr and not (out / "manifest.json").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the baseline ran
    try:
        harvest(config(out, llama_dir, corpus))
    finally:
        torch.set_num_threads(threads)
    assert_same_store(out, baseline)


def test_array_tasks_at_once_equal_one_process(tmp_path, llama_dir, corpus, baseline):
    out = tmp_path / "store.zarr"
    cfg = config(out, llama_dir, corpus)
    procs = [
        subprocess.Popen(
            cli_args(dataclasses.replace(cfg, shard=f"{i}/3")),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(),
        )
        for i in range(3)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(s[-2000:] for s in logs)
    assert not (out / "manifest.json").exists()  # array tasks leave finalizing to the last step
    assert "task 2/3" in logs[2]
    harvest(HarvestConfig(out=out, finalize=True))
    assert_same_store(out, baseline)


def test_missing_shards_are_named_then_finished(tmp_path, llama_dir, corpus, capsys):
    cfg = config(tmp_path / "s.zarr", llama_dir, corpus, max_tokens=48 * 16)  # 768 rows: 6 shards
    harvest(dataclasses.replace(cfg, init=True))  # an array job's first step: the plan, no forward
    assert (cfg.out / "plan.json").exists() and n_markers(cfg.out) == 0
    harvest(dataclasses.replace(cfg, shard="1/3"))
    with pytest.raises(SaeError, match=r"4 of 6 shards are not finished \(shards 0, 1, 4, 5\)"):
        harvest(HarvestConfig(out=cfg.out, finalize=True))
    with pytest.raises(SaeError, match="not finished"):
        Store.open(cfg.out)
    harvest(dataclasses.replace(cfg, shard="0/3"))
    harvest(dataclasses.replace(cfg, shard="2/3"))
    harvest(HarvestConfig(out=cfg.out, finalize=True))
    assert Store.open(cfg.out).complete_chunks() == list(range(12))
    # A plain rerun of a finished store does no work and changes nothing but the (identical) manifest.
    before = json.loads((cfg.out / "manifest.json").read_text())
    capsys.readouterr()
    harvest(cfg)
    assert json.loads((cfg.out / "manifest.json").read_text()) == before
    assert "this run harvested 0 tokens" in capsys.readouterr().out


def test_summary_and_progress(tmp_path, llama_dir, corpus, capsys):
    cfg = config(tmp_path / "s.zarr", llama_dir, corpus, max_tokens=48 * 8)
    harvest(cfg)
    out, err = capsys.readouterr()
    # stderr is no terminal here: plain lines, as in a batch log; the plan's tokenizing ends before the forward
    lines = err.splitlines()
    assert lines[0] == "tokenize: started, 384 tok"
    assert lines[1].startswith("tokenize: 384/384 tok (100.0%) ") and " tok/s in " in lines[1]
    assert lines[2] == "harvest: started, 384 tok"
    assert lines[-1].startswith("harvest: 384/384 tok (100.0%) ") and " tok/s in " in lines[-1]
    assert out.startswith("harvest: done in ")
    summary = " ".join(out.split())
    assert "384 of 384 tokens × 2 sites" in summary and "finalized" in summary
    for part in ("MB on disk", "bytes/token", "vs raw bfloat16", "vs float32", "s wall"):
        assert part in summary
    # one rate, the header's (tokens per second of forward passes and writes), which the run line explains
    assert summary.count("tok/s") == 1 and "tokens/s" not in summary
    assert re.match(r"harvest: done in \S+ \(384 tok, [\d.]+k? tok/s\)", summary)
    assert "the rate above counts the forward passes and shard writes only" in summary


def test_shard_task_from_flag_or_slurm():
    assert shard_task(None, {}) is None
    assert shard_task("2/5", {}) == (2, 5)
    assert shard_task(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert shard_task(None, env) == (3, 4)  # --array=1-4
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_STEP": "2"}
    assert shard_task(None, env) == (2, 3)  # --array=0-4:2
    assert shard_task("1/2", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}) == (1, 2)  # flag wins
    for bad in ("3/3", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(SaeError):
            shard_task(bad, {})


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written or changed.


def test_wrong_site_is_refused_before_anything_is_written(tmp_path, llama_dir, corpus):
    out = tmp_path / "s.zarr"
    with pytest.raises(SaeError, match=r"layer 7 is out of range.*4 layers, 0\.\.3"):
        harvest(config(out, llama_dir, corpus, sites=("blocks.7.hook_resid_post",)))
    hooks = r"hook_resid_pre, hook_attn_out, hook_resid_mid, ln2\.hook_normalized, hook_mlp_out, hook_resid_post"
    with pytest.raises(SaeError, match=rf"unknown site 'blocks.1.hook_resid'.*{hooks} and L in 0\.\.3"):
        harvest(config(out, llama_dir, corpus, sites=("blocks.1.hook_resid",)))
    with pytest.raises(SaeError, match=rf"no --site given; sites are blocks.<L>.<hook> with hook one of {hooks}"):
        harvest(config(out, llama_dir, corpus, sites=()))
    assert not out.exists()


def test_empty_or_tiny_corpus_is_refused(tmp_path, llama_dir):
    out = tmp_path / "s.zarr"
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(SaeError, match="no documents"):
        harvest(config(out, llama_dir, empty))
    assert not out.exists()
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "to be or not"}\n')
    with pytest.raises(SaeError, match="too few for one context"):
        harvest(config(out, llama_dir, short))
    assert not out.exists()


def test_out_that_is_not_a_store_is_refused(tmp_path, llama_dir, corpus):
    out = tmp_path / "results"
    out.mkdir()
    (out / "paper.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(SaeError, match="not an activation store"):
            harvest(config(out, llama_dir, corpus, overwrite=overwrite))
    assert [p.name for p in out.iterdir()] == ["paper.tex"]


def test_other_settings_are_refused_and_overwrite_starts_afresh(tmp_path, llama_dir, corpus):
    cfg = config(tmp_path / "s.zarr", llama_dir, corpus, max_tokens=48 * 8)
    harvest(cfg)
    before = file_state(cfg.out)
    changes = [
        ({"seq_len": 32}, "seq_len: store has 48, this run 32"),
        ({"sites": ("blocks.1.hook_resid_post",)}, "sites: store has"),
        ({"dtype": "float16"}, "dtype: store has 'bfloat16', this run 'float16'"),
        ({"max_tokens": 48 * 9}, "n_contexts_max: store has 8, this run 9"),
        ({"seed": 1}, "seed: store has 0, this run 1"),
        ({"shuffle_buffer": 0}, "shuffle_buffer: store has 10000, this run 0"),
        ({"chunk_rows": 32}, "chunk_rows: store has 64"),
        ({"model_dtype": "bfloat16"}, "model: store has"),
        ({"model": str(save_model(tmp_path / "gpt2", "gpt2"))}, "model: store has"),
    ]
    for change, message in changes:
        with pytest.raises(SaeError, match=f"different settings \\({message}"):
            harvest(dataclasses.replace(cfg, **change))
    assert file_state(cfg.out) == before
    with pytest.raises(SaeError, match="--overwrite with an array task"):
        harvest(dataclasses.replace(cfg, seq_len=32, overwrite=True, shard="0/2"))
    assert file_state(cfg.out) == before
    harvest(dataclasses.replace(cfg, seq_len=32, overwrite=True))
    st = Store.open(cfg.out)
    assert st.seq_len == 32 and st.n_rows == 32 * 12


def test_finalize_alone_and_flag_conflicts(tmp_path, llama_dir, corpus):
    with pytest.raises(SaeError, match="is not an activation store"):
        harvest(HarvestConfig(out=tmp_path / "nothing", finalize=True))
    with pytest.raises(SaeError, match="drop --shard"):
        harvest(HarvestConfig(out=tmp_path / "nothing", finalize=True, shard="0/2"))
    assert not (tmp_path / "nothing").exists()
