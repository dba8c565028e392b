"""Shared by the benchmark scripts: a one-line description of the machine, writing one section of a doc, and the
host's share of a GPU reader measured on the CPU."""

from __future__ import annotations

import contextlib
import os
import platform
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae.train.reader import ChunkReader


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


class DeviceArenaHost(ChunkReader):
    """The host's share of a GPU reader, run on the CPU: chunks decoded (or copied, if raw) into staging and batches
    planned. The copy to the device arena (a DMA, which costs the host no cycles) and the gather there (the GPU's
    work) are left out: a batch is the arena rows it would gather."""

    _device_arena, _host_float32 = True, False

    def _upload(self, dest: torch.Tensor, stage: torch.Tensor, done: Any) -> None:
        pass  # a GPU's DMA engine makes this copy: no host cycles (and the arena is never gathered from here)

    def _to_device(self, part: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if any(plan.at is None for plan, _, _ in part):
            raise RuntimeError("a chunk fell outside the arena: this timing would leave out its gather")
        at = np.concatenate([plan.at[a:b] for plan, a, b in part])
        return torch.from_numpy(at), torch.from_numpy(np.concatenate([plan.rows[a:b] for plan, a, b in part]))
