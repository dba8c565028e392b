"""What a latent's decoder direction does, from weights alone: its logit effects and its nearest neighbours.

Logit effect of latent i: the direct path of its decoder row through the final norm's gain and the unembedding,
(W_dec,i ⊙ g) · W_Uᵀ; the norm's data-dependent scale is left out (it is the same for every token), as in the
logit lens. No forward pass runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
"""Attribute names of the final norm under `model.base_model` (Llama/Gemma/Mistral/Qwen, GPT-2, GPT-NeoX, ...)."""

CHUNK = 512
"""Latents per matmul against the unembedding ([CHUNK, vocab] at a time)."""


class Effects(NamedTuple):
    """Per selected latent, the tokens it most promotes and most suppresses."""

    top_ids: Tensor
    """[n, k] token ids, largest effect first."""
    top_values: Tensor
    """[n, k] their logit effects."""
    bottom_ids: Tensor
    """[n, k] token ids, most negative first."""
    bottom_values: Tensor
    """[n, k] their logit effects."""


class Neighbours(NamedTuple):
    """Per selected latent, the latents with the most similar decoder directions (itself excluded)."""

    ids: Tensor
    """[n, k] latent indices, most similar first."""
    cosine: Tensor
    """[n, k] cosine similarities."""


def final_norm_gain(model: nn.Module) -> Tensor | None:
    """The elementwise gain of the model's final norm ([d]), or None when it has no norm we recognise.
    Gemma's RMSNorm multiplies by (1 + weight)."""
    base = getattr(model, "base_model", model)
    for name in _FINAL_NORMS:
        norm = getattr(base, name, None)
        if isinstance(norm, nn.Module) and isinstance(getattr(norm, "weight", None), Tensor):
            w = norm.weight.detach().float()
            return w + 1 if "gemma" in type(norm).__name__.lower() else w
    return None


def logit_effects(w_dec: Tensor, model: nn.Module, k: int = 10) -> Effects | None:
    """Top and bottom `k` logit effects of each row of `w_dec` ([n, d]); None when the model has no
    unembedding of width d or no recognisable final norm."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    gain = final_norm_gain(model)
    if head is None or gain is None or head.weight.shape[1] != w_dec.shape[1]:
        return None
    w_u = head.weight.detach().float().to(w_dec.device)
    gain = gain.to(w_dec.device)
    k = min(k, w_u.shape[0])
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for i in range(0, w_dec.shape[0], CHUNK):
        logits = (w_dec[i : i + CHUNK].float() * gain) @ w_u.T
        top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        parts.append((top.indices, top.values, bottom.indices, bottom.values))
    return Effects(*(torch.cat([p[j] for p in parts]).cpu() for j in range(4)))


def similar_decoders(w_dec: Tensor, selected: Tensor, k: int = 5) -> Neighbours:
    """The `k` latents whose decoder rows have the largest cosine with each selected latent's row."""
    unit = nn.functional.normalize(w_dec.float(), dim=1)
    k = min(k, w_dec.shape[0] - 1)
    ids, cos = [], []
    for i in range(0, selected.numel(), CHUNK):
        sel = selected[i : i + CHUNK].to(w_dec.device)
        sim = unit[sel] @ unit.T
        sim[torch.arange(sel.numel(), device=sim.device), sel] = -float("inf")
        top = sim.topk(k, dim=1)
        ids.append(top.indices.cpu())
        cos.append(top.values.cpu())
    return Neighbours(torch.cat(ids), torch.cat(cos))
