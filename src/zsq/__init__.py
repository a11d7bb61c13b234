"""zsq: zero-shot (data-free) quantization for any PyTorch classifier.

    import zsq
    result = zsq.quantize(teacher, zsq.GDFQ(ait=True, recipe="short"),
                          image_shape=(3, 32, 32), num_classes=10, work_dir="runs/ait")

One function runs every method; a method is chosen by its config (``zsq.MinMax()``,
``zsq.ZeroQ()``, ``zsq.LAPQ()``, ``zsq.Genie()``, ``zsq.GDFQ()``, ``zsq.Qimera()``,
``zsq.ARC()``, ``zsq.PSAQ()``, ``zsq.MimiQ()``). The names below are imported on first use,
so ``import zsq`` stays cheap.
"""

from zsq._version import __version__
from zsq.errors import ConfigError, ZsqError

_LAZY = {
    "quantize": "zsq.run.quantize",
    "QuantizeResult": "zsq.run.quantize",
    "QuantSpec": "zsq.quant",
    "MixedConfig": "zsq.mixed",
    "ModelMeta": "zsq.models",
    "export_run": "zsq.run.export",
    "MinMax": "zsq.methods",
    "ZeroQ": "zsq.methods",
    "LAPQ": "zsq.methods",
    "Genie": "zsq.methods",
    "GDFQ": "zsq.methods",
    "Qimera": "zsq.methods",
    "ARC": "zsq.methods",
    "PSAQ": "zsq.methods",
    "MimiQ": "zsq.methods",
    "method_names": "zsq.methods",
    "register_method": "zsq.methods",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zsq' has no attribute {name!r}")


__all__ = ["ConfigError", "ZsqError", "__version__", *_LAZY]
