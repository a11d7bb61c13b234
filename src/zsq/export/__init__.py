"""Export of a quantized student: integer tensors with a manifest, ONNX Q/DQ, sizes.

from zsq.export import export_int, load_int, export_onnx, size_report
from zsq.run.export import export_run  # what `zsq export` does: a finished run's student
"""

from zsq.export.integer import export_int, integer_conv2d, integer_linear, load_int, read_manifest
from zsq.export.packing import pack_codes, unpack_codes
from zsq.export.sizes import size_report, size_table


def export_onnx(*args, **kwargs):
    """See :func:`zsq.export.onnx.export_onnx` (imported on use: it needs the onnx extra)."""
    from zsq.export.onnx import export_onnx as _export

    return _export(*args, **kwargs)


__all__ = [
    "export_int",
    "export_onnx",
    "integer_conv2d",
    "integer_linear",
    "load_int",
    "pack_codes",
    "read_manifest",
    "size_report",
    "size_table",
    "unpack_codes",
]
