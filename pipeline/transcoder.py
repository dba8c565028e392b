"""Transcoders: the SAELens 6 transcoder directory format and the inference-time `Transcoder`.

A transcoder predicts the activations y of an output site (e.g. `blocks.L.hook_mlp_out`) from those x of an
input site (e.g. `blocks.L.ln2.hook_normalized`) through a sparse code:

    a = act(x·W_enc + b_enc),   ŷ = a·W_dec + b_dec  (+ x·W_skipᵀ for a skip transcoder)

with act = relu, or relu(pre)·1[pre > θ_i] for the JumpReLU variants (BatchTopK is exported as one, with
threshold = θ·1, as for SAEs). Unlike an SAE, b_dec lives in the output space and is never subtracted from the
input (SAELens refuses `apply_b_dec_to_input` for transcoders).

```
<transcoder dir>/
  cfg.json                  architecture (transcoder | skip_transcoder | jumprelu_transcoder |
                            jumprelu_skip_transcoder), d_in, d_sae, d_out, dtype, device,
                            apply_b_dec_to_input (false), normalize_activations ("none"), reshape_activations,
                            metadata {sae_lens_version, model_name, hook_name (input site), hook_name_out
                            (output site), hook_head_index, hook_head_index_out, ... our keys}
  sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out],
                            threshold [d_sae] (jumprelu_*), W_skip [d_out, d_in] (*skip_*)
```
These are SAELens' own field names (`TranscoderConfig.d_out`, `metadata.hook_name_out`, `SkipTranscoder.W_skip`),
so `sae_lens.SAE.load_from_disk(dir)` returns its Transcoder, SkipTranscoder, JumpReLUTranscoder or
JumpReLUSkipTranscoder with the same outputs as ours. Weights are in raw activation units: the dataset-level
scales of the input and of the target used in training are folded in on export (`fold_scales`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__, architectures
from .errors import SaeError
from .saedir import CFG_FILE, WEIGHTS_FILE, read_cfg_json, write_sae_files

ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
"""SAELens' transcoder architectures, all of which `load_transcoder` reads and `save_transcoder` writes."""

SAE_LENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens rebuilds configs without one (or older) as pre-6.0 ones,
which drops our metadata. It names the config format, not a tool run."""

_SAELENS_RESERVED = {"get", "keys", "values", "items", "to_dict", "from_dict"}
# SAELens turns every metadata key into an attribute of its SAEMetadata; these would shadow its methods.

_WRITTEN_DEFAULTS = {
    "sae_lens_version": SAE_LENS_FORMAT_VERSION,
    "sae_lens_training_version": None,
    "hook_head_index": None,
    "hook_head_index_out": None,
    "prepend_bos": True,
}
# Metadata every cfg.json of ours carries; reading drops them at these values, so a round trip is exact.


def transcoder_architecture(exports_as: str, *, skip: bool) -> str:
    """The SAELens transcoder architecture of a sparse architecture exported as `exports_as` (SAELens' SAE
    name: jumprelu for BatchTopK and JumpReLU, standard for ReLU), with or without a skip connection."""
    if exports_as == "jumprelu":
        return "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder"
    if exports_as == "standard":
        return "skip_transcoder" if skip else "transcoder"
    raise SaeError(
        f"an SAE exported as {exports_as!r} has no SAELens transcoder counterpart (SAELens has transcoder, "
        "skip_transcoder, jumprelu_transcoder and jumprelu_skip_transcoder); train the transcoder as batchtopk "
        "(exported as jumprelu_transcoder), jumprelu or relu"
    )


def is_transcoder_cfg(d: Any) -> bool:
    """Whether a parsed cfg.json describes a transcoder (any SAELens transcoder architecture)."""
    return isinstance(d, dict) and d.get("architecture") in ARCHITECTURES


# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class TranscoderConfig:
    """What cfg.json says about a transcoder. Fields SAELens knows are written where SAELens reads them; the
    rest go into cfg.json's `metadata`, which SAELens keeps but does not interpret."""

    architecture: str
    """SAELens architecture, one of `ARCHITECTURES`."""

    d_in: int
    """Input width (the input site's d_model)."""

    d_sae: int
    """Number of latents F."""

    d_out: int
    """Output width (the output site's d_model)."""

    k: float | None = None
    """BatchTopK-trained: mean latents per row, used by `Transcoder.encode_batch`."""

    dtype: str = "float32"
    """Dtype of the stored weights."""

    model_name: str | None = None
    """Model the transcoder reads (SAELens metadata.model_name)."""

    hook_name: str | None = None
    """Input site, a TransformerLens name such as `blocks.6.ln2.hook_normalized` (SAELens metadata.hook_name)."""

    hook_name_out: str | None = None
    """Output site whose activations it predicts, e.g. `blocks.6.hook_mlp_out` (SAELens metadata.hook_name_out)."""

    training_architecture: str | None = None
    """How it was trained: batchtopk, relu or jumprelu for ours; SAELens writes its own name here."""

    theta: float | None = None
    """BatchTopK: the global inference threshold θ, in pre-activation units (unchanged by export)."""

    input_scale: float | None = None
    """Dataset-level scale of the input used in training (x_train = c_in·x_raw); folded into the weights."""

    target_scale: float | None = None
    """Dataset-level scale of the target used in training (y_train = c_out·y_raw); folded into the weights."""

    complete: bool = False
    """Training finished: the trainer writes True only on its final save."""

    metadata: dict[str, Any] = field(default_factory=dict)
    """Every other metadata key, kept as it is (store, corpus, tokens_seen, ...; SAELens' own keys for
    SAELens-made directories)."""

    _META_FIELDS = (
        "model_name", "hook_name", "hook_name_out", "training_architecture", "theta", "input_scale",
        "target_scale", "complete",
    )  # fmt: skip

    @property
    def skip(self) -> bool:
        """Whether it has a skip connection W_skip."""
        return "skip" in self.architecture

    @property
    def jumprelu(self) -> bool:
        """Whether it has thresholds (the jumprelu_* architectures)."""
        return self.architecture.startswith("jumprelu")

    def to_dict(self) -> dict[str, Any]:
        """cfg.json content, loadable unchanged by `sae_lens.SAE.load_from_disk`."""
        if self.architecture not in ARCHITECTURES:
            raise SaeError(f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        bad = sorted(_SAELENS_RESERVED & set(self.metadata))
        if bad:
            raise SaeError(f"metadata key(s) {bad} would shadow SAELens' SAEMetadata methods; rename them")
        meta: dict[str, Any] = {**_WRITTEN_DEFAULTS, **self.metadata, "sae_pipeline_version": __version__}
        for name in self._META_FIELDS:
            meta[name] = getattr(self, name)
        if self.k is not None:
            meta["k"] = self.k
        out = {
            "architecture": self.architecture,
            "d_in": int(self.d_in),
            "d_sae": int(self.d_sae),
            "d_out": int(self.d_out),
            "dtype": self.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": meta,
        }
        return json.loads(json.dumps(out))  # fail here, not half-way through a write, on non-JSON values

    @classmethod
    def from_dict(cls, d: Any, where: str = "cfg.json") -> TranscoderConfig:
        """Read ours and SAELens' transcoder cfg.json (metadata keys nested, or flat as SAELens' pretrained
        loaders return them)."""
        if not isinstance(d, dict):
            raise SaeError(f"{where}: expected a JSON object")
        arch = d.get("architecture")
        if arch not in ARCHITECTURES:
            raise SaeError(
                f"{where}: architecture {arch!r} is not a transcoder; transcoders: {', '.join(ARCHITECTURES)}"
            )
        meta = d.get("metadata")
        meta = dict(meta) if isinstance(meta, dict) else {}
        for key in ("model_name", "hook_name", "hook_name_out", "context_size", "prepend_bos", "dataset_path"):
            if key in d and key not in meta:
                meta[key] = d[key]
        if d.get("apply_b_dec_to_input", False):
            raise SaeError(f"{where}: apply_b_dec_to_input is true; a transcoder's b_dec is in the output space")
        norm = d.get("normalize_activations", "none")
        if norm not in ("none", None, False, "expected_average_only_in"):
            raise SaeError(
                f"{where}: normalize_activations {norm!r} is not supported (only 'none'); fold the "
                "normalization into the weights first"
            )
        if d.get("reshape_activations", "none") not in ("none", None):
            raise SaeError(f"{where}: reshape_activations {d['reshape_activations']!r} is not supported")
        for key in ("d_in", "d_sae", "d_out"):
            v = d.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SaeError(f"{where}: {key} must be a positive integer, got {v!r}")
        k = d.get("k", meta.get("k"))
        if k is not None and (not isinstance(k, (int, float)) or isinstance(k, bool) or k <= 0):
            raise SaeError(f"{where}: k must be a positive number, got {k!r}")
        known = {name: meta.pop(name) for name in cls._META_FIELDS if name in meta}
        known = {name: v for name, v in known.items() if v is not None}
        for name in ("k", "sae_pipeline_version"):
            meta.pop(name, None)
        for name, default in _WRITTEN_DEFAULTS.items():
            if name in meta and meta[name] == default:
                del meta[name]
        for name in ("theta", "input_scale", "target_scale"):
            if name in known and (not isinstance(known[name], (int, float)) or isinstance(known[name], bool)):
                raise SaeError(f"{where}: metadata.{name} must be a number, got {known[name]!r}")
        return cls(
            architecture=arch,
            d_in=d["d_in"],
            d_sae=d["d_sae"],
            d_out=d["d_out"],
            k=k,
            dtype=str(d.get("dtype") or "float32").removeprefix("torch."),
            metadata=meta,
            **known,
        )

    def replace(self, **changes: Any) -> TranscoderConfig:
        """A copy with `changes` applied (metadata copied, not shared)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["metadata"] = dict(self.metadata)
        values.update(changes)
        return TranscoderConfig(**values)


def weight_shapes(cfg: TranscoderConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the weights file and its shape, for `cfg`."""
    d, f, o = cfg.d_in, cfg.d_sae, cfg.d_out
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d, f), "b_enc": (f,), "W_dec": (f, o), "b_dec": (o,)}
    if cfg.jumprelu:
        shapes["threshold"] = (f,)
    if cfg.skip:
        shapes["W_skip"] = (o, d)
    return shapes


def check_weights(w: dict[str, Any], cfg: TranscoderConfig, where: str) -> None:
    """SaeError unless `w` holds exactly the floating-point tensors of `weight_shapes(cfg)`."""
    shapes = weight_shapes(cfg)
    missing = [k for k in shapes if k not in w]
    if missing:
        raise SaeError(f"{where}: missing tensor(s) {', '.join(missing)} for a {cfg.architecture}")
    extra = sorted(set(w) - set(shapes))
    if extra:
        raise SaeError(f"{where}: unexpected tensor(s) {', '.join(extra)} for a {cfg.architecture}")
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


def fold_scales(w: dict[str, Tensor], *, input_scale: float, target_scale: float) -> dict[str, Tensor]:
    """Weights trained on scaled data (x_t = c_in·x, y_t = c_out·y) → the same transcoder in raw units.

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


# --------------------------------------------------------------------------------------------------
# The inference module


class Transcoder(nn.Module):
    """A transcoder in raw activation units: x [..., d_in] → a = encode(x) [..., d_sae] → ŷ [..., d_out].

    Parameters are named and laid out as SAELens' (`weight_shapes`), so `state_dict()` is a valid
    sae_weights.safetensors.
    """

    def __init__(
        self, cfg: TranscoderConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        if cfg.architecture not in ARCHITECTURES:
            raise SaeError(f"architecture {cfg.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        self.cfg = cfg
        for name, shape in weight_shapes(cfg).items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations x·W_enc + b_enc, [..., d_sae] (no input centring, as SAELens' transcoders)."""
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def _activate(self, pre: Tensor) -> Tensor:
        if self.cfg.jumprelu:
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations at inference: relu(pre)·1[pre > θ] (jumprelu_*, BatchTopK) or relu(pre)."""
        return self._activate(self.pre_acts(x))

    @property
    def batch_topk(self) -> bool:
        """Whether `encode_batch` selects over the batch (a jumprelu transcoder with a known k whose training
        architecture has a batch mode, `sae.architectures`)."""
        batch = architectures.batch_mode(self.cfg.training_architecture)
        return self.cfg.jumprelu and self.cfg.k is not None and batch

    def encode_batch(self, x: Tensor) -> Tensor:
        """BatchTopK: keep the round(k·N) largest entries of relu(pre) over all N rows of `x`; others: `encode`."""
        if not self.batch_topk:
            return self.encode(x)
        from .saedir import batch_topk_indices

        pre = self.pre_acts(x)
        n_rows = pre.numel() // pre.shape[-1]
        idx = batch_topk_indices(pre, round(float(self.cfg.k) * n_rows))
        out = torch.zeros_like(pre)
        out.view(-1)[idx] = pre.reshape(-1)[idx]
        return out

    def decode(self, a: Tensor, x: Tensor | None = None) -> Tensor:
        """Prediction a·W_dec + b_dec, plus the skip connection x·W_skipᵀ when it has one (then `x` is needed)."""
        y = a.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.cfg.skip:
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


def save_transcoder(
    t_or_weights: Transcoder | dict[str, Tensor], cfg: TranscoderConfig | None, path: str | os.PathLike
) -> Path:
    """Write a transcoder directory at `path` atomically (`sae.saedir.write_sae_files`: the old directory or the
    new one, never a mix; other files carried over); return `path`. Tensors are stored contiguous, on CPU, in
    `cfg.dtype`."""
    if cfg is None:
        if not isinstance(t_or_weights, Transcoder):
            raise TypeError("save_transcoder needs a cfg when given a dict of weights")
        cfg = t_or_weights.cfg
    if isinstance(t_or_weights, Transcoder):
        weights = {k: v.detach() for k, v in t_or_weights.state_dict().items()}
    else:
        weights = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in t_or_weights.items()}
    check_weights(weights, cfg, str(path))
    dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SaeError(f"{path}: dtype {cfg.dtype!r} is not a torch dtype name such as float32")
    tensors = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in weights.items()}
    return write_sae_files(path, tensors, cfg.to_dict())


def is_transcoder_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a cfg.json naming a transcoder architecture (SaeError if cfg.json is unreadable)."""
    return is_transcoder_cfg(read_cfg_json(path))


def read_transcoder_cfg(path: str | os.PathLike) -> TranscoderConfig:
    """The TranscoderConfig of the transcoder directory `path` (cfg.json only)."""
    path = Path(path)
    return TranscoderConfig.from_dict(read_cfg_json(path), where=str(path / CFG_FILE))


def load_transcoder(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
) -> Transcoder:
    """Load a transcoder directory, ours or one SAELens wrote (older `log_threshold` converted). SaeError on a
    missing or corrupt cfg.json / sae_weights.safetensors, or tensors that do not fit its widths."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg = read_transcoder_cfg(path)
    wf = path / WEIGHTS_FILE
    if not wf.is_file():
        raise SaeError(f"{path} is not a complete transcoder directory: {WEIGHTS_FILE} is missing")
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
    if cfg.jumprelu and "threshold" not in w and "log_threshold" in w:
        w["threshold"] = w.pop("log_threshold").exp()
    check_weights(w, cfg, str(wf))
    t = Transcoder(cfg, device="meta", dtype=dtype)
    t.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in w.items()}, assign=True)
    return t


__all__ = [
    "ARCHITECTURES",
    "CFG_FILE",
    "Transcoder",
    "TranscoderConfig",
    "WEIGHTS_FILE",
    "check_weights",
    "fold_scales",
    "is_transcoder_cfg",
    "is_transcoder_dir",
    "load_transcoder",
    "read_transcoder_cfg",
    "save_transcoder",
    "transcoder_architecture",
    "weight_shapes",
]
