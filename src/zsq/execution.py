"""How a run computes, as opposed to what it computes: float precision and ``torch.compile``.

These options change speed (and, for tf32/bf16, the last bits of results) but not the method, so
they are not part of a recipe and a checkpoint resumes under any of them.

Precision:
- ``fp32``: true float32 everywhere (TF32 off for cuDNN convolutions and matmuls, although
  PyTorch's own default allows it for convolutions).
- ``tf32``: TF32 tensor cores for convolutions and matmuls (Ampere and newer GPUs; no effect on
  CPU).
- ``bf16``: tf32, plus bfloat16 autocast for the full-precision side of the loop (teacher and
  generator forwards). The student's fake quantization always runs in float32: rounding
  ``S * x - z`` in bfloat16 (8 mantissa bits) would move codes across rounding thresholds.

Compile: ``torch.compile`` mode (``default``, ``reduce-overhead`` = CUDA graphs,
``max-autotune``) applied in place to the teacher, the student and the source's generator, and to
gradient inundation's kappa search. Under CUDA graphs a compiled call's outputs live in memory the
next replay overwrites: the loop marks each iteration's start (:meth:`Execution.begin_step`), so
outputs stay valid through their iteration, and what is kept longer is cloned.

CPU memory: ``tune_cpu_allocator`` (called by the CLI) keeps freed tensor memory for reuse, which
speeds CPU runs up without changing a bit of their results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zsq.errors import ZsqError

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported inside the functions: the CLI reads the option names below to build its
# parser, and `zsq --help` should not pay for importing torch.

PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
COMPILE_FLAGS = ("off", *COMPILE_MODES)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class Execution:
    """Precision and compile mode of a training run (see the module docstring)."""

    precision: str = "fp32"
    compile: str | None = None

    @classmethod
    def from_flags(cls, precision: str = "fp32", compile: str = "off") -> Execution:
        """From the CLI's ``--precision`` and ``--compile`` (where ``off`` means eager)."""
        return cls(precision, None if compile == "off" else compile)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ZsqError(f"unknown precision {self.precision!r}; use one of {PRECISIONS}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ZsqError(
                f"unknown compile mode {self.compile!r}; use one of {COMPILE_MODES} or none"
            )

    def begin_step(self) -> None:
        """Mark the start of a loop iteration (or of a measurement between iterations) for
        CUDA graphs: outputs of the previous iteration's compiled calls may be overwritten from
        here on, those of this iteration's calls stay valid until the next mark. Without the
        marks, torch starts a new graph generation at almost every compiled call, and a tensor
        from the generator would be overwritten by the teacher's replay before the student
        reads it. A no-op unless the compile mode uses CUDA graphs."""
        if self.compile in CUDA_GRAPH_MODES:
            import torch

            torch.compiler.cudagraph_mark_step_begin()

    def inert_note(self, device: torch.device) -> str | None:
        """Why this setting changes nothing on ``device`` (tf32 off CUDA), for the log, or None."""
        if self.precision == "tf32" and device.type != "cuda":
            return (
                f"precision tf32 has no effect on {device.type} (TF32 is a CUDA tensor-core "
                "mode): the run computes in plain float32, as fp32 does"
            )
        return None

    @contextlib.contextmanager
    def tensor_core_scope(self) -> Iterator[None]:
        """TF32 on (tf32, bf16) or off (fp32) for cuDNN and CUDA matmuls; restored on exit."""
        import torch

        allow = self.precision != "fp32"
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = allow
        torch.backends.cuda.matmul.allow_tf32 = allow
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bfloat16 autocast for full-precision forwards when precision is bf16, else a no-op."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device.type, dtype=torch.bfloat16)


def compile_in_place(modules: Iterable[nn.Module], mode: str) -> list[nn.Module]:
    """``module.compile()`` each module (state_dict keys unchanged); returns them for
    :func:`release_compiled`."""
    _allow_recompiles()
    compiled = []
    for module in modules:
        module.compile(mode=None if mode == "default" else mode, dynamic=False)
        compiled.append(module)
    return compiled


def release_compiled(modules: Iterable[nn.Module]) -> None:
    """Give modules compiled by :func:`compile_in_place` back their eager forward, so a model
    handed back to the user behaves like the one they passed in."""
    for module in modules:
        module._compiled_call_impl = None  # what nn.Module.compile sets; None means eager


def compiled_function(fn, mode: str | None = None):
    """``torch.compile`` for a function specialised per input shape (one version per shape)."""
    import torch

    _allow_recompiles()
    return torch.compile(fn, mode=None if mode in (None, "default") else mode, dynamic=False)


def _allow_recompiles(limit: int = 64) -> None:
    """Each layer shape, and the observing/frozen switch, is its own specialisation; the default
    limit (8) would silently fall back to eager on deeper networks."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


# glibc's mallopt parameters (malloc.h) and the values zsq sets: blocks up to 32 MiB (the largest
# threshold glibc accepts) come from the heap, and up to 1 GiB of freed heap is kept for reuse.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 * 2**20
_TRIM_THRESHOLD_BYTES = 2**30
ALLOCATOR_OPT_OUT = "ZSQ_CPU_ALLOCATOR"


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the OS.

    With glibc's defaults, a CPU training step's large temporaries (a batch of activations is
    tens of MB) are mmapped or trimmed when freed and page-faulted in again at the next step:
    a GDFQ+AIT ResNet-20 step at batch 200 took 2.48 s instead of 1.9-2.0 s on the 2-core
    machine (docs/results.md). Results are unchanged; only where freed memory goes. Applies
    to glibc Linux only, and not when ``ZSQ_CPU_ALLOCATOR=system`` or any of glibc's own
    ``MALLOC_*_`` variables is set (the user's choice stands). Returns whether it applied.
    The CLI calls it; programs using the Python API may call it once at start-up.
    """
    import ctypes
    import os
    import platform

    if os.environ.get(ALLOCATOR_OPT_OUT, "").lower() == "system":
        return False
    if any(key.startswith("MALLOC_") and key.endswith("_") for key in os.environ):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    applied = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    applied &= libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    return bool(applied)
