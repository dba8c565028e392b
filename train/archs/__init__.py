"""The training architectures, one module each on the shared base (`base.TrainingSae`).

Importing this package imports every module in it; each architecture class registers itself in `REGISTRY`
under its `sae.architectures` name, so a new architecture is a new module plus its table entry.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch

from sae import architectures

from .base import DECODERS, REGISTRY, SaeOutput, TrainingSae, estimate_input_scale, geometric_median, point_size

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

_missing = [n for n in architectures.NAMES if n not in REGISTRY]
if _missing:
    raise ImportError(f"architectures without a module in sae.train.archs: {', '.join(_missing)}")


def sae_class(arch: str) -> type[TrainingSae]:
    """The training class of architecture `arch` (SaeError naming the choices for an unknown one)."""
    architectures.get(arch)
    return REGISTRY[arch]


def make_sae(arch: str, d_in: int, d_sae: int, **kw: Any) -> TrainingSae:
    """An SAE of architecture `arch`; `kw` are the base's and the architecture's constructor arguments."""
    return sae_class(arch)(d_in, d_sae, **kw)


def from_config(
    cfg: Any,
    point: Any,
    d_in: int,
    *,
    variance: float,
    device: str | torch.device | None = None,
    d_out: int | None = None,
) -> TrainingSae:
    """The SAE of sweep point `point` (sae.saedir.SweepPoint) of TrainConfig `cfg`; `variance` is σ² of the
    scaled training rows, a transcoder's (`d_out` given) of its scaled targets (see `TrainingSae.variance`)."""
    cls = sae_class(point.arch)
    return cls(
        d_in,
        point_size(point, d_in),
        variance=variance,
        d_out=d_out,
        skip=bool(getattr(cfg, "skip", False)) and d_out is not None,
        k_aux=cfg.k_aux,
        aux_alpha=cfg.aux_alpha,
        decoder=cfg.decoder,
        device=device,
        seed=cfg.seed,
        **cls.options(cfg, point),
    )


def check_config(cfg: Any, points: list[Any], d_in: int, d_out: int | None = None) -> None:
    """Let each point's architecture validate its settings (as a transcoder's when `d_out` is given), before a
    run writes anything: SaeError from building it on the meta device (no memory, no initialisation)."""
    for p in points:
        from_config(cfg, p, d_in, variance=1.0, device="meta", d_out=d_out)


ARCHS = architectures.NAMES
"""Training architectures (names)."""

__all__ = [
    "ARCHS",
    "DECODERS",
    "REGISTRY",
    "SaeOutput",
    "TrainingSae",
    "check_config",
    "estimate_input_scale",
    "from_config",
    "geometric_median",
    "make_sae",
    "sae_class",
]
