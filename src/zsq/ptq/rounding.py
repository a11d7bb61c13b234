"""The arithmetic of reconstruction: AdaRound's soft rounding, its regulariser and schedule,
learned step sizes (LSQ) and the initial clipping search, in zsq's code conventions.

zsq writes a quantized value as ``(q + z) / S`` with signed codes ``q`` (Eq. 1-4). Here the step
``1 / S`` is what is learned, as in Genie and LSQ, and the zero point ``z`` stays fixed:

- weights: ``q = clamp(floor(S0 w - z) + h(V), qmin, qmax)``, ``w' = (q + z) * step``, with the
  floor taken once at the initial scale ``S0`` and ``h`` the rectified sigmoid of a learned
  ``V`` (soft during reconstruction, ``V >= 0`` at the end);
- activations: ``x' = (clamp(round(x / step - z), qmin, qmax) + z) * step`` with a
  straight-through round, ``z = 0`` for signed inputs and ``2^(b-1)`` for non-negative ones (so
  the codes span [0, 2^b - 1] as Genie's unsigned grid does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from zsq.quant.quantizer import code_range

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid
CLIP_RATIOS = torch.arange(1.0, 0.0, -0.01)  # Genie's search grid, as it builds it (float32)
LP_NORM = 2.4  # Genie's norm of the clipping error


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``clamp(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)``: 0 and 1 are reached at finite v."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """The ``v`` with ``rectified_sigmoid(v) = h`` for h in (0, 1)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def rounding_regularizer(h: Tensor, beta: float) -> Tensor:
    """``sum(1 - |2h - 1|^beta)``: zero only where every h is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def beta_at(step: int, steps: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
    """AdaRound's annealed exponent at ``step`` (1-based) of ``steps``: ``start`` through the
    warm-up, then linearly down to ``end`` at the last step."""
    begin = warmup * steps
    if step < begin:
        return start
    fraction = (step - begin) / (steps - begin)
    return end + (start - end) * max(0.0, 1 - fraction)


def round_ste(x: Tensor) -> Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def learned_step_quantize(x: Tensor, step: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """``(clamp(round(x / step - z), qmin, qmax) + z) * step``; the gradient reaches ``x`` inside
    the range and ``step`` everywhere (LSQ: ``round(u) - u`` inside, the bound's code plus ``z``
    outside, ``u = x / step - z``)."""
    qmin, qmax = code_range(bits)
    return _LearnedStep.apply(x, step, zero_point, qmin, qmax)


class _LearnedStep(torch.autograd.Function):
    """LSQ's quantizer with its gradient written out: one pass forward, one back (autograd
    through round/clamp takes several ``where`` passes, the slowest op on a CPU)."""

    @staticmethod
    def forward(ctx, x, step, zero_point, qmin, qmax):  # noqa: ANN001, ANN205
        scaled = x / step - zero_point
        codes = scaled.round()
        inside = ((codes >= qmin) & (codes <= qmax)).to(x.dtype)
        codes = codes.clamp_(qmin, qmax)
        ctx.save_for_backward(scaled, codes, inside, step, zero_point)
        return (codes + zero_point) * step

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        scaled, codes, inside, step, zero_point = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            # inside: round(u) - u; outside: the clamped code + z
            slope = codes + zero_point - inside * (scaled + zero_point)
            grad_step = (grad * slope).sum_to_size(step.shape)
        return grad_x, grad_step, None, None, None


def keep_mask(like: Tensor, keep_prob: float) -> Tensor:
    """A float mask shaped as ``like``: 1 with probability ``keep_prob``, else 0. At 1/2 (QDrop's
    default) it unpacks random bytes bit by bit, 5x faster on a CPU than comparing uniforms."""
    if keep_prob != 0.5:
        return (torch.rand_like(like) < keep_prob).to(like.dtype)
    count = like.numel()
    random = torch.randint(0, 256, ((count + 7) // 8,), dtype=torch.uint8, device=like.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=like.device)
    bits = (random.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:count].reshape(like.shape).to(like.dtype)


@torch.no_grad()
def lp_grid(
    x: Tensor, bits: int, *, per_channel: bool, symmetric: bool, signed: bool = True
) -> tuple[Tensor, Tensor]:
    """Genie's initial quantization grid of ``x``: the range [min, max] (per output channel, or
    whole) shrunk by the ratio of 1.0, 0.99, ..., 0.01 that minimises ``mean |x - Q(x)|^2.4``.
    Returns the step and zsq's zero point, shaped to broadcast against ``x``.

    As the reference: the error is measured on Genie's unsigned grid with zero point
    ``round(-min / step)``; ``symmetric`` ranges are ``[-max|x|, max|x|]`` (``[0, max|x|]`` when
    not ``signed``); the zero point returned is the one the quantizer uses afterwards: the
    search's for an asymmetric grid, 0 or ``2^(b-1)`` for a symmetric signed or unsigned one.
    """
    rows = x.shape[0] if per_channel else 1
    flat = x.detach().reshape(rows, -1).float()
    if symmetric:
        top = flat.abs().amax(dim=1)
        low = -top if signed else torch.zeros_like(top)
    else:
        top = flat.amax(dim=1)
        low = flat.amin(dim=1) if signed else flat.amin(dim=1).clamp(min=0)
    levels = 2**bits - 1
    best = torch.full((rows,), 1e10, device=flat.device)
    step = torch.zeros_like(best)
    offset = torch.zeros_like(best)  # Genie's (unsigned) zero point
    for ratio in CLIP_RATIOS.to(flat.device):
        new_step = (top * ratio - low * ratio) / levels
        new_offset = (-(low * ratio) / new_step).round()
        codes = torch.clamp(torch.round(flat / new_step[:, None]) + new_offset[:, None], 0, levels)
        error = (flat - (codes - new_offset[:, None]) * new_step[:, None]).abs().pow(LP_NORM)
        score = error.mean(dim=1)
        better = score < best
        step = torch.where(better, new_step, step)
        offset = torch.where(better, new_offset, offset)
        best = torch.minimum(score, best)
    half = 2 ** (bits - 1)
    if symmetric:
        zero_point = torch.zeros_like(step) if signed else torch.full_like(step, half)
    else:
        zero_point = half - offset  # codes q = k - 2^(b-1) for Genie's unsigned codes k
    shape = (-1,) + (1,) * (x.dim() - 1) if per_channel else ()
    return step.reshape(shape).to(x.dtype), zero_point.reshape(shape).to(x.dtype)
