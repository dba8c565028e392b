"""The SAE directory (SAELens layout) and the inference-time `SparseAutoencoder` shared by train and eval, for SAEs
and transcoders alike.

A transcoder is an SAE whose decoder writes another site than its encoder reads (as in SAELens, whose Transcoder
extends its SAE): it predicts the activations y of an output site `hook_name_out` (e.g. `blocks.L.hook_mlp_out`,
width `d_out`) from those x of its input site `hook_name` (e.g. `blocks.L.ln2.hook_normalized`). An SAE is the
case y = x: its `hook_name_out` and `d_out` are its input's. One config (`SaeConfig`), one module, one writer and
one loader serve both; what differs is data, the `Layout` its SAELens architecture name stands for.

```
<sae dir>/
  cfg.json                  SAELens 6 config: architecture, d_in, d_sae, d_out (transcoders), dtype, device,
                            apply_b_dec_to_input, normalize_activations ("none"), reshape_activations,
                            k (topk), metadata {sae_lens_version, model_name, hook_name, hook_name_out
                            (transcoders), ... our keys}
  sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out],
                            threshold [d_sae] (jumprelu*), W_skip [d_out, d_in] (*skip_transcoder)
```
`sae_lens.SAE.load_from_disk(dir)` loads it unchanged: SAELens reads the top-level fields of its config class,
ignores unknown top-level keys and keeps every `metadata` key as an attribute of `cfg.metadata`, so our own
fields live there (see `SaeConfig`). Weights are in raw activation units: the dataset-level scales used in
training (the input's, and a transcoder's target's) are folded in on export (`fold_scales`), so
`normalize_activations` is "none".

SAELens architectures (`ARCHITECTURES`, each a `Layout`):
| architecture | activation | the encoder reads | decode(a, x) |
|---|---|---|---|
| standard, topk, jumprelu | relu, the k largest per row, relu(pre)·1[pre > θ_i] | x − b_dec | a·W_dec + b_dec |
| transcoder, jumprelu_transcoder | relu, jumprelu | x | a·W_dec + b_dec |
| skip_transcoder, jumprelu_skip_transcoder | relu, jumprelu | x | a·W_dec + b_dec + x·W_skipᵀ |

How each trained architecture is written (`sae.architectures`: `exports_as`, `has_theta`, `batch_mode`; a
transcoder takes the transcoder counterpart of `exports_as`, `architecture_name`):
| trained as | architecture | encode (inference) |
|---|---|---|
| batchtopk | jumprelu, threshold = θ·1 | a = relu(pre)·1[pre > θ]; `encode_batch` keeps the k·B largest |
| matryoshka | jumprelu, threshold = θ·1 | as batchtopk; metadata.matryoshka_widths gives the nested prefixes |
| topk | topk, k (no transcoder) | the k largest of relu(pre) in each row |
| relu (L1) | standard | relu(pre) |
| jumprelu | jumprelu, per-latent threshold | relu(pre)·1[pre > θ_i] |
with pre = (x − b_dec)·W_enc + b_enc (b_dec subtracted when apply_b_dec_to_input, as SAELens does).

Writes are atomic (`sae.atomic.replace_dir`): a complete directory is built beside the target and renamed over
it; a kill leaves the old directory or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import __version__, architectures, atomic
from .errors import SaeError

CFG_FILE = "cfg.json"
"""SAELens' config file name."""

WEIGHTS_FILE = "sae_weights.safetensors"
"""SAELens' weights file name."""


class Layout(NamedTuple):
    """What a SAELens architecture name says about the directory and the inference module."""

    activation: str
    """jumprelu (relu(pre)·1[pre > θ_i], a `threshold` tensor), topk (the k largest per row) or relu."""
    transcoder: bool
    """SAELens' transcoder layout: cfg.json records d_out and metadata.hook_name_out, and b_dec lives in the output
    space, so it is never subtracted from the input (apply_b_dec_to_input is false)."""
    skip: bool
    """An affine skip connection: the output gains x·W_skipᵀ, W_skip [d_out, d_in]."""


ARCHITECTURES: dict[str, Layout] = {
    "jumprelu": Layout("jumprelu", transcoder=False, skip=False),
    "topk": Layout("topk", transcoder=False, skip=False),
    "standard": Layout("relu", transcoder=False, skip=False),
    "transcoder": Layout("relu", transcoder=True, skip=False),
    "skip_transcoder": Layout("relu", transcoder=True, skip=True),
    "jumprelu_transcoder": Layout("jumprelu", transcoder=True, skip=False),
    "jumprelu_skip_transcoder": Layout("jumprelu", transcoder=True, skip=True),
}
"""The SAELens architectures (SAE and transcoder) that `load_sae` reads and `save_sae` writes."""

SAE_LENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens treats configs without one (or older than 6.0) as pre-6.0
and rebuilds their metadata from top-level keys, dropping ours. It names the config format, not a tool run."""

_SAELENS_RESERVED = {"get", "keys", "values", "items", "to_dict", "from_dict"}
# SAELens turns every metadata key into an attribute of its SAEMetadata; these would shadow its methods.

_WRITTEN = {
    "sae_lens_version": SAE_LENS_FORMAT_VERSION,
    "sae_lens_training_version": None,
    "sae_pipeline_version": __version__,
    "hook_head_index": None,
    "hook_head_index_out": None,
    "prepend_bos": True,
}
# Metadata every cfg.json of ours carries, ahead of the config's own: the heads below, in the order each layout
# has always been written in (a transcoder's sae_pipeline_version follows the config's own metadata). Reading
# drops them at these values, except sae_pipeline_version: eval tells a directory of ours by it.
_SAE_HEAD = ("sae_lens_version", "sae_lens_training_version", "sae_pipeline_version", "hook_head_index", "prepend_bos")
_TRANSCODER_HEAD = (*_SAE_HEAD[:2], "hook_head_index", "hook_head_index_out", "prepend_bos")

RUN_FILE = "run.json"
"""Written into `TrainConfig.out` when a training run starts: its config and store, so a rerun (and `sae run`)
can tell whether `out` holds a run of the same settings."""

CHECKPOINT_DIR = "checkpoint"
"""Folder of training checkpoints under `TrainConfig.out` (written by sae.train.checkpoint)."""


def architecture_name(exports_as: str, *, transcoder: bool = False, skip: bool = False) -> str:
    """The SAELens architecture of a trained architecture exported as `exports_as` (SAELens' SAE name: jumprelu
    for BatchTopK and JumpReLU, topk, standard for ReLU): itself for an SAE, its transcoder counterpart (with or
    without a skip connection) for a transcoder."""
    want = Layout(ARCHITECTURES[exports_as].activation, transcoder, skip)
    for name, layout in ARCHITECTURES.items():
        if layout == want:
            return name
    names = ", ".join(n for n, layout in ARCHITECTURES.items() if layout.transcoder)
    raise SaeError(
        f"an SAE exported as {exports_as!r} has no SAELens transcoder counterpart (SAELens has {names}); train the "
        "transcoder as batchtopk (exported as jumprelu_transcoder), jumprelu or relu"
    )


# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class SaeConfig:
    """What cfg.json says about an SAE or a transcoder. Fields SAELens knows are written where SAELens reads them;
    the rest go into cfg.json's `metadata`, which SAELens keeps but does not interpret. The output side (`d_out`,
    `hook_name_out`, `target_scale`) of an SAE is its input side, set from it."""

    architecture: str
    """Inference architecture, SAELens' name (one of `ARCHITECTURES`): jumprelu (BatchTopK is exported as one),
    topk or standard for SAEs; transcoder, skip_transcoder, jumprelu_transcoder or jumprelu_skip_transcoder."""

    d_in: int
    """Input width (the input site's d_model)."""

    d_sae: int
    """Number of latents F."""

    d_out: int | None = None
    """Output width (the output site's d_model); None: d_in."""

    k: float | None = None
    """topk: latents kept per row. BatchTopK-trained: mean latents per row, used by `encode_batch`."""

    dtype: str = "float32"
    """Dtype of the stored weights."""

    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec from the input before encoding; None: true for an SAE (always, for ours), false for a
    transcoder (which must not: its b_dec is in the output space)."""

    rescale_acts_by_decoder_norm: bool = False
    """SAELens topk option (foreign directories only): select and decode with pre-activations scaled by the
    decoder row norms."""

    model_name: str | None = None
    """Model the SAE reads (SAELens metadata.model_name)."""

    hook_name: str | None = None
    """Input site, TransformerLens name such as `blocks.6.hook_resid_post` (SAELens metadata.hook_name)."""

    hook_name_out: str | None = None
    """Output site, whose activations the decoder writes, e.g. `blocks.6.hook_mlp_out` (SAELens metadata.hook_name_out,
    written for transcoders); None for a transcoder that records none."""

    training_architecture: str | None = None
    """How it was trained: a `sae.architectures` name for ours; SAELens writes its own name here."""

    theta: float | None = None
    """BatchTopK and Matryoshka: the global inference threshold θ, in pre-activation units (unchanged by export)."""

    input_scale: float | None = None
    """Dataset-level scale c of the input used in training (x_train = c·x_raw); already folded into the weights."""

    target_scale: float | None = None
    """Dataset-level scale of a transcoder's target used in training (y_train = c_out·y_raw; written for
    transcoders); already folded into the weights."""

    complete: bool = False
    """Training finished: the trainer writes True only on its final save (`is_complete` checks it)."""

    metadata: dict[str, Any] = field(default_factory=dict)
    """Every other metadata key, kept as it is: e.g. store, model {id, revision, sha256}, corpus, keep_bos,
    context_size, tokens_seen, lr, seed, and SAELens' own keys for SAELens-made directories."""

    # Fields of ours that live inside cfg.json's metadata, in the order they are written.
    _META_FIELDS = (
        "model_name", "hook_name", "hook_name_out", "training_architecture", "theta", "input_scale", "target_scale",
        "complete",
    )  # fmt: skip
    _OUTPUT_FIELDS = ("hook_name_out", "target_scale")  # (written for transcoders only)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SaeError(f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if not self.layout.transcoder:  # it reconstructs its input
            self.d_out, self.hook_name_out, self.target_scale = self.d_in, self.hook_name, self.input_scale
        elif self.d_out is None:
            self.d_out = self.d_in
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = not self.layout.transcoder
        elif self.apply_b_dec_to_input and self.layout.transcoder:
            raise SaeError("apply_b_dec_to_input is true; a transcoder's b_dec is in the output space")

    @property
    def layout(self) -> Layout:
        """What its architecture name says: activation, transcoder layout, skip connection."""
        return ARCHITECTURES[self.architecture]

    def to_dict(self) -> dict[str, Any]:
        """cfg.json content, loadable unchanged by `sae_lens.SAE.load_from_disk`."""
        bad = sorted(_SAELENS_RESERVED & set(self.metadata))
        if bad:
            raise SaeError(f"metadata key(s) {bad} would shadow SAELens' SAEMetadata methods; rename them")
        transcoder = self.layout.transcoder
        meta: dict[str, Any] = {name: _WRITTEN[name] for name in (_TRANSCODER_HEAD if transcoder else _SAE_HEAD)}
        meta.update(self.metadata)
        meta.setdefault("sae_pipeline_version", __version__)
        for name in self._META_FIELDS:
            if transcoder or name not in self._OUTPUT_FIELDS:
                meta[name] = getattr(self, name)
        if self.k is not None:
            meta["k"] = self.k
        out: dict[str, Any] = {"architecture": self.architecture, "d_in": int(self.d_in), "d_sae": int(self.d_sae)}
        if transcoder:
            out["d_out"] = int(self.d_out)  # type: ignore[arg-type]
        out.update(
            dtype=self.dtype,
            device="cpu",
            apply_b_dec_to_input=bool(self.apply_b_dec_to_input),
            normalize_activations="none",
            reshape_activations="none",
            metadata=meta,
        )
        if self.layout.activation == "topk":
            if self.k is None or int(self.k) != self.k or self.k < 1:
                raise SaeError(f"a topk SAE needs an integer k ≥ 1, got {self.k!r}")
            out["k"] = int(self.k)
            out["rescale_acts_by_decoder_norm"] = bool(self.rescale_acts_by_decoder_norm)
        return json.loads(json.dumps(out))  # fail here, not half-way through a write, on non-JSON values

    @classmethod
    def from_dict(cls, d: Any, where: str = "cfg.json") -> SaeConfig:
        """Read ours and SAELens' (6.x, and the pre-6.0 flat layout) cfg.json, SAE or transcoder (whose metadata
        keys SAELens' pretrained loaders may also return flat)."""
        if not isinstance(d, dict):
            raise SaeError(f"{where}: expected a JSON object")
        meta = d.get("metadata")
        meta = dict(meta) if isinstance(meta, dict) else {}
        lens_arch = d.get("architecture")
        if lens_arch is None:  # SAELens < 6: flat config, TopK marked by its activation function
            act = d.get("activation_fn", d.get("activation_fn_str"))
            kw = d.get("activation_fn_kwargs") or {}
            lens_arch = "topk" if act == "topk" and kw.get("k") is not None else "standard"
            if lens_arch == "topk":
                d = {**d, "k": kw["k"]}
        keys = ("model_name", "hook_name", "hook_point", "hook_name_out", "context_size", "prepend_bos", "dataset_path")
        for key in keys:
            if key in d and key not in meta:
                meta["hook_name" if key == "hook_point" else key] = d[key]
        if lens_arch not in ARCHITECTURES:
            raise SaeError(
                f"{where}: architecture {lens_arch!r} is not supported; supported: {', '.join(ARCHITECTURES)} "
                "(BatchTopK SAEs are stored as jumprelu)"
            )
        layout = ARCHITECTURES[lens_arch]
        if layout.transcoder and d.get("apply_b_dec_to_input", False):
            raise SaeError(f"{where}: apply_b_dec_to_input is true; a transcoder's b_dec is in the output space")
        norm = d.get("normalize_activations", "none")
        # SAELens applies "expected_average_only_in" only when it knows the factor (pretrained registry);
        # from disk it runs such an SAE as-is, and so do we.
        if norm not in ("none", None, False, "expected_average_only_in"):
            raise SaeError(
                f"{where}: normalize_activations {norm!r} is not supported (only 'none'); fold the "
                "normalization into the weights first"
            )
        if d.get("reshape_activations", "none") not in ("none", None):
            raise SaeError(f"{where}: reshape_activations {d['reshape_activations']!r} (hook_z SAEs) is not supported")
        for key in ("d_in", "d_sae", "d_out") if layout.transcoder else ("d_in", "d_sae"):
            v = d.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SaeError(f"{where}: {key} must be a positive integer, got {v!r}")
        k = d.get("k", meta.get("k"))
        if k is None and isinstance(meta.get("training_architecture_details"), dict):
            k = meta["training_architecture_details"].get("k")  # SAELens BatchTopK saved as jumprelu
        if layout.activation == "topk" and (not _number(k) or int(k) != k or k < 1):
            raise SaeError(f"{where}: a topk SAE needs an integer k ≥ 1, got {k!r}")
        if k is not None and (not _number(k) or k <= 0):
            raise SaeError(f"{where}: k must be a positive number, got {k!r}")
        known = {name: meta.pop(name) for name in cls._META_FIELDS if name in meta}
        known = {name: v for name, v in known.items() if v is not None}
        meta.pop("k", None)
        for name, value in _WRITTEN.items():
            if name in meta and meta[name] == value and name != "sae_pipeline_version":
                del meta[name]
        for name in ("sae_lens_version", "sae_pipeline_version"):  # null: as if absent
            if name in meta and meta[name] is None:
                del meta[name]
        for name in ("theta", "input_scale", "target_scale"):
            if name in known and not _number(known[name]):
                raise SaeError(f"{where}: metadata.{name} must be a number, got {known[name]!r}")
        return cls(
            architecture=lens_arch,
            d_in=d["d_in"],
            d_sae=d["d_sae"],
            d_out=d.get("d_out") if layout.transcoder else None,
            k=k,
            dtype=str(d.get("dtype") or "float32").removeprefix("torch."),
            apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", not layout.transcoder)),
            rescale_acts_by_decoder_norm=layout.activation == "topk" and bool(d.get("rescale_acts_by_decoder_norm")),
            metadata=meta,
            **known,
        )

    def replace(self, **changes: Any) -> SaeConfig:
        """A copy with `changes` applied (metadata copied, not shared)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["metadata"] = dict(self.metadata)
        values.update(changes)
        return SaeConfig(**values)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------------
# Exact batch top-k (shared with training)


def flat_nonzero(mask: Tensor) -> Tensor:
    """Ascending flat indices of the True entries of a contiguous bool tensor. On CPU a first pass finds the
    8-byte words holding any True (for sparse masks faster than `nonzero` over every byte)."""
    flat = mask.reshape(-1)
    n = flat.numel()
    n8 = n - n % 8
    if flat.device.type != "cpu" or n8 == 0 or not flat.is_contiguous():
        return flat.nonzero().squeeze(1)
    words = flat[:n8].view(torch.int64).nonzero().squeeze(1)
    inner = flat[:n8].view(-1, 8)[words].nonzero()
    idx = words[inner[:, 0]] * 8 + inner[:, 1]
    if n8 < n:
        idx = torch.cat([idx, flat[n8:].nonzero().squeeze(1) + n8])
    return idx


def _coprime_stride(target: int, row: int) -> int:
    s = max(1, target)
    while math.gcd(s, row) != 1:
        s += 1
    return s


class _Ranks:
    """The few collectives the distributed selection needs; without a group every call is local."""

    def __init__(self, group: Any = None):
        self.group = group
        if group is not None:
            import torch.distributed as dist

            self.dist = dist
            self.world = dist.get_world_size(group)
            self.rank = dist.get_rank(group)

    def sum(self, n: int | Tensor, device: torch.device) -> int:
        if self.group is None:
            return int(n)
        t = torch.as_tensor(n, dtype=torch.long, device=device).reshape(1).clone()
        self.dist.all_reduce(t, group=self.group)
        return int(t)

    def sum_tensor(self, t: Tensor) -> Tensor:
        """The sum of a 0-dim tensor over the ranks, left on the device."""
        if self.group is None:
            return t
        t = t.reshape(1).clone()
        self.dist.all_reduce(t, group=self.group)
        return t[0]

    def before(self, t: Tensor) -> Tensor | int:
        """The sum of a 0-dim tensor over the lower ranks, on the device (0 without a group)."""
        if self.group is None:
            return 0
        parts = [torch.empty_like(t.reshape(1)) for _ in range(self.world)]
        self.dist.all_gather(parts, t.reshape(1).contiguous(), group=self.group)
        return torch.cat(parts)[: self.rank].sum()

    def counts(self, n: int, device: torch.device) -> list[int]:
        """Every rank's `n`, in rank order."""
        if self.group is None:
            return [n]
        out = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world)]
        self.dist.all_gather(out, torch.tensor([n], dtype=torch.long, device=device), group=self.group)
        return [int(t) for t in out]

    def cat(self, t: Tensor) -> Tensor:
        """Concatenation of every rank's 1-D `t`, in rank order (lengths may differ)."""
        if self.group is None:
            return t
        sizes = self.counts(t.numel(), t.device)
        padded = t.new_zeros(max(sizes))
        padded[: t.numel()] = t
        parts = [torch.empty_like(padded) for _ in sizes]
        self.dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def batch_topk_indices(pre: Tensor, k_total: int, group: Any = None, n_total: int | None = None) -> Tensor:
    """Flat indices, ascending, of the `k_total` largest *positive* entries of `pre` (any shape).

    Exact: the same set as `torch.topk(pre.flatten().relu(), k_total)` restricted to positive values, with
    ties at the cut resolved towards the lower flat index (deterministic). Fewer than `k_total` indices come
    back only when `pre` has fewer positive entries.

    With a torch.distributed `group`, `pre` is this rank's share of a global batch (the ranks' rows
    concatenated in rank order) and `k_total` counts over the global batch: each rank gets the indices of its
    own entries among the global top k_total, exactly what one process would select from the whole batch.

    Why not `torch.topk` over all B·F values: on CPU it costs ~3× the encoder matmul. Instead a strided
    sample gives a lower bound t of the cut, one comparison pass collects the ~1.1·k_total entries above t,
    and `kthvalue` over those finds the exact cut. A sample that misses (too few candidates) lowers t and
    retries, so the result never depends on the sample, only the time does.

    `n_total`: pre's element count over the ranks when the caller knows it (saves a collective). In one
    process the only host read is the candidates' count (a data-dependent size); a second comes only when the
    sample missed.
    """
    flat = pre.detach().reshape(-1)
    ranks = _Ranks(group)
    n = ranks.sum(flat.numel(), flat.device) if n_total is None else int(n_total)
    if k_total <= 0 or n == 0:
        return torch.empty(0, dtype=torch.long, device=pre.device)
    row = pre.shape[-1] if pre.dim() > 0 else 1
    sample = flat[:0]
    rank: int | None = None
    if k_total * 4 < n:  # else a dense selection: no point in sampling
        # ~2048 expected hits in the sample; a stride coprime with the row length mixes rows and latents
        sample = ranks.cat(flat[:: _coprime_stride(k_total // 2048, row)])
        expect = sample.numel() * k_total / n
        rank = int(expect * 1.1 + 5 * math.sqrt(expect) + 8)
    while True:
        # the bound stays on the device: the candidates' count (the nonzero below) is the one host read
        thr: Tensor | None = None  # None: 0, every positive entry
        if rank is not None and rank < sample.numel():
            thr = torch.topk(sample, rank, sorted=False).values.min().clamp_min(0.0)
        idx = flat_nonzero(flat > (0.0 if thr is None else thr))
        count = ranks.sum(idx.numel(), flat.device)
        if count >= k_total or thr is None or float(thr) == 0.0:  # (read only when the sample missed)
            break
        rank = 4 * rank  # type: ignore[operator]  # the sample's bound was above the cut: lower it
    if count <= k_total:
        return idx
    vals = flat[idx]
    every = ranks.cat(vals)
    kth = torch.kthvalue(every.float(), every.numel() - k_total + 1).values.to(vals.dtype)
    keep = vals > kth
    ties = vals == kth
    n_ties = k_total - ranks.sum_tensor(keep.sum())  # how many entries equal to the cut to keep (on the device)
    before = ranks.before(ties.sum())  # ties on the lower ranks
    keep |= ties & (ties.cumsum(0) + before <= n_ties)
    if group is not None:  # this rank's share of the k_total: its size is known only here
        return idx[keep]
    # exactly k_total entries are kept: compact them without reading their count back (idx[keep] would)
    dest = torch.where(keep, keep.cumsum(0) - 1, k_total)  # slot k_total collects the dropped ones
    return idx.new_empty(k_total + 1).scatter_(0, dest, idx)[:k_total]


# --------------------------------------------------------------------------------------------------
# The inference module


def weight_shapes(cfg: SaeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the weights file and its shape, for `cfg`."""
    d, f, o = cfg.d_in, cfg.d_sae, int(cfg.d_out)  # type: ignore[arg-type]
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d, f), "b_enc": (f,), "W_dec": (f, o), "b_dec": (o,)}
    if cfg.layout.activation == "jumprelu":
        shapes["threshold"] = (f,)
    if cfg.layout.skip:
        shapes["W_skip"] = (o, d)
    return shapes


def fold_scales(w: dict[str, Tensor], *, input_scale: float, target_scale: float) -> dict[str, Tensor]:
    """Weights trained on scaled data (x_t = c_in·x, y_t = c_out·y; an SAE's y is x, c_out = c_in) → the same SAE
    in raw units.

    ŷ = f(c_in·x) / c_out: the encoder takes c_in (pre-activations, hence b_enc and thresholds, are unchanged),
    the decoder and b_dec are divided by c_out, and W_skip becomes W_skip·c_in/c_out.
    """
    c_in, c_out = float(input_scale), float(target_scale)
    if not (c_in > 0 and c_out > 0):
        raise SaeError(f"scales must be positive, got input {c_in!r} and target {c_out!r}")
    out = dict(w)
    out["W_enc"] = w["W_enc"] * c_in
    out["W_dec"] = w["W_dec"] / c_out
    out["b_dec"] = w["b_dec"] / c_out
    if "W_skip" in w:
        out["W_skip"] = w["W_skip"] * (c_in / c_out)
    return out


class SparseAutoencoder(nn.Module):
    """An SAE (or transcoder) in raw activation units: x [..., d_in] → a = encode(x) [..., d_sae] → decode(a, x)
    [..., d_out], the reconstruction of x (a transcoder's prediction of its output site).

    Parameters are named and laid out as SAELens' (`weight_shapes`: W_enc, b_enc, W_dec, b_dec, and threshold
    for the jumprelu architectures, W_skip for the skip transcoders), so `state_dict()` is a valid
    sae_weights.safetensors. Inputs may have any leading shape.
    """

    def __init__(self, cfg: SaeConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        for name, shape in weight_shapes(cfg).items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        return int(self.cfg.d_out)  # type: ignore[arg-type]

    def pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations (x − b_dec)·W_enc + b_enc, [..., d_sae] (b_dec subtracted only when
        apply_b_dec_to_input: never for a transcoder)."""
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        # addmm adds b_enc inside the GEMM instead of in a second pass over the [rows, d_sae] result
        pre = torch.addmm(self.b_enc, x.reshape(-1, x.shape[-1]), self.W_enc).view(*x.shape[:-1], -1)
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def _activate(self, pre: Tensor) -> Tensor:
        activation = self.cfg.layout.activation
        if activation == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        if activation == "topk":
            top = torch.topk(pre, int(self.cfg.k), dim=-1, sorted=False)  # type: ignore[arg-type]
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        return pre.relu()

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations [..., d_sae] at inference: jumprelu (and BatchTopK) relu(pre)·1[pre > θ];
        topk the k largest of relu(pre) per row; standard (and transcoder) relu(pre). As SAELens computes them."""
        return self._activate(self.pre_acts(x))

    @property
    def batch_topk(self) -> bool:
        """Whether `encode_batch` selects over the batch: a jumprelu SAE with a known k whose training
        architecture has a batch mode (`sae.architectures`), or that SAELens wrote with no name of ours."""
        batch = architectures.batch_mode(self.cfg.training_architecture)
        return self.cfg.layout.activation == "jumprelu" and self.cfg.k is not None and batch

    def encode_batch(self, x: Tensor) -> Tensor:
        """BatchTopK SAEs: keep the round(k·N) largest entries of relu(pre) over all N rows of `x` (ties to the
        earlier row/latent). Other SAEs: the same as `encode`."""
        if not self.batch_topk:
            return self.encode(x)
        pre = self.pre_acts(x)
        n_rows = pre.numel() // pre.shape[-1]
        idx = batch_topk_indices(pre, round(float(self.cfg.k) * n_rows))  # type: ignore[arg-type]
        out = torch.zeros_like(pre)
        out.view(-1)[idx] = pre.reshape(-1)[idx]
        return out

    def decode(self, a: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruction a·W_dec + b_dec, [..., d_out], plus the skip connection x·W_skipᵀ when it has one (then
        the input `x` is needed)."""
        a = a.to(self.W_dec.dtype)
        if self.cfg.rescale_acts_by_decoder_norm:
            a = a / self.W_dec.norm(dim=-1)
        y = a @ self.W_dec + self.b_dec
        if self.cfg.layout.skip:
            if x is None:
                raise ValueError("a skip transcoder's decode needs the input x")
            y = y + x.to(self.W_skip.dtype) @ self.W_skip.T
        return y

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, d_out={c.d_out}, k={c.k}, "
            f"{c.hook_name} -> {c.hook_name_out}"
        )


# --------------------------------------------------------------------------------------------------
# Saving and loading


def _weights_of(sae: SparseAutoencoder | dict[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(sae, SparseAutoencoder):
        return {k: v.detach() for k, v in sae.state_dict().items()}
    if isinstance(sae, dict):
        return {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in sae.items()}
    raise TypeError(f"expected a SparseAutoencoder or a dict of tensors, got {type(sae).__name__}")


def check_weights(w: dict[str, Any], cfg: SaeConfig, where: str) -> None:
    """SaeError unless `w` holds exactly the floating-point tensors of `weight_shapes(cfg)`."""
    shapes = weight_shapes(cfg)
    missing = [k for k in shapes if k not in w]
    if missing:
        raise SaeError(f"{where}: missing tensor(s) {', '.join(missing)} for a {cfg.architecture} SAE")
    extra = sorted(set(w) - set(shapes))
    if extra:
        raise SaeError(f"{where}: unexpected tensor(s) {', '.join(extra)} for a {cfg.architecture} SAE")
    for k, shape in shapes.items():
        if not isinstance(w[k], Tensor):
            raise SaeError(f"{where}: {k} is not a tensor")
        if tuple(w[k].shape) != shape:
            raise SaeError(
                f"{where}: {k} has shape {list(w[k].shape)}, expected {list(shape)} for d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}, d_out={cfg.d_out}"
            )
        if not w[k].is_floating_point():
            raise SaeError(f"{where}: {k} has dtype {w[k].dtype}, expected a floating-point dtype")


def write_sae_files(path: str | os.PathLike, tensors: dict[str, Tensor], cfg_json: dict[str, Any]) -> Path:
    """Write a SAELens-format directory (cfg.json + sae_weights.safetensors) at `path` atomically
    (`sae.atomic.replace_dir`: the old directory or the new one, never a mix); return `path`. `tensors` are
    written as given (CPU, contiguous). Files in an existing directory at `path` other than the two SAE files (a
    training log) are carried over, hard-linked, so no moment exists where they are only in a temporary folder.
    `save_sae` writes through this."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaeError(f"{path} exists and is not a directory")
    with atomic.replace_dir(path) as tmp:
        if path.is_dir():
            for entry in path.iterdir():
                if entry.name in (CFG_FILE, WEIGHTS_FILE):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=os.link)
                else:
                    os.link(entry, tmp / entry.name, follow_symlinks=False)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        atomic.apply_umask(tmp / WEIGHTS_FILE)  # safetensors creates its file 0600
        with open(tmp / CFG_FILE, "w") as fh:
            json.dump(cfg_json, fh, indent=1)
            fh.write("\n")
    return path


def save_sae(
    sae_or_weights: SparseAutoencoder | dict[str, Tensor], cfg: SaeConfig | None, path: str | os.PathLike
) -> Path:
    """Write an SAE (or transcoder) directory at `path` atomically (`write_sae_files`: the old directory or the new
    one, never a mix; other files carried over); return `path`.

    `sae_or_weights` is a SparseAutoencoder (its cfg is used when `cfg` is None) or a dict of the tensors of
    `weight_shapes(cfg)`. Tensors are stored contiguous, on CPU, in `cfg.dtype`.
    """
    if cfg is None:
        if not isinstance(sae_or_weights, SparseAutoencoder):
            raise TypeError("save_sae needs a cfg when given a dict of weights")
        cfg = sae_or_weights.cfg
    where = str(path)
    weights = _weights_of(sae_or_weights)
    check_weights(weights, cfg, where)
    dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SaeError(f"{where}: dtype {cfg.dtype!r} is not a torch dtype name such as float32")
    tensors = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in weights.items()}
    return write_sae_files(path, tensors, cfg.to_dict())


def read_cfg_json(path: str | os.PathLike) -> Any:
    """The parsed cfg.json of the SAE or transcoder directory `path` (SaeError when missing or not JSON)."""
    path = Path(path)
    f = path / CFG_FILE
    if not path.is_dir():
        raise SaeError(f"SAE directory {str(path)!r} does not exist")
    if not f.is_file():
        raise SaeError(f"{path} is not an SAE directory: {CFG_FILE} is missing")
    try:
        return json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SaeError(f"{f}: not valid JSON ({e})") from None


def read_cfg(path: str | os.PathLike) -> SaeConfig:
    """The SaeConfig of the SAE or transcoder directory `path` (cfg.json only; SaeError when missing or invalid)."""
    return SaeConfig.from_dict(read_cfg_json(path), where=str(Path(path) / CFG_FILE))


def load_sae(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
) -> SparseAutoencoder:
    """Load an SAE or transcoder directory: ours, or one SAELens wrote (any of `ARCHITECTURES`, jumprelu with
    per-latent thresholds; older `log_threshold` and `scaling_factor` tensors are converted). SaeError on a missing
    or corrupt cfg.json / sae_weights.safetensors, or tensors that do not fit its widths."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg = read_cfg(path)
    wf = path / WEIGHTS_FILE
    if not wf.is_file():
        raise SaeError(f"{path} is not a complete SAE directory: {WEIGHTS_FILE} is missing")
    if isinstance(dtype, str):
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise SaeError(f"dtype {dtype!r} is not a torch dtype name such as float32")
        dtype = dt
    try:
        with safe_open(str(wf), framework="pt", device="cpu") as fh:
            w = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SaeError(f"{wf}: cannot read the weights ({e}); the file is corrupt or not safetensors") from None
    where = str(wf)
    if cfg.layout.activation == "jumprelu" and "threshold" not in w and "log_threshold" in w:
        w["threshold"] = w.pop("log_threshold").exp()
    if "scaling_factor" in w:  # SAELens < 6 finetuning scale: acts are multiplied by it before decoding
        s = w.pop("scaling_factor")
        if "W_dec" in w and s.shape == (cfg.d_sae,):
            w["W_dec"] = w["W_dec"] * s.to(w["W_dec"].dtype)[:, None]
    check_weights(w, cfg, where)
    sae = SparseAutoencoder(cfg, device="meta", dtype=dtype)
    sae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in w.items()}, assign=True)
    return sae


def is_complete(path: str | os.PathLike) -> bool:
    """Whether `path` holds a finished SAE (or transcoder) of ours: both files, a readable cfg.json with
    metadata.complete."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file():
        return False
    try:
        return read_cfg(path).complete is True
    except SaeError:
        return False


# --------------------------------------------------------------------------------------------------
# Names of a training sweep's directories


class SweepPoint(NamedTuple):
    """One SAE of a `sae train` sweep."""

    name: str
    """Directory name under TrainConfig.out, e.g. `batchtopk-k32-x8`, `topk-k64-F16384`, `jumprelu-l0c0.5-x8`."""
    arch: str
    """A `sae.architectures` name."""
    k: int | None = None
    """Latents per row (the architectures that sweep `k`); None otherwise."""
    dict_size: int | None = None
    """F, when TrainConfig.dict_size names it."""
    expansion: int | None = None
    """F / d_model, when F comes from TrainConfig.expansion."""
    l0_coeff: float | None = None
    """jumprelu: L0 coefficient; None otherwise."""


def sweep(cfg: Any) -> list[SweepPoint]:
    """Every combination a TrainConfig trains: arch × F × the architecture's sweep values (`sae.architectures`:
    k for batchtopk/topk/matryoshka, l0_coeff for jumprelu, none for relu)."""
    sizes: list[tuple[int | None, int | None]] = (
        [(int(f), None) for f in cfg.dict_size] if cfg.dict_size else [(None, int(e)) for e in cfg.expansion]
    )
    points: dict[str, SweepPoint] = {}
    for arch in cfg.arch:
        info = architectures.get(arch)
        values = getattr(cfg, info.sweep) if info.sweep else (None,)
        for v in values:
            tag = info.sweep_tag.format(v) if info.sweep else ""
            swept = {info.sweep: v} if info.sweep else {}
            for f, e in sizes:
                name = f"{arch}{tag}-" + (f"F{f}" if f is not None else f"x{e}")
                points.setdefault(name, SweepPoint(name, arch, dict_size=f, expansion=e, **swept))
    return list(points.values())


def sweep_names(cfg: Any) -> list[str]:
    """Directory names of the SAEs a TrainConfig trains (see `sweep`)."""
    return [p.name for p in sweep(cfg)]


def recorded_store(sae_dir: str | os.PathLike, metadata: dict[str, Any]) -> tuple[Path | None, str]:
    """The store an SAE of ours was trained on, and how it was found (for reports). `metadata.store_relative`
    (the store's path relative to the SAE directory) comes first, so a run directory moved or copied as a whole
    still finds its store; then the absolute `metadata.store`. None when neither exists."""
    rel, absolute = metadata.get("store_relative"), metadata.get("store")
    tried = []
    if isinstance(rel, str) and rel:
        tried.append((Path(os.path.normpath(Path(sae_dir).absolute() / rel)), "found relative to the SAE directory"))
    if isinstance(absolute, str) and absolute:
        tried.append((Path(absolute), "found at its recorded path"))
    for path, how in tried:
        if path.exists():
            return path, how
    if not tried:
        return None, "the SAE records no store"
    return None, f"recorded store {tried[-1][0]} not found (moved or deleted)"


def checkpoint_path(out: str | os.PathLike) -> Path:
    """The `latest` pointer of the training checkpoints under `out`: it exists once a complete checkpoint
    does."""
    return Path(out) / CHECKPOINT_DIR / "latest"


__all__ = [
    "ARCHITECTURES",
    "CFG_FILE",
    "Layout",
    "RUN_FILE",
    "SaeConfig",
    "SparseAutoencoder",
    "SweepPoint",
    "WEIGHTS_FILE",
    "architecture_name",
    "batch_topk_indices",
    "check_weights",
    "checkpoint_path",
    "flat_nonzero",
    "fold_scales",
    "is_complete",
    "load_sae",
    "read_cfg",
    "recorded_store",
    "save_sae",
    "write_sae_files",
    "sweep",
    "sweep_names",
    "weight_shapes",
]
