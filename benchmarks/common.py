"""Shared by the benchmark scripts: a one-line description of the machine, writing one section of a doc, and
loading modules as of another git revision (to time old code against new in one process)."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import sys
import types
from collections.abc import Sequence
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


ROOT = Path(__file__).resolve().parents[1]
"""The repository the benchmarks run from."""


def modules_at(rev: str, names: Sequence[str]) -> dict[str, types.ModuleType]:
    """Modules `names` (e.g. `sae.harvest.loop`) as of git revision `rev`: their source from git, executed as fresh
    modules that import each other (and the working tree's copy of everything else). The working tree's modules
    are back in place afterwards, so both versions can be timed side by side in one process."""
    saved = {name: sys.modules[name] for name in names}
    loaded: dict[str, types.ModuleType] = {}
    try:
        for name in names:
            rel = Path(saved[name].__file__).resolve().relative_to(ROOT).as_posix()
            source = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, text=True, check=True
            ).stdout
            module = types.ModuleType(name)
            module.__file__ = f"{rev}:{rel}"
            module.__package__ = name.rpartition(".")[0]
            # `from sae.sites import ...` reads sys.modules, `from sae import store` the package attribute.
            sys.modules[name] = module
            setattr(sys.modules[module.__package__], name.rpartition(".")[2], module)
            exec(compile(source, module.__file__, "exec"), module.__dict__)
            loaded[name] = module
    finally:
        for name, module in saved.items():
            sys.modules[name] = module
            setattr(sys.modules[name.rpartition(".")[0]], name.rpartition(".")[2], module)
    return loaded
