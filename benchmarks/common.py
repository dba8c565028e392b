"""Shared by the benchmark scripts: a one-line description of the machine and writing one section of a doc."""

from __future__ import annotations

import contextlib
import os
import platform
import re
from pathlib import Path

import torch


def machine() -> str:
    """CPU model, core count, GPU (if any), torch version and thread count."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU ({cpu}), {gpu}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def write_section(doc: Path, heading: str, section: str, title: str = "Benchmarks") -> None:
    """Replace the `## heading` section of `doc` by `section` (which starts with that heading), or append it."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else f"# {title}\n\nEach section is written by the script it names.\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    doc.write_text(text.rstrip() + "\n")
