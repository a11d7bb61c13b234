"""zsq: zero-shot (data-free) quantization for any PyTorch classifier."""

from zsq.errors import ZsqError

__version__ = "0.1.0"
__all__ = ["ZsqError", "__version__"]
