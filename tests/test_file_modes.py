"""Outputs get the modes the user's umask gives (as `open()` / `mkdir()` would), so colleagues sharing a run
directory can read them: atomically written files, SAE directories, checkpoints, the store's JSON files and the
converted default model under SAE_HOME."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from _synthetic import make_store

from sae import atomic, models
from sae.saedir import SaeConfig, SparseAutoencoder, save_sae
from sae.train import checkpoint


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(params=[0o022, 0o002])
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_outputs_follow_the_umask(tmp_path: Path, mask: int) -> None:
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    f = tmp_path / "x.json"
    atomic.write_json(f, {"a": 1})
    assert _mode(f) == want_file

    sae = SparseAutoencoder(SaeConfig(architecture="standard", d_in=4, d_sae=8))
    d = save_sae(sae, None, tmp_path / "sae")
    assert _mode(d) == want_dir
    for name in ("cfg.json", "sae_weights.safetensors"):
        assert _mode(d / name) == want_file

    ck = checkpoint.save(tmp_path / "run", 3, {"w": torch.zeros(2)}, {"step": 3})
    assert _mode(ck) == want_dir
    assert _mode(ck / "state.json") == want_file
    assert _mode(ck / "tensors.safetensors") == want_file
    assert _mode(tmp_path / "run" / checkpoint.DIR / checkpoint.LATEST) == want_file

    store = make_store(tmp_path / "store.zarr")
    for name in ("manifest.json", "plan.json", "zarr.json"):
        assert _mode(store / name) == want_file, name
    markers = list((store / "markers").iterdir())
    assert markers and all(_mode(m) == want_file for m in markers)


def _write_tiny_gguf(path: Path) -> None:
    """A one-block Llama GGUF (float32 tensors, a byte-level vocabulary of 29 tokens) that transformers reads."""
    import gguf
    import numpy as np

    d, ff, heads = 16, 32, 2
    tokens = ["<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz", "\u0120", "ab"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(d // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))  # 3: control
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (len(tokens), d), "output_norm": (d,), "blk.0.attn_norm": (d,), "blk.0.ffn_norm": (d,)}
    shapes |= {f"blk.0.attn_{n}": (d, d) for n in ("q", "k", "v", "output")}
    shapes |= {"blk.0.ffn_gate": (ff, d), "blk.0.ffn_up": (ff, d), "blk.0.ffn_down": (d, ff)}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_converted_default_model_follows_the_umask(tmp_path: Path, mask: int, monkeypatch) -> None:
    """The GGUF conversion builds the model in a 0700 temp folder with save_pretrained, whose safetensors file
    comes out 0600; the cache under SAE_HOME is shared, so the renamed directory must carry the umask's modes."""
    package = tmp_path / "package"
    (package / models.SMOLLM2_GGUF).parent.mkdir(parents=True)
    _write_tiny_gguf(package / models.SMOLLM2_GGUF)
    monkeypatch.setattr(models, "fetch_distribution", lambda requirement: package)
    monkeypatch.setenv("SAE_HOME", str(tmp_path / "home"))

    dest, _ = models.embedded_model_dir()
    assert (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file()
    paths = [dest, *dest.rglob("*")]
    assert _mode(dest) == 0o777 & ~mask
    for p in paths:
        assert _mode(p) == (0o777 if p.is_dir() else 0o666) & ~mask, p.name


def test_train_on_a_file_or_a_missing_path_is_one_line(tmp_path: Path) -> None:
    """`sae train README.md` used to print a NotADirectoryError traceback."""
    from click.testing import CliRunner

    from sae.cli import main

    f = tmp_path / "README.md"
    f.write_text("not a store")
    for target, words in ((f, "is a file"), (tmp_path / "nope.zarr", "does not exist")):
        r = CliRunner().invoke(main, ["train", str(target), "--out", str(tmp_path / "saes")])
        assert r.exit_code == 2, r.output
        assert words in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "saes").exists()
