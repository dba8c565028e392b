"""The run's length and schedules (lr warm-up and decay, dead-latent window, θ EMA, checkpoints), derived from
the config and the store's size so that the defaults scale with the run."""

from __future__ import annotations

import math
from typing import NamedTuple

from sae.config import TrainConfig
from sae.errors import SaeError

MIN_STEPS = 64
"""Optimizer steps below which an SAE is not worth having (the lr warm-up, the θ EMA and the dead-latent window
all need room): a run without --tokens makes more passes over a small store to reach it, and a shorter run is
warned about with the fix."""

MAX_DEFAULT_PASSES = 10
"""At most this many passes over the store for a run without --tokens (more would mostly memorise it)."""


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
    tokens = cfg.tokens if cfg.tokens is not None else default_passes(train_rows, b) * train_rows
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


def default_passes(train_rows: int, batch_size: int) -> int:
    """Passes over the store's training rows of a run without --tokens: one, or enough for MIN_STEPS steps
    (at most MAX_DEFAULT_PASSES)."""
    return min(MAX_DEFAULT_PASSES, max(1, math.ceil(MIN_STEPS * batch_size / max(1, train_rows))))


def short_run_warning(plan: Plan, train_rows: int, tokens_given: bool) -> str | None:
    """A line saying the run is too short to train a useful SAE and how to lengthen it; None when it is not."""
    if plan.steps >= MIN_STEPS:
        return None
    passes = plan.tokens / max(1, train_rows)
    return (
        f"warning: only {plan.steps} optimizer steps ({plan.tokens:,} tokens = {passes:.3g} passes over the store's "
        f"{train_rows:,} training rows at --batch-size {plan.batch_size}); an SAE needs at least {MIN_STEPS} to "
        "train usefully. Use a smaller --batch-size"
        + (", more --tokens" if tokens_given else "")
        + " or a larger store (sae harvest --max-tokens)"
    )


def default_lr(d_sae: int) -> float:
    """2e-4 / √(F / 2¹⁴): the learning-rate scaling of Gao et al. (2024), "Scaling and evaluating sparse
    autoencoders"."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


__all__ = ["MAX_DEFAULT_PASSES", "MIN_STEPS", "Plan", "default_lr", "default_passes", "make_plan", "short_run_warning"]
