"""Hook sites: names, capture against independent references, early stop, and splicing, on every architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, make_model
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from sae.errors import SaeError
from sae.sites import (
    HOOKS,
    KINDS,
    SITE_TABLE,
    Site,
    available_sites,
    capture,
    parse_site,
    site_name,
    site_width,
    splice,
    splice_from,
)

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
# The norm in front of the MLP (its input is resid_mid) and the MLP itself (its input is ln2.hook_normalized).
MLP_NORM = {
    "gpt2": "transformer.h.{}.ln_2",
    "llama": "model.layers.{}.post_attention_layernorm",
    "mistral": "model.layers.{}.post_attention_layernorm",
    "qwen2": "model.layers.{}.post_attention_layernorm",
    "gemma2": "model.layers.{}.pre_feedforward_layernorm",
    "gpt_neox": "gpt_neox.layers.{}.post_attention_layernorm",
    "gpt_neox_sequential": "gpt_neox.layers.{}.post_attention_layernorm",
}
MLP = {"gpt2": "transformer.h.{}.mlp", "gpt_neox": "gpt_neox.layers.{}.mlp"}
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


def kinds(model) -> list[str]:
    """The kinds `model` has: parallel-attention GPT-NeoX (the default GPTNeoXConfig) has no resid_mid."""
    return [k for k in KINDS if not (model.variant == "gpt_neox" and k == "resid_mid")]


def layer_sites(model, layer: int) -> list[str]:
    return [site_name(layer, k) for k in kinds(model)]


def mlp_path(model) -> str:
    return MLP.get(model.variant.removesuffix("_sequential"), "model.layers.{}.mlp")


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


def hook_inputs(model, paths: list[str], ids: torch.Tensor) -> list[torch.Tensor]:
    """First positional inputs of the named modules during a plain full forward."""
    got: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(p).register_forward_pre_hook(lambda mod, args, p=p: got.__setitem__(p, args[0]))
        for p in paths
    ]
    try:
        with torch.no_grad():
            model(ids)
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
    assert list(HOOKS) == list(KINDS)


@every_variant
def test_parse_and_list(model):
    sites = available_sites(model)
    assert len(sites) == N_LAYERS * len(kinds(model))
    assert sites[: len(kinds(model))] == layer_sites(model, 0)
    assert layer_sites(model, 0)[:2] == ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"]
    assert parse_site("blocks.3.hook_mlp_out", model) == Site("blocks.3.hook_mlp_out", 3, "mlp_out")
    assert parse_site("blocks.2.ln2.hook_normalized", model) == Site(
        "blocks.2.ln2.hook_normalized", 2, "ln2_normalized"
    )
    assert parse_site(parse_site("blocks.0.hook_resid_pre", model), model).layer == 0
    assert all(parse_site(s, model).name == s for s in sites)
    assert site_width(model, "blocks.1.hook_attn_out") == 64
    assert site_width(model, "blocks.1.ln2.hook_normalized") == 64
    if model.variant != "gpt_neox":
        assert parse_site("blocks.1.hook_resid_mid", model) == Site("blocks.1.hook_resid_mid", 1, "resid_mid")


@pytest.mark.parametrize(
    "name",
    [
        "blocks.1.hook_resid", "blocks.x.hook_resid_pre", "hook_resid_post", "blocks.1.resid_post", "", "6",
        "blocks.1.hook_normalized", "blocks.1.ln1.hook_normalized", "blocks.1.ln2.hook_scale",
        "blocks.1.ln2.normalized", "blocks.1.ln2.hook_normalized.x",
    ],
)  # fmt: skip
def test_bad_site_lists_what_exists(name):
    m = get_model("gpt2")
    with pytest.raises(SaeError) as e:
        parse_site(name, m)
    msg = str(e.value)
    assert all(h in msg for h in HOOKS.values()) and f"0..{N_LAYERS - 1}" in msg and "\n" not in msg


def test_parallel_neox_has_no_resid_mid():
    """One line naming the sites it does have; sequential-residual GPT-NeoX has resid_mid."""
    m = get_model("gpt_neox")
    assert m.config.use_parallel_residual
    assert not any("resid_mid" in s for s in available_sites(m))
    for call in (
        lambda: parse_site("blocks.1.hook_resid_mid", m),
        lambda: capture(m, ["blocks.1.ln2.hook_normalized", "blocks.1.hook_resid_mid"], batch()),
        lambda: splice(m, "blocks.1.hook_resid_mid", lambda x: x).__enter__(),
    ):
        with pytest.raises(SaeError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "use_parallel_residual=True" in msg and "no resid_mid" in msg
        hooks = "hook_resid_pre, hook_attn_out, ln2.hook_normalized, hook_mlp_out, hook_resid_post"
        assert f"hook one of {hooks} and L in 0..{N_LAYERS - 1}" in msg
    assert "blocks.1.hook_resid_mid" in available_sites(get_model("gpt_neox_sequential"))


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
def test_mlp_inputs_match_module_hooks(model):
    """resid_mid is what enters the norm before the MLP, ln2.hook_normalized what enters the MLP itself."""
    ids = batch()
    mid = [] if model.variant == "gpt_neox" else [MLP_NORM[model.variant].format(layer) for layer in range(N_LAYERS)]
    mlp = [mlp_path(model).format(layer) for layer in range(N_LAYERS)]
    ref = hook_inputs(model, mid + mlp, ids)
    names = [f"blocks.{layer}.hook_resid_mid" for layer in range(N_LAYERS)] if mid else []
    names += [f"blocks.{layer}.ln2.hook_normalized" for layer in range(N_LAYERS)]
    got = capture(model, names, ids)
    for name, r in zip(names, ref, strict=True):
        close(got[name], r)


@every_variant
def test_sites_decompose_the_residual(model):
    """TransformerLens semantics, independent of module choice: resid_post = resid_pre + attn_out + mlp_out,
    resid_mid = resid_pre + attn_out, and the MLP (with Gemma-2's post-norm) maps ln2.hook_normalized to mlp_out."""
    got = capture(model, available_sites(model), batch())
    for layer in range(N_LAYERS):
        g = {k: got[site_name(layer, k)] for k in kinds(model)}
        close(g["resid_pre"] + g["attn_out"] + g["mlp_out"], g["resid_post"])
        assert g["attn_out"].abs().max() > 0 and g["mlp_out"].abs().max() > 0
        if "resid_mid" in g:
            close(g["resid_pre"] + g["attn_out"], g["resid_mid"])
            close(g["resid_mid"] + g["mlp_out"], g["resid_post"])
        with torch.no_grad():
            out = model.get_submodule(mlp_path(model).format(layer))(g["ln2_normalized"])
            if model.variant == "gemma2":
                out = model.get_submodule(f"model.layers.{layer}.post_feedforward_layernorm")(out)
        close(out, g["mlp_out"])
        # The norm's output, not its input: they differ.
        before = g.get("resid_mid", g["resid_pre"])
        assert not torch.allclose(g["ln2_normalized"], before, atol=1e-3)


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
    if kind not in kinds(model):
        pytest.skip(f"{model.variant} has no {kind}")
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
        got = capture(model, ["blocks.0.hook_mlp_out", site_name(1, kind), "blocks.1.hook_resid_pre"], batch())
    finally:
        for h in handles:
            h.remove()
    assert set(got) == {"blocks.0.hook_mlp_out", site_name(1, kind), "blocks.1.hook_resid_pre"}
    assert calls.get("block0") == 1  # the hooks do see the forward...
    assert "block2" not in calls and "block3" not in calls and "lm_head" not in calls  # ...which stops at block 1
    # Inside block 1 the forward stops right after the requested activation, too.
    assert calls.get("mlp1", 0) == (1 if kind in ("mlp_out", "resid_post") else 0)
    assert calls.get("block1", 0) == (1 if kind == "resid_post" else 0)


# ------------------------------------------------------------------------------------------------
# Splice


@pytest.mark.parametrize("kind", KINDS)
def test_splice_identity_and_zero(model, kind):
    if kind not in kinds(model):
        pytest.skip(f"{model.variant} has no {kind}")
    ids = batch(seed=5)
    clean = logits(model, ids)
    for layer in (0, N_LAYERS - 1):
        site = site_name(layer, kind)
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
        got = capture(model, layer_sites(model, 2), ids)
    assert torch.count_nonzero(got["blocks.2.hook_attn_out"]) == 0
    close(got["blocks.2.hook_resid_post"], got["blocks.2.hook_resid_pre"] + got["blocks.2.hook_mlp_out"])
    assert not torch.allclose(got["blocks.2.hook_resid_post"], clean["blocks.2.hook_resid_post"], atol=1e-4)


@every_variant
def test_splice_resid_mid_carries_on_down_the_residual(model):
    """A replaced resid_mid is what the MLP's norm reads *and* what the MLP's output is added to."""
    if model.variant == "gpt_neox":
        pytest.skip("parallel attention: no resid_mid")
    ids = batch(seed=9)
    clean = capture(model, ["blocks.1.hook_resid_mid"], ids)["blocks.1.hook_resid_mid"]
    shift = torch.linspace(-1, 1, clean.shape[-1])
    with splice(model, "blocks.1.hook_resid_mid", lambda x: 0.5 * x + shift):
        got = capture(model, layer_sites(model, 1) + ["blocks.2.hook_resid_pre"], ids)
        spliced = logits(model, ids)
    new = 0.5 * clean + shift
    close(got["blocks.1.hook_resid_mid"], new)
    with torch.no_grad():
        close(got["blocks.1.ln2.hook_normalized"], model.get_submodule(MLP_NORM[model.variant].format(1))(new))
    close(got["blocks.1.hook_resid_post"], new + got["blocks.1.hook_mlp_out"])
    close(got["blocks.2.hook_resid_pre"], got["blocks.1.hook_resid_post"])
    # Upstream of the splice nothing changed; downstream it did.
    close(got["blocks.1.hook_resid_pre"] + got["blocks.1.hook_attn_out"], clean)
    assert not torch.allclose(spliced, logits(model, ids), atol=1e-4)


def test_splice_ln2_normalized_feeds_only_the_mlp(model):
    ids = batch(seed=10)
    clean = capture(model, layer_sites(model, 2), ids)
    with splice(model, "blocks.2.ln2.hook_normalized", torch.zeros_like):
        got = capture(model, layer_sites(model, 2), ids)
    with torch.no_grad():
        zero_mlp = model.get_submodule(mlp_path(model).format(2))(torch.zeros_like(clean["blocks.2.hook_mlp_out"]))
        if model.variant == "gemma2":
            zero_mlp = model.get_submodule("model.layers.2.post_feedforward_layernorm")(zero_mlp)
    close(got["blocks.2.hook_mlp_out"], zero_mlp)
    assert torch.count_nonzero(got["blocks.2.ln2.hook_normalized"]) == 0
    before = "blocks.2.hook_resid_mid" if "resid_mid" in kinds(model) else "blocks.2.hook_resid_pre"
    close(got[before], clean[before])  # the residual stream itself is untouched
    without_mlp = clean["blocks.2.hook_resid_post"] - clean["blocks.2.hook_mlp_out"]
    close(got["blocks.2.hook_resid_post"], without_mlp + zero_mlp)


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


# ------------------------------------------------------------------------------------------------
# Splicing one site from another (transcoders)


def mlp_of(model, layer: int):
    """What turns ln2.hook_normalized into hook_mlp_out (Gemma-2: the MLP, then its post-norm), bypassing
    the modules' hooks: it runs inside the splice's own hook."""
    mlp = model.get_submodule(mlp_path(model).format(layer)).forward
    if model.variant != "gemma2":
        return mlp
    post = model.get_submodule(f"model.layers.{layer}.post_feedforward_layernorm").forward
    return lambda x: post(mlp(x))


def test_splice_from_with_the_mlp_itself_changes_nothing(model):
    """A perfect transcoder of the MLP (the MLP itself) leaves the forward as it was."""
    ids = batch(seed=11)
    clean = logits(model, ids)
    with splice_from(model, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", lambda x, y: mlp_of(model, 1)(x)):
        close(logits(model, ids), clean)


@every_variant
def test_splice_from_replaces_the_site_with_a_function_of_the_source(model):
    ids = batch(seed=12)
    clean = capture(model, layer_sites(model, 2) + ["blocks.3.hook_resid_pre"], ids)
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) / 8
    seen = []

    def predict(x, y):
        seen.append((x, y))
        return x @ w

    with splice_from(model, "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out", predict):
        got = capture(model, layer_sites(model, 2) + ["blocks.3.hook_resid_pre"], ids)
    x, y = seen[0]
    close(x, clean["blocks.2.ln2.hook_normalized"])  # the source as the forward computed it
    close(y, clean["blocks.2.hook_mlp_out"])  # and the activation being replaced
    close(got["blocks.2.hook_mlp_out"], clean["blocks.2.ln2.hook_normalized"] @ w)
    without_mlp = clean["blocks.2.hook_resid_post"] - clean["blocks.2.hook_mlp_out"]
    close(got["blocks.3.hook_resid_pre"], without_mlp + clean["blocks.2.ln2.hook_normalized"] @ w)
    if "resid_mid" in kinds(model):  # a replaced resid_mid carries on down the residual
        with splice_from(model, "blocks.0.hook_resid_post", "blocks.2.hook_resid_mid", lambda x, y: y + 0.1 * x):
            got = capture(model, layer_sites(model, 2), ids)
        new = (
            clean["blocks.2.hook_resid_mid"]
            + 0.1 * capture(model, ["blocks.0.hook_resid_post"], ids)["blocks.0.hook_resid_post"]
        )
        close(got["blocks.2.hook_resid_mid"], new)
        close(got["blocks.2.hook_resid_post"], new + got["blocks.2.hook_mlp_out"])


def test_splice_from_order_and_same_site(model):
    order = "from blocks.1.ln2.hook_normalized into blocks.1.hook_attn_out: the source is computed after"
    with pytest.raises(SaeError, match=order):
        with splice_from(model, "blocks.1.ln2.hook_normalized", "blocks.1.hook_attn_out", lambda x, y: x):
            pass
    with pytest.raises(SaeError, match="source is computed after"):
        with splice_from(model, "blocks.2.hook_resid_pre", "blocks.1.hook_resid_post", lambda x, y: x):
            pass
    ids = batch(seed=13)
    with splice_from(model, "blocks.1.hook_mlp_out", "blocks.1.hook_mlp_out", lambda x, y: torch.zeros_like(x)):
        zeroed = logits(model, ids)
    with splice(model, "blocks.1.hook_mlp_out", torch.zeros_like):
        assert torch.equal(logits(model, ids), zeroed)
