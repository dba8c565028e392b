"""Hook sites: names, capture against independent references, early stop, and splicing, on every architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, make_model
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from sae.errors import SaeError
from sae.sites import KINDS, SITE_TABLE, Site, available_sites, capture, parse_site, site_width, splice

N_LAYERS = 4
VOCAB = 320

# Reference modules, written out independently of SITE_TABLE: attn_out/mlp_out are what each architecture adds
# to the residual stream (Gemma-2: the outputs of its post-norms).
REFERENCE = {
    "gpt2": ("transformer.h.{}.attn", "transformer.h.{}.mlp"),
    "llama": ("model.layers.{}.self_attn", "model.layers.{}.mlp"),
    "mistral": ("model.layers.{}.self_attn", "model.layers.{}.mlp"),
    "qwen2": ("model.layers.{}.self_attn", "model.layers.{}.mlp"),
    "gemma2": ("model.layers.{}.post_attention_layernorm", "model.layers.{}.post_feedforward_layernorm"),
    "gpt_neox": ("gpt_neox.layers.{}.attention", "gpt_neox.layers.{}.mlp"),
    "gpt_neox_sequential": ("gpt_neox.layers.{}.attention", "gpt_neox.layers.{}.mlp"),
}
BLOCKS = {
    "gpt2": "transformer.h",
    "gemma2": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "gpt_neox_sequential": "gpt_neox.layers",
}
VARIANTS = [*ARCHS, "mistral", "qwen2", "gpt_neox_sequential"]


def build(variant: str):
    if variant in ARCHS:
        return make_model(variant, vocab_size=VOCAB, n_layers=N_LAYERS)
    common = dict(
        vocab_size=VOCAB, num_hidden_layers=N_LAYERS, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    if variant == "mistral":
        cfg = MistralConfig(num_key_value_heads=2, **common)
    elif variant == "qwen2":
        cfg = Qwen2Config(num_key_value_heads=2, **common)
    elif variant == "gpt_neox_sequential":
        from transformers import GPTNeoXConfig

        cfg = GPTNeoXConfig(use_parallel_residual=False, **common)
    else:
        raise ValueError(variant)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()


_MODELS: dict[str, torch.nn.Module] = {}


def get_model(variant: str) -> torch.nn.Module:
    """Built once per session; `variant` attribute names it for the tables above."""
    if variant not in _MODELS:
        m = build(variant)
        m.variant = variant
        with torch.no_grad():  # transformers installs its own (permanent) hooks on first output_hidden_states
            m(batch(), output_hidden_states=True)
        _MODELS[variant] = m
    return _MODELS[variant]


def n_hooks(model) -> int:
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules())


@pytest.fixture(params=ARCHS)
def model(request):
    m = get_model(request.param)
    before = n_hooks(m)
    yield m
    assert n_hooks(m) == before  # no test leaves a hook behind


# Where sites are is also checked on the Llama-family siblings and on sequential-residual GPT-NeoX.
every_variant = pytest.mark.parametrize("model", VARIANTS, indirect=True)


def blocks(model) -> torch.nn.ModuleList:
    return model.get_submodule(BLOCKS.get(model.variant, "model.layers"))


def batch(seed: int = 1, b: int = 2, t: int = 11) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def hook_outputs(model, paths: list[str], ids: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """Outputs of the named modules during a plain full forward (tuple outputs: first element)."""
    got: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(p).register_forward_hook(
            lambda mod, args, out, p=p: got.__setitem__(p, out[0] if isinstance(out, tuple) else out)
        )
        for p in paths
    ]
    try:
        with torch.no_grad():
            model(ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return [got[p] for p in paths]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Names


def test_table_covers_every_kind():
    assert all(set(kinds) == set(KINDS) for kinds in SITE_TABLE.values())
    assert {"gpt2", "llama", "gemma2", "gpt_neox"} <= set(SITE_TABLE)


@every_variant
def test_parse_and_list(model):
    sites = available_sites(model)
    assert len(sites) == N_LAYERS * len(KINDS)
    assert sites[:4] == [f"blocks.0.hook_{k}" for k in KINDS]
    assert parse_site("blocks.3.hook_mlp_out", model) == Site("blocks.3.hook_mlp_out", 3, "mlp_out")
    assert parse_site(parse_site("blocks.0.hook_resid_pre", model), model).layer == 0
    assert all(parse_site(s, model).name == s for s in sites)
    assert site_width(model, "blocks.1.hook_attn_out") == 64


@pytest.mark.parametrize(
    "name",
    ["blocks.1.hook_resid_mid", "blocks.x.hook_resid_pre", "hook_resid_post", "blocks.1.resid_post", "", "6"],
)
def test_bad_site_lists_what_exists(name):
    m = get_model("gpt2")
    with pytest.raises(SaeError) as e:
        parse_site(name, m)
    msg = str(e.value)
    assert all(k in msg for k in KINDS) and f"0..{N_LAYERS - 1}" in msg


def test_layer_out_of_range():
    m = get_model("llama")
    with pytest.raises(SaeError, match=rf"layer {N_LAYERS} is out of range.*{N_LAYERS} layers, 0\.\.{N_LAYERS - 1}"):
        parse_site(f"blocks.{N_LAYERS}.hook_resid_post", m)
    with pytest.raises(SaeError, match="out of range"):
        capture(m, ["blocks.0.hook_resid_pre", "blocks.99.hook_mlp_out"], batch())
    with pytest.raises(SaeError, match="out of range"):
        with splice(m, "blocks.7.hook_resid_pre", lambda x: x):
            pass


def test_unknown_architecture_lists_supported():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64))
    for call in (
        lambda: parse_site("blocks.0.hook_resid_post", bert),
        lambda: available_sites(bert),
        lambda: capture(bert, ["blocks.0.hook_resid_post"], batch()),
    ):
        with pytest.raises(SaeError, match="'bert'.*supported architectures: gpt2, llama.*gemma2.*gpt_neox"):
            call()


def test_no_sites(model):
    with pytest.raises(SaeError, match="no sites"):
        capture(model, [], batch())


# ------------------------------------------------------------------------------------------------
# Capture


@every_variant
def test_resid_matches_hidden_states(model):
    ids = batch()
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    names = [f"blocks.{layer}.hook_{kind}" for layer in range(N_LAYERS) for kind in ("resid_pre", "resid_post")]
    got = capture(model, names, ids)
    for layer in range(N_LAYERS):
        close(got[f"blocks.{layer}.hook_resid_pre"], hs[layer])
        if layer < N_LAYERS - 1:  # HF's last hidden state has the final norm applied
            close(got[f"blocks.{layer}.hook_resid_post"], hs[layer + 1])
    # The last resid_post is the last block's output, before the final norm.
    (last,) = hook_outputs(model, [f"{BLOCKS.get(model.variant, 'model.layers')}.{N_LAYERS - 1}"], ids)
    close(got[f"blocks.{N_LAYERS - 1}.hook_resid_post"], last)
    assert not torch.allclose(last, hs[-1], atol=1e-3)


@every_variant
def test_sublayer_outputs_match_module_hooks(model):
    ids = batch()
    attn, mlp = REFERENCE[model.variant]
    paths = [p.format(layer) for layer in range(N_LAYERS) for p in (attn, mlp)]
    ref = hook_outputs(model, paths, ids)
    names = [f"blocks.{layer}.hook_{k}" for layer in range(N_LAYERS) for k in ("attn_out", "mlp_out")]
    got = capture(model, names, ids)
    for name, r in zip(names, ref, strict=True):
        close(got[name], r)


@every_variant
def test_sites_decompose_the_residual(model):
    """TransformerLens semantics, independent of module choice: resid_post = resid_pre + attn_out + mlp_out."""
    got = capture(model, available_sites(model), batch())
    for layer in range(N_LAYERS):
        g = {k: got[f"blocks.{layer}.hook_{k}"] for k in KINDS}
        close(g["resid_pre"] + g["attn_out"] + g["mlp_out"], g["resid_post"])
        assert g["attn_out"].abs().max() > 0 and g["mlp_out"].abs().max() > 0


def test_multi_site_equals_single_site(model):
    ids = batch(seed=3, b=3, t=9)
    names = available_sites(model)
    together = capture(model, names, ids)
    assert list(together) == names
    for name in names:
        single = capture(model, [name], ids)[name]
        assert single.shape == (3, 9, 64) and single.dtype == torch.float32
        assert torch.equal(together[name], single), name


def test_attention_mask(model):
    ids = batch(seed=4, b=2, t=10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    got = capture(model, ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post"], ids, attention_mask=mask)
    close(got["blocks.2.hook_resid_post"][mask.bool()], hs[3][mask.bool()])
    # The mask is used: unmasked, the padded row's real tokens see different context.
    plain = capture(model, ["blocks.2.hook_resid_post"], ids)["blocks.2.hook_resid_post"]
    assert not torch.allclose(plain[1, 3:], got["blocks.2.hook_resid_post"][1, 3:], atol=1e-4)
    close(plain[0], got["blocks.2.hook_resid_post"][0])


@pytest.mark.parametrize("kind", KINDS)
def test_forward_stops_after_deepest_site(model, kind):
    calls: dict[str, int] = {}
    watched = {f"block{i}": blk for i, blk in enumerate(blocks(model))}
    watched["lm_head"] = model.get_output_embeddings()
    attn, mlp = REFERENCE[model.variant]
    watched["mlp1"] = model.get_submodule(mlp.format(1))
    handles = [
        mod.register_forward_hook(lambda *a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, mod in watched.items()
    ]
    try:
        got = capture(model, ["blocks.0.hook_mlp_out", f"blocks.1.hook_{kind}", "blocks.1.hook_resid_pre"], batch())
    finally:
        for h in handles:
            h.remove()
    assert set(got) == {"blocks.0.hook_mlp_out", f"blocks.1.hook_{kind}", "blocks.1.hook_resid_pre"}
    assert calls.get("block0") == 1  # the hooks do see the forward...
    assert "block2" not in calls and "block3" not in calls and "lm_head" not in calls  # ...which stops at block 1
    # Inside block 1 the forward stops right after the requested activation, too.
    assert calls.get("mlp1", 0) == (1 if kind in ("mlp_out", "resid_post") else 0)
    assert calls.get("block1", 0) == (1 if kind == "resid_post" else 0)


# ------------------------------------------------------------------------------------------------
# Splice


@pytest.mark.parametrize("kind", KINDS)
def test_splice_identity_and_zero(model, kind):
    ids = batch(seed=5)
    clean = logits(model, ids)
    for layer in (0, N_LAYERS - 1):
        site = f"blocks.{layer}.hook_{kind}"
        with splice(model, site, lambda x: x):
            assert torch.equal(logits(model, ids), clean), site
        with splice(model, site, torch.zeros_like):
            zeroed = logits(model, ids)
        assert not torch.allclose(zeroed, clean, atol=1e-4), site
    assert torch.equal(logits(model, ids), clean)  # hooks gone


def test_splice_replaces_for_the_rest_of_the_forward(model):
    ids = batch(seed=6)
    with splice(model, "blocks.1.hook_resid_post", torch.zeros_like):
        got = capture(model, ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"], ids)
    assert torch.count_nonzero(got["blocks.2.hook_resid_pre"]) == 0
    clean = capture(model, ["blocks.2.hook_attn_out", "blocks.2.hook_resid_post"], ids)
    with splice(model, "blocks.2.hook_attn_out", torch.zeros_like):
        got = capture(model, available_sites(model)[8:12], ids)
    assert torch.count_nonzero(got["blocks.2.hook_attn_out"]) == 0
    close(got["blocks.2.hook_resid_post"], got["blocks.2.hook_resid_pre"] + got["blocks.2.hook_mlp_out"])
    assert not torch.allclose(got["blocks.2.hook_resid_post"], clean["blocks.2.hook_resid_post"], atol=1e-4)


def test_splice_sees_the_activation_and_casts_back(model):
    ids = batch(seed=7)
    ref = capture(model, ["blocks.1.hook_mlp_out"], ids)["blocks.1.hook_mlp_out"]
    seen = []

    def fn(x):
        seen.append(x)
        return x.double()  # an SAE in another dtype: cast back, forward unchanged

    clean = logits(model, ids)
    with splice(model, "blocks.1.hook_mlp_out", fn):
        out = logits(model, ids)
    close(seen[0], ref)
    assert torch.equal(out, clean)


def test_splice_removes_hook_on_error(model):
    ids = batch(seed=8)
    clean = logits(model, ids)
    with pytest.raises(KeyError):
        with splice(model, "blocks.0.hook_resid_pre", torch.zeros_like):
            raise KeyError("boom")
    with pytest.raises(SaeError, match="shape"):
        with splice(model, "blocks.0.hook_attn_out", lambda x: x[..., :3]):
            logits(model, ids)
    assert torch.equal(logits(model, ids), clean)
