"""Quantization methods: one module each (a typed config and its handler), one registry.

    import zsq
    zsq.quantize(teacher, zsq.GDFQ(ait=True, recipe="short"), image_shape=(3, 32, 32),
                 num_classes=10)

The built-in methods register here, in the order the CLI and the docs list them.
"""

from zsq.methods.base import (
    Context,
    Method,
    MethodConfig,
    MethodHandler,
    Outcome,
    get_method,
    method_names,
    method_of,
    register_method,
    unregister_method,
)
from zsq.methods.calibration import Calibrated
from zsq.methods.distillation import Distillation, DistillationHandler

# Each module registers its method on import: this order is the CLI's and the docs'.
# isort: off
from zsq.methods.minmax import MinMax
from zsq.methods.zeroq import ZeroQ
from zsq.methods.lapq import LAPQ
from zsq.methods.genie import Genie
from zsq.methods.gdfq import GDFQ
from zsq.methods.qimera import Qimera
from zsq.methods.arc import ARC
from zsq.methods.psaq import PSAQ
from zsq.methods.mimiq import MimiQ
# isort: on

__all__ = [
    "ARC",
    "Calibrated",
    "Context",
    "Distillation",
    "DistillationHandler",
    "GDFQ",
    "Genie",
    "LAPQ",
    "Method",
    "MethodConfig",
    "MethodHandler",
    "MimiQ",
    "MinMax",
    "Outcome",
    "PSAQ",
    "Qimera",
    "ZeroQ",
    "get_method",
    "method_names",
    "method_of",
    "register_method",
    "unregister_method",
]
