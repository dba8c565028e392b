"""Temporary: the trainer imports from here until it moves to sae.train.archs (removed after the split merge)."""

from .archs.base import TrainingSae

__all__ = ["TrainingSae"]
