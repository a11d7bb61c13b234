"""A student fit to export: every tensor and every scale the export derives is finite."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from zsq.errors import ZsqError
from zsq.quant import act_quantizers, quant_layers


def check_finite(student: nn.Module) -> None:
    """Refuse a student with NaN or inf in a tensor or a scale (a diverged run): its codes would
    be garbage, and the ONNX exporter fails deep inside on them."""
    for name, tensor in _exported_tensors(student):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ZsqError(
                f"the student's {name} holds NaN or inf values (the run diverged); quantize "
                "again (e.g. a lower learning rate or a different seed), then export"
            )


@torch.no_grad()
def _exported_tensors(student: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The student's tensors in module order, then the scales the export derives from them."""
    yield from student.state_dict().items()
    for name, layer in quant_layers(student):
        if layer.wbits is not None:
            yield f"{name} weight scale", layer.weight_qparams()[0]
    for name, aq in act_quantizers(student):
        if aq.bits is not None:
            yield f"{name} activation scale", aq.qparams()[0]
