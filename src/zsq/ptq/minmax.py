"""The min/max post-training baseline: weight ranges from the weights, activation ranges observed.

Activation ranges are observed on calibration batches: Gaussian noise in the teacher's input space
by default (data-free), or real images when the caller passes them (then not zero-shot).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from zsq.quant import QuantSpec, quantize_model, set_act_observer, set_observing


def gaussian_batches(
    n: int, image_shape: tuple[int, int, int], batch_size: int = 128, seed: int = 0
) -> Iterator[Tensor]:
    """``n`` images of N(0, 1) noise (the teacher's normalised input space), in batches."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        yield torch.randn(min(batch_size, n - start), *image_shape, generator=gen)


@torch.no_grad()
def calibrate_activations(
    student: nn.Module,
    batches: Iterable[Tensor],
    *,
    observer: str = "minmax",
    device: torch.device | str = "cpu",
) -> int:
    """Observe activation ranges on ``batches`` then freeze them. Returns images seen."""
    student.eval()
    set_act_observer(student, observer)
    set_observing(student, True)
    seen = 0
    for x in batches:
        student(x.to(device))
        seen += len(x)
    set_observing(student, False)
    return seen


def minmax_quantize(
    teacher: nn.Module,
    spec: QuantSpec,
    calibration: Iterable[Tensor],
    *,
    observer: str = "minmax",
    device: torch.device | str = "cpu",
    image_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Fake-quantized copy of ``teacher`` with min/max weight ranges and calibrated activations
    (``image_shape``: what ``teacher`` takes, for the ``auto`` placement of an unresolved
    ``spec``)."""
    student = quantize_model(teacher, spec, image_shape).to(device)
    calibrate_activations(student, calibration, observer=observer, device=device)
    return student
