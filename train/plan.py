"""The run's length and schedules (lr warm-up and decay, dead-latent window, θ EMA, checkpoints), derived from
the config and the store's size so that the defaults scale with the run."""

from __future__ import annotations

import math
from typing import NamedTuple

from sae.config import TrainConfig
from sae.errors import SaeError


class Plan(NamedTuple):
    """The run's length and the schedules derived from it (defaults scale with the run)."""

    steps: int
    """Optimizer steps."""
    batch_size: int
    """Rows per step."""
    warmup_steps: int
    """Linear lr warm-up: min(1000, 5% of the steps) by default."""
    decay_steps: int
    """Linear lr decay to 0 over the last steps: `decay_fraction` of the run."""
    dead_tokens: int
    """A latent is dead after this many tokens without firing: min(10M, 10% of the run) by default."""
    theta_start: int
    """First step of the θ EMA: min(1000, 10% of the steps) by default."""
    theta_decay: float
    """Per-step decay of the θ EMA: min(0.99, 1 − 1/(10% of the steps)) by default."""
    checkpoint_steps: int
    """Steps between checkpoints: 10 per run by default."""
    input_scale: float
    """c with E‖c·x‖ = √d over the training rows' BOS handling."""

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base lr at `step` (0-based): warm-up ramp, plateau, linear decay to 0."""
        f = 1.0
        if self.warmup_steps and step < self.warmup_steps:
            f = (step + 1) / self.warmup_steps
        if self.decay_steps and step >= self.steps - self.decay_steps:
            f = min(f, (self.steps - step) / self.decay_steps)
        return f


def make_plan(cfg: TrainConfig, train_rows: int, input_scale: float) -> Plan:
    """Resolve the run length and the scaled defaults of `cfg`."""
    b = cfg.batch_size
    tokens = cfg.tokens if cfg.tokens is not None else train_rows
    steps = tokens // b
    if steps < 1:
        raise SaeError(
            f"--tokens {tokens} is less than one batch of --batch-size {b} (the store's training rows: {train_rows})"
        )
    if cfg.log_every < 1:
        raise SaeError(f"--log-every must be at least 1, got {cfg.log_every}")
    if not 0 <= cfg.decay_fraction <= 1:
        raise SaeError(f"--decay-fraction must lie in [0, 1], got {cfg.decay_fraction}")
    every = cfg.checkpoint_every if cfg.checkpoint_every is not None else steps * b // 10
    return Plan(
        steps=steps,
        batch_size=b,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, steps // 20),
        decay_steps=int(cfg.decay_fraction * steps),
        dead_tokens=max(b, cfg.dead_tokens if cfg.dead_tokens is not None else min(10_000_000, steps * b // 10)),
        theta_start=cfg.theta_warmup_steps if cfg.theta_warmup_steps is not None else min(1000, steps // 10),
        theta_decay=cfg.theta_ema if cfg.theta_ema is not None else min(0.99, 1 - 1 / max(1.0, steps / 10)),
        checkpoint_steps=max(1, every // b),
        input_scale=input_scale,
    )


def default_lr(d_sae: int) -> float:
    """2e-4 / √(F / 2¹⁴) (the BatchTopK paper's scaling rule)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


__all__ = ["Plan", "default_lr", "make_plan"]
