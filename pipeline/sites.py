"""Hook sites: TransformerLens names mapped onto Hugging Face modules, capture in one forward, and splicing.

A site is `blocks.{L}.hook_{kind}` with kind one of

- `resid_pre`: the residual stream entering block L (the block's input),
- `attn_out`: what the attention sub-layer adds to the residual stream,
- `mlp_out`: what the MLP sub-layer adds to the residual stream,
- `resid_post`: the residual stream leaving block L (the block's output; at the last block this is *before*
  the final norm, unlike `output_hidden_states[-1]`).

So `resid_post = resid_pre + attn_out + mlp_out` for every supported architecture, parallel-residual
GPT-NeoX and post-norm Gemma-2 included. `SITE_TABLE` is the one place that says where each of them lives.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .errors import SaeError

KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post")
"""Site kinds, in the order they are computed inside a block."""

_LLAMA_LIKE = {
    "resid_pre": ("layers.{L}", "input"),
    "attn_out": ("layers.{L}.self_attn", "output"),
    "mlp_out": ("layers.{L}.mlp", "output"),
    "resid_post": ("layers.{L}", "output"),
}

SITE_TABLE: dict[str, dict[str, tuple[str, str]]] = {
    "gpt2": {
        "resid_pre": ("h.{L}", "input"),
        "attn_out": ("h.{L}.attn", "output"),
        "mlp_out": ("h.{L}.mlp", "output"),
        "resid_post": ("h.{L}", "output"),
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma2": {
        "resid_pre": ("layers.{L}", "input"),
        # Gemma-2 normalises each sub-layer's output before adding it to the residual stream; what is added
        # (TransformerLens' hook_attn_out / hook_mlp_out) is the output of these post-norms.
        "attn_out": ("layers.{L}.post_attention_layernorm", "output"),
        "mlp_out": ("layers.{L}.post_feedforward_layernorm", "output"),
        "resid_post": ("layers.{L}", "output"),
    },
    "gpt_neox": {
        # Parallel or sequential residual alike: attention and MLP outputs are each added to the residual.
        "resid_pre": ("layers.{L}", "input"),
        "attn_out": ("layers.{L}.attention", "output"),
        "mlp_out": ("layers.{L}.mlp", "output"),
        "resid_post": ("layers.{L}", "output"),
    },
}
"""config.model_type → site kind → (module path under `model.base_model`, `{L}` = layer; hook point).

Hook point `input` is the module's first positional argument (or `hidden_states` keyword); `output` is its
return value, or the first element when it returns a tuple (attention modules, some decoder layers)."""

_SITE_RE = re.compile(r"blocks\.(\d+)\.hook_(\w+)")


class Site(NamedTuple):
    """One hook site of one model, validated by `parse_site`."""

    name: str
    """TransformerLens name, e.g. `blocks.6.hook_resid_post`."""
    layer: int
    """Block index L."""
    kind: str
    """One of `KINDS`: resid_pre, attn_out, mlp_out, resid_post."""


def _table(model: nn.Module) -> dict[str, tuple[str, str]]:
    arch = model.config.model_type
    if arch not in SITE_TABLE:
        raise SaeError(
            f"model architecture {arch!r} has no hook-site table; supported architectures: {', '.join(SITE_TABLE)}"
        )
    return SITE_TABLE[arch]


def _n_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def parse_site(name: str | Site, model: nn.Module) -> Site:
    """Validate a site name against `model`; SaeError naming the available kinds and layers if it is wrong."""
    _table(model)
    n = _n_layers(model)
    name = name.name if isinstance(name, Site) else str(name)
    m = _SITE_RE.fullmatch(name.strip())
    if m is None or m.group(2) not in KINDS:
        raise SaeError(
            f"unknown site {name!r}; sites are blocks.<L>.hook_<kind> with kind one of {', '.join(KINDS)} "
            f"and L in 0..{n - 1} ({model.config.model_type}, {n} layers), e.g. blocks.{n // 2}.hook_resid_post"
        )
    layer, kind = int(m.group(1)), m.group(2)
    if layer >= n:
        raise SaeError(
            f"site {name!r}: layer {layer} is out of range; this {model.config.model_type} model has {n} "
            f"layers, 0..{n - 1}"
        )
    return Site(f"blocks.{layer}.hook_{kind}", layer, kind)


def available_sites(model: nn.Module) -> list[str]:
    """Every site name of `model`, by layer, in computation order inside each block."""
    _table(model)
    return [f"blocks.{layer}.hook_{kind}" for layer in range(_n_layers(model)) for kind in KINDS]


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


@contextmanager
def splice(model: nn.Module, site: str | Site, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, every forward of `model` continues with `fn(activation)` in place of the site's
    activation (cast back to its dtype). The hook is removed on exit, also on an exception."""
    site = parse_site(site, model)

    def replace(act: Tensor) -> Tensor:
        new = fn(act)
        if new.shape != act.shape:
            raise SaeError(
                f"splice at {site.name}: the replacement has shape {tuple(new.shape)}, the activation "
                f"{tuple(act.shape)}"
            )
        return new.to(dtype=act.dtype, device=act.device)

    handle = _register(model, site, replace)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["KINDS", "SITE_TABLE", "Site", "available_sites", "capture", "parse_site", "site_width", "splice"]
