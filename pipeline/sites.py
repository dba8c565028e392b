"""Hook sites: TransformerLens names mapped onto Hugging Face modules, capture in one forward, and splicing.

A site is `blocks.{L}.{hook}`, with hook (its kind, in the order computed inside the block) one of

- `hook_resid_pre` (`resid_pre`): the residual stream entering block L (the block's input),
- `hook_attn_out` (`attn_out`): what the attention sub-layer adds to the residual stream,
- `hook_resid_mid` (`resid_mid`): the residual stream after attention, before the MLP (`resid_pre + attn_out`);
  GPT-NeoX with parallel attention has none (attention and MLP both read `resid_pre`),
- `ln2.hook_normalized` (`ln2_normalized`): the MLP's actual input, the output of its norm (with the norm's
  weight and bias, as TransformerLens computes it without `fold_ln`; a transcoder's usual input),
- `hook_mlp_out` (`mlp_out`): what the MLP sub-layer adds to the residual stream,
- `hook_resid_post` (`resid_post`): the residual stream leaving block L (the block's output; at the last block
  this is *before* the final norm, unlike `output_hidden_states[-1]`).

So `resid_post = resid_pre + attn_out + mlp_out` for every supported architecture, parallel-residual
GPT-NeoX and post-norm Gemma-2 included, and `resid_mid = resid_pre + attn_out` where it exists.
`SITE_TABLE` is the one place that says where each of them lives.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .errors import SaeError

HOOKS = {
    "resid_pre": "hook_resid_pre",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "ln2_normalized": "ln2.hook_normalized",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
"""Site kind → its hook's name inside the block (TransformerLens), in the order they are computed."""

KINDS = tuple(HOOKS)
"""Site kinds, in the order they are computed inside a block."""

_KIND_OF_HOOK = {hook: kind for kind, hook in HOOKS.items()}

_LLAMA_LIKE = {
    "resid_pre": ("layers.{L}", "input"),
    "attn_out": ("layers.{L}.self_attn", "output"),
    "resid_mid": ("layers.{L}.post_attention_layernorm", "input"),
    "ln2_normalized": ("layers.{L}.post_attention_layernorm", "output"),
    "mlp_out": ("layers.{L}.mlp", "output"),
    "resid_post": ("layers.{L}", "output"),
}

SITE_TABLE: dict[str, dict[str, tuple[str, str]]] = {
    "gpt2": {
        "resid_pre": ("h.{L}", "input"),
        "attn_out": ("h.{L}.attn", "output"),
        "resid_mid": ("h.{L}.ln_2", "input"),
        "ln2_normalized": ("h.{L}.ln_2", "output"),
        "mlp_out": ("h.{L}.mlp", "output"),
        "resid_post": ("h.{L}", "output"),
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma2": {
        "resid_pre": ("layers.{L}", "input"),
        # Gemma-2 normalises each sub-layer's output before adding it to the residual stream; what is added
        # (TransformerLens' hook_attn_out / hook_mlp_out) is the output of these post-norms. The MLP's input
        # norm is the pre-feedforward one (TransformerLens' ln2; its post_feedforward norm is ln2_post).
        "attn_out": ("layers.{L}.post_attention_layernorm", "output"),
        "resid_mid": ("layers.{L}.pre_feedforward_layernorm", "input"),
        "ln2_normalized": ("layers.{L}.pre_feedforward_layernorm", "output"),
        "mlp_out": ("layers.{L}.post_feedforward_layernorm", "output"),
        "resid_post": ("layers.{L}", "output"),
    },
    "gpt_neox": {
        # Parallel or sequential residual alike: attention and MLP outputs are each added to the residual.
        # resid_mid (the norm's input) exists only with use_parallel_residual=False; see _absent_kinds.
        "resid_pre": ("layers.{L}", "input"),
        "attn_out": ("layers.{L}.attention", "output"),
        "resid_mid": ("layers.{L}.post_attention_layernorm", "input"),
        "ln2_normalized": ("layers.{L}.post_attention_layernorm", "output"),
        "mlp_out": ("layers.{L}.mlp", "output"),
        "resid_post": ("layers.{L}", "output"),
    },
}
"""config.model_type → site kind → (module path under `model.base_model`, `{L}` = layer; hook point).

Hook point `input` is the module's first positional argument (or `hidden_states` keyword); `output` is its
return value, or the first element when it returns a tuple (attention modules, some decoder layers).

`resid_mid` is hooked as the input of the MLP's norm, but the blocks also keep it in a local variable for the
residual addition after the MLP; `splice` therefore also adds its change to the block's output."""

_SITE_RE = re.compile(r"blocks\.(\d+)\.(\S+)")


class Site(NamedTuple):
    """One hook site of one model, validated by `parse_site`."""

    name: str
    """TransformerLens name, e.g. `blocks.6.hook_resid_post`."""
    layer: int
    """Block index L."""
    kind: str
    """One of `KINDS`: resid_pre, attn_out, resid_mid, ln2_normalized, mlp_out, resid_post."""


def site_name(layer: int, kind: str) -> str:
    """The TransformerLens name of a site, e.g. `site_name(6, "ln2_normalized") == "blocks.6.ln2.hook_normalized"`."""
    return f"blocks.{layer}.{HOOKS[kind]}"


def _table(model: nn.Module) -> dict[str, tuple[str, str]]:
    arch = model.config.model_type
    if arch not in SITE_TABLE:
        raise SaeError(
            f"model architecture {arch!r} has no hook-site table; supported architectures: {', '.join(SITE_TABLE)}"
        )
    return SITE_TABLE[arch]


def _absent_kinds(model: nn.Module) -> dict[str, str]:
    """Kinds this particular model does not compute → why (one clause)."""
    cfg = model.config
    if cfg.model_type == "gpt_neox" and getattr(cfg, "use_parallel_residual", True):
        return {
            "resid_mid": "GPT-NeoX with parallel attention (use_parallel_residual=True) has no resid_mid: "
            "attention and the MLP both read resid_pre"
        }
    return {}


def _kinds(model: nn.Module) -> list[str]:
    _table(model)
    absent = _absent_kinds(model)
    return [k for k in KINDS if k not in absent]


def _n_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def describe_sites(model: nn.Module) -> str:
    """One line saying which sites `model` has, for error messages."""
    n = _n_layers(model)
    hooks = ", ".join(HOOKS[k] for k in _kinds(model))
    return (
        f"sites are blocks.<L>.<hook> with hook one of {hooks} and L in 0..{n - 1} "
        f"({model.config.model_type}, {n} layers), e.g. blocks.{n // 2}.hook_resid_post"
    )


def parse_site(name: str | Site, model: nn.Module) -> Site:
    """Validate a site name against `model`; SaeError naming the available kinds and layers if it is wrong."""
    _table(model)
    n = _n_layers(model)
    name = name.name if isinstance(name, Site) else str(name)
    m = _SITE_RE.fullmatch(name.strip())
    if m is None or m.group(2) not in _KIND_OF_HOOK:
        raise SaeError(f"unknown site {name!r}; {describe_sites(model)}")
    layer, kind = int(m.group(1)), _KIND_OF_HOOK[m.group(2)]
    absent = _absent_kinds(model)
    if kind in absent:
        raise SaeError(f"site {name!r}: {absent[kind]}; its {describe_sites(model)}")
    if layer >= n:
        raise SaeError(
            f"site {name!r}: layer {layer} is out of range; this {model.config.model_type} model has {n} "
            f"layers, 0..{n - 1}"
        )
    return Site(site_name(layer, kind), layer, kind)


def check_site_names(names: Sequence[str], model: nn.Module | None = None) -> None:
    """SaeError for a site name that cannot be right: malformed or an unknown hook without a model; checked
    against `model` (a meta-device skeleton is enough) when one is given. Run before the model loads."""
    if not names:
        raise SaeError(f"no --site given; {describe_sites(model)}" if model is not None else "no --site given")
    if model is not None:
        for n in names:
            parse_site(n, model)
        return
    hooks = ", ".join(HOOKS.values())
    for n in names:
        m = _SITE_RE.fullmatch(str(n).strip())
        if m is None or m.group(2) not in _KIND_OF_HOOK:
            raise SaeError(f"unknown site {n!r}; sites are blocks.<L>.<hook> with hook one of {hooks}")


def available_sites(model: nn.Module) -> list[str]:
    """Every site name of `model`, by layer, in computation order inside each block."""
    kinds = _kinds(model)
    return [site_name(layer, kind) for layer in range(_n_layers(model)) for kind in kinds]


def site_width(model: nn.Module, site: str | Site) -> int:
    """Width of the site's activations (d_model for every supported kind)."""
    parse_site(site, model)
    return int(model.config.hidden_size)


def _hook_point(model: nn.Module, site: Site) -> tuple[nn.Module, str]:
    path, point = _table(model)[site.kind]
    return model.base_model.get_submodule(path.format(L=site.layer)), point


def _register(model: nn.Module, site: Site, fn: Callable[[Tensor], Tensor | None]) -> Any:
    """Hook `fn(activation)` onto the site; a tensor it returns replaces the activation. Returns the handle."""
    module, point = _hook_point(model, site)
    if point == "input":

        def pre_hook(mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(mod, args, output):
        # Decoder layers return a tensor or a tuple depending on the transformers version; attention a tuple.
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return module.register_forward_hook(hook)


def _as_sites(model: nn.Module, sites: Sequence[str | Site]) -> list[Site]:
    return list(dict.fromkeys(parse_site(s, model) for s in sites))


class _Stop(Exception):
    """Raised by the last capture hook to end the forward once every requested site is in hand."""


def capture(
    model: nn.Module,
    sites: Sequence[str | Site],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Run one forward and return each site's activations, `{site.name: [B, T, d]}` in the model's dtype.

    The forward stops as soon as the last requested activation is computed, so layers past the deepest site
    (and the final norm and unembedding) never run. The tensors are the model's own, not copies; a
    `resid_pre` and the previous layer's `resid_post` may be the same tensor.
    """
    sites = _as_sites(model, sites)
    if not sites:
        raise SaeError(f"no sites to capture; available: {', '.join(available_sites(model))}")
    out: dict[str, Tensor] = {}

    def grab(name: str) -> Callable[[Tensor], None]:
        def store(act: Tensor) -> None:
            out[name] = act
            if len(out) == len(sites):
                raise _Stop

        return store

    handles = [_register(model, s, grab(s.name)) for s in sites]
    try:
        with torch.no_grad():
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [s.name for s in sites if s.name not in out]
    if missing:
        raise RuntimeError(f"the forward pass never reached sites {missing}")
    return out


def _replace_hooks(model: nn.Module, site: Site, fn: Callable[[Tensor], Tensor], what: str) -> list[Any]:
    """Hooks that continue every forward with `fn(activation)` at `site` (shape-checked, cast back)."""

    def replace(act: Tensor) -> Tensor:
        new = fn(act)
        if new.shape != act.shape:
            raise SaeError(
                f"{what} at {site.name}: the replacement has shape {tuple(new.shape)}, the activation "
                f"{tuple(act.shape)}"
            )
        return new.to(dtype=act.dtype, device=act.device)

    if site.kind != "resid_mid":
        return [_register(model, site, replace)]
    # The hook point is the MLP norm's input; the block adds the MLP's output to its own copy of resid_mid,
    # so the replacement's change is added to the block's output as well (TransformerLens semantics).
    change: dict[str, Tensor] = {}  # this forward's (replacement - activation), until the block's output

    def replace_mid(act: Tensor) -> Tensor:
        new = replace(act)
        change["delta"] = new - act
        return new

    def carry(out: Tensor) -> Tensor | None:
        delta = change.pop("delta", None)
        return None if delta is None else out + delta

    block_out = Site(site_name(site.layer, "resid_post"), site.layer, "resid_post")
    return [_register(model, site, replace_mid), _register(model, block_out, carry)]


@contextmanager
def _hooked(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def splice(model: nn.Module, site: str | Site, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, every forward of `model` continues with `fn(activation)` in place of the site's
    activation (cast back to its dtype). The hook is removed on exit, also on an exception."""
    site = parse_site(site, model)
    with _hooked(_replace_hooks(model, site, fn, "splice")):
        yield


def computed_before(a: Site, b: Site) -> bool:
    """Whether site `a` is computed before site `b` in a forward (or is `b`)."""
    return (a.layer, KINDS.index(a.kind)) <= (b.layer, KINDS.index(b.kind))


@contextmanager
def splice_from(
    model: nn.Module, source: str | Site, site: str | Site, fn: Callable[[Tensor, Tensor], Tensor]
) -> Iterator[None]:
    """Within the block, every forward of `model` continues at `site` with `fn(x, y)`, where x is this
    forward's activation at `source` and y the activation it replaces: how a transcoder from `source` to
    `site` is spliced in (its prediction replaces the output site; everything upstream runs as usual).

    `source` must be computed before `site` (or be it, when this is `splice` with y passed twice); the
    source's tensor is the model's own, read when `site` is reached.
    """
    source, site = parse_site(source, model), parse_site(site, model)
    if not computed_before(source, site):
        raise SaeError(
            f"splice from {source.name} into {site.name}: the source is computed after the site it would replace"
        )
    if source == site:
        with _hooked(_replace_hooks(model, site, lambda y: fn(y, y), "splice")):
            yield
        return
    seen: dict[str, Tensor] = {}

    def read(act: Tensor) -> None:
        seen["x"] = act

    def replace(y: Tensor) -> Tensor:
        if "x" not in seen:
            raise RuntimeError(f"splice into {site.name}: this forward never reached the source {source.name}")
        return fn(seen.pop("x"), y)

    # The source's hook goes first, so a later hook at the same module sees it run.
    with _hooked([_register(model, source, read), *_replace_hooks(model, site, replace, "splice")]):
        yield


__all__ = [
    "HOOKS",
    "KINDS",
    "SITE_TABLE",
    "Site",
    "available_sites",
    "capture",
    "computed_before",
    "describe_sites",
    "parse_site",
    "site_name",
    "site_width",
    "splice",
    "splice_from",
]
