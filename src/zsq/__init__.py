"""zsq: zero-shot (data-free) quantization for any PyTorch classifier."""

from zsq.errors import ZsqError

__version__ = "0.1.0"


def __getattr__(name: str):
    """Import the API lazily so ``import zsq`` stays cheap (the CLI imports what it needs)."""
    if name == "zero_shot_quantize":
        from zsq.api import zero_shot_quantize

        return zero_shot_quantize
    raise AttributeError(f"module 'zsq' has no attribute {name!r}")


__all__ = ["ZsqError", "__version__", "zero_shot_quantize"]
