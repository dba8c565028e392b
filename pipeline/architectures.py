"""The one table of training architectures: what the trainer, the SAE directory, eval and the CLI know about each.

Pure data, importable by every stage (`sae.architectures`). The code of an architecture lives in its module
under train/archs/, which registers its class under the same name; nothing outside those modules and this
table branches on an architecture's name. Adding one: a module in train/archs/, an entry here, its tests (and,
when it has settings of its own, their fields in TrainConfig, the one config schema behind flags and manifests).
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import SaeError


class Architecture(NamedTuple):
    """Facts about one training architecture."""

    name: str
    """`--arch` value and the `training_architecture` written into cfg.json."""
    exports_as: str
    """SAELens architecture of the exported SAE (jumprelu, topk or standard)."""
    sweep: str | None
    """The TrainConfig field swept per SAE (`k` or `l0_coeff`; also a SweepPoint field), or None."""
    sweep_tag: str
    """Directory-name tag of a sweep value, a format string: `-k{:g}` makes `batchtopk-k32-x8`."""
    has_theta: bool
    """Learns BatchTopK's global inference threshold θ (an EMA, exported as threshold = θ·1)."""
    batch_mode: bool
    """The exported SAE can also encode by batch top-k (k·N largest over a batch): eval's `--mode batch`."""
    fields: tuple[str, ...]
    """TrainConfig fields it reads, beyond those every architecture reads."""
    summary: str
    """One line for docs and help."""


TABLE = (
    Architecture(
        "batchtopk", "jumprelu", "k", "-k{:g}", True, True, ("k", "k_aux", "aux_alpha"),
        "k·B largest of relu(pre) over the batch; FVU + α·AuxK; inference threshold θ",
    ),
    Architecture(
        "topk", "topk", "k", "-k{:g}", False, False, ("k", "k_aux", "aux_alpha"),
        "k largest of relu(pre) per row; FVU + α·AuxK",
    ),
    Architecture(
        "relu", "standard", None, "", False, False, ("l1_coeff", "l1_warmup_fraction"),
        "relu(pre); MSE + λ·Σ a_i‖W_dec,i‖ with free decoder norms (Anthropic, April 2024)",
    ),
    Architecture(
        "jumprelu", "jumprelu", "l0_coeff", "-l0c{:g}", False, False,
        ("l0_coeff", "jumprelu_bandwidth", "jumprelu_init_threshold", "jumprelu_lr_scale"),
        "pre·H(pre − θ_i), per-latent θ trained by a straight-through estimator; MSE + λ·L0",
    ),
    Architecture(
        "matryoshka", "jumprelu", "k", "-k{:g}", True, True, ("k", "k_aux", "aux_alpha", "matryoshka_widths"),
        "BatchTopK whose nested dictionary prefixes each reconstruct x (Bussmann et al. 2025)",
    ),
)  # fmt: skip

ARCHS: dict[str, Architecture] = {a.name: a for a in TABLE}
"""Every training architecture by name, in the order of `TABLE`."""

NAMES: tuple[str, ...] = tuple(ARCHS)
"""Their names (the choices of `--arch`)."""


def get(name: str) -> Architecture:
    """The entry of `name`; SaeError naming the choices when there is none."""
    try:
        return ARCHS[name]
    except KeyError:
        raise SaeError(f"architecture {name!r} is not one of {', '.join(NAMES)}") from None


__all__ = ["ARCHS", "Architecture", "NAMES", "TABLE", "get"]
