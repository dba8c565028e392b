"""`sae train`: train BatchTopK (and TopK / ReLU-L1 / JumpReLU) SAEs from a store's shuffled chunks."""

from .trainer import train

__all__ = ["train"]
