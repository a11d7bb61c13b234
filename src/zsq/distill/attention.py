"""MimiQ's head-wise structural attention distillation.

Each head's attention maps in the quantized student are pulled towards the full-precision
teacher's: for every layer, head and spatial query patch, the query's weights over the spatial
keys form a map on the patch grid, and student and teacher maps are compared by SSIM (the same
window and scale-free data range as MimiQ's head alignment, :mod:`zsq.synth.vit_losses`; the
range is the teacher's largest weight for that head and query). The loss is ``1 - SSIM``
averaged over images, queries and heads, then over layers; 0 when student and teacher agree.
The paper weights it 10 against the output KL (``../shared/REFERENCE.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from zsq.synth.vit_losses import spatial_maps, ssim_maps


def structural_attention_loss(
    student: Mapping[str, Tensor],
    teacher: Mapping[str, Tensor],
    num_prefix_tokens: int | None = None,
    grid: Sequence[int] | None = None,
) -> Tensor:
    """Mean over the teacher's layers of mean ``1 - SSIM(student head map, teacher head map)``.

    ``student``/``teacher``: attention maps (B, heads, N, N) by module name, as
    :func:`zsq.quant.attention.attention_maps` returns them.
    """
    missing = sorted(set(teacher) - set(student))
    if missing:
        raise ValueError(f"the student has no attention maps for layers {missing[:3]}")
    terms = []
    for name, maps in teacher.items():
        target = spatial_maps(maps.detach(), num_prefix_tokens, grid)
        mine = spatial_maps(student[name], num_prefix_tokens, grid)
        rows, cols = target.shape[-2:]
        ranges = target.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12).reshape(-1, 1, 1)
        ssim = ssim_maps(mine.reshape(-1, rows, cols), target.reshape(-1, rows, cols), ranges)
        terms.append((1 - ssim).mean())
    return torch.stack(terms).mean()
