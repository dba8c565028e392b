"""Shared fixtures: tiny offline tokenizers and models of each supported architecture."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles. The quick brown fox jumps over "
    "the lazy dog. def f(x):\n    return x + 1\nimport os\nprint('hello world')\n"
)


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in milliseconds on a paragraph; BOS = EOS = <|endoftext|> (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TINY_TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token=None
    )


def make_model(arch: str, vocab_size: int = 320, n_layers: int = 4, d_model: int = 64, seed: int = 0):
    """A randomly initialised tiny causal LM of `arch` in {gpt2, llama, gemma2, gpt_neox}, float32, eval mode."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=4, n_positions=512, **common)
    elif arch == "llama":
        cfg = LlamaConfig(
            num_hidden_layers=n_layers,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
    elif arch == "gemma2":
        cfg = Gemma2Config(
            num_hidden_layers=n_layers,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=32,
            **common,
        )
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            num_hidden_layers=n_layers,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_attention_heads=4,
            max_position_embeddings=512,
            **common,
        )
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.float().eval()


ARCHS = ["gpt2", "llama", "gemma2", "gpt_neox"]


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); run `pytest -m cuda` on one")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=ARCHS)
def tiny_arch(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama model + tokenizer directory, loadable with `--model DIR`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
