"""sae: harvest language-model activations, train BatchTopK sparse autoencoders, evaluate them spliced in."""

__version__ = "0.1.0"

from .errors import SaeError  # noqa: E402

__all__ = ["SaeError", "__version__"]
