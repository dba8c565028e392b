"""Which torch device a `--device` value means. Kept apart from sae.models so that stages which need no
model (training) do not pay for importing transformers."""

from __future__ import annotations

import torch

from .errors import SaeError


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` → CUDA when available, else CPU; otherwise a torch device name, checked to exist here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SaeError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SaeError(f"device {device!r} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SaeError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev
