"""Losses on a vision transformer's inner tensors for synthesising images: PSAQ-ViT's
patch-similarity entropy, MimiQ's inter-head attention alignment, and the total-variation prior.

Facts they follow (written here from the papers' descriptions and PSAQ-ViT's public code, none
of it copied):

- **Patch-similarity entropy** (PSAQ-ViT, Li et al. 2022, arXiv 2203.02250, ``zkkli/PSAQ-ViT``):
  per block, the attention module's per-head output ``attention @ v`` averaged over the heads,
  the class token dropped, gives one feature per patch; the cosine similarity of every pair of
  patches (the diagonal included) is one sample set per image. A Gaussian kernel density
  estimate (bandwidth 0.01) of those samples is evaluated at 10 points between the batch's
  smallest and largest similarity; ``-(p + 1e-4) log(p + 1e-4)`` is integrated over them with the
  trapezoid rule and averaged over the images. The synthesis *maximises* it, summed over blocks.
  Ours (a deviation): the evaluation range is widened by 3 bandwidths on each side. Without it
  a set of identical features (every similarity 1) gives a zero-width range and an entropy of
  exactly 0, higher than any nearly identical set; widened, the estimate tends to the entropy
  of one kernel, ``log(bandwidth * sqrt(2 pi e))`` (about -3.2), as the features coincide.
- **Head alignment** (MimiQ, Choi et al., AAAI 2025, arXiv 2407.20021): "aligning head-wise
  attention responses in relation to spatial query patches". For every layer, every spatial
  query patch and every pair of heads, the two heads' attention over the spatial keys is
  reshaped to the patch grid and compared with SSIM; the loss is ``1 - SSIM^2`` (the form
  ``../shared/REFERENCE.md`` records from third-party descriptions; MimiQ's code is not public),
  averaged over images, queries and head pairs, summed over layers by the caller. Choices of
  ours, since the paper's exact SSIM settings were not found: Wang et al.'s Gaussian window
  (11 taps, sigma 1.5, valid positions only), shrunk to the grid when the grid is smaller (on a
  7x7 grid one 7x7 window: a Gaussian-weighted global SSIM); the class-token query and key are
  left out (they have no place on the grid); and the data range ``L`` in ``C1 = (0.01 L)^2``,
  ``C2 = (0.03 L)^2`` is the largest weight any head gives that query (detached), so the
  comparison is scale-free: with ``L = 1`` a map over 196 keys, whose weights are near 1/196,
  would score SSIM near 1 whatever its shape. The square is taken with its sign,
  ``1 - SSIM * |SSIM|`` (a deviation, the same value wherever SSIM >= 0): the plain square is
  also 0 at SSIM = -1 and rewards anti-aligned heads. Measured on the Fashion-MNIST ViT teacher,
  150 steps from noise: with the plain square 45% of head pairs ended below SSIM -0.5 and the
  mean SSIM stayed at 0.02 (noise: 0.04); with the signed square 2% did and the mean rose to 0.56.
- **Total variation**: DeepInversion's L2 image prior as PSAQ-ViT uses it: the sum of the L2
  norms (over the whole batch) of the differences between neighbouring pixels, right, down and
  both diagonals. PSAQ-ViT pulls it towards a random level; MimiQ adds it with weight 2.5e-5.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsq.errors import ZsqError
from zsq.models.introspect import has_attention, vit_layout
from zsq.quant.attention import (
    attention_maps,
    attention_modules,
    expose_attention,
    set_keep_attention,
)

log = logging.getLogger(__name__)

__all__ = [
    "head_alignment_loss",
    "interhead_ssim",
    "kde_entropy",
    "mean_interhead_similarity",
    "patch_similarity_entropy",
    "token_layout",
    "total_variation",
]

KDE_BANDWIDTH = 0.01  # PSAQ-ViT's Gaussian kernel width
KDE_POINTS = 10  # PSAQ-ViT's evaluation points
KDE_FLOOR = 1e-4  # added to the density before the log, as PSAQ-ViT does
KDE_PAD = 3.0  # ours: bandwidths added on each side of the evaluation range (module doc)
SSIM_WINDOW = 11  # Wang et al. 2004
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


# --- total variation ---------------------------------------------------------------------------


def total_variation(images: Tensor) -> Tensor:
    """Sum over the four neighbour directions (right, down, both diagonals) of the L2 norm of
    the pixel differences over the whole batch (DeepInversion's prior, as PSAQ-ViT uses it)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    x = images.float()
    diffs = (
        x[:, :, :, 1:] - x[:, :, :, :-1],
        x[:, :, 1:, :] - x[:, :, :-1, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, 1:, 1:] - x[:, :, :-1, :-1],
    )
    return torch.stack([d.square().sum().sqrt() for d in diffs]).sum()


# --- patch-similarity entropy (PSAQ-ViT) -------------------------------------------------------


def kde_entropy(
    samples: Tensor,
    bandwidth: float = KDE_BANDWIDTH,
    points: int = KDE_POINTS,
    pad: float = KDE_PAD,
) -> Tensor:
    """Differential entropy of each row of ``samples`` (B, S) from a Gaussian kernel density
    estimate evaluated at ``points`` shared points (the batch's range widened by ``pad``
    bandwidths) and integrated with the trapezoid rule; the mean over rows."""
    if samples.dim() != 2:
        raise ValueError(f"samples must be (B, S), got {tuple(samples.shape)}")
    samples = samples.float()
    lo = samples.min().detach() - pad * bandwidth
    hi = samples.max().detach() + pad * bandwidth
    grid = torch.linspace(0.0, 1.0, points, device=samples.device) * (hi - lo) + lo
    z = (grid[None, :, None] - samples[:, None, :]) / bandwidth  # (B, points, S)
    density = torch.exp(-0.5 * z.square()).mean(2) / (bandwidth * math.sqrt(2 * math.pi))
    p = density + KDE_FLOOR
    return torch.trapezoid(-p * torch.log(p), grid, dim=1).mean()


def patch_similarity(features: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Cosine similarity of every pair of patch features: (B, N, D) -> (B, P, P), the first
    ``num_prefix_tokens`` tokens (class token, registers) left out."""
    patches = F.normalize(features[:, num_prefix_tokens:].float(), dim=-1, eps=1e-8)
    return patches @ patches.transpose(1, 2)


def patch_similarity_entropy(
    features: Tensor,
    num_prefix_tokens: int = 1,
    bandwidth: float = KDE_BANDWIDTH,
    points: int = KDE_POINTS,
) -> Tensor:
    """PSAQ-ViT's patch-similarity entropy of one block's patch features (B, N, D): high when
    the patches' similarities are spread out, low when the patches all look alike."""
    sims = patch_similarity(features, num_prefix_tokens)
    return kde_entropy(sims.flatten(1), bandwidth, points)


# --- inter-head attention similarity (MimiQ) ---------------------------------------------------


def token_layout(
    num_tokens: int, num_prefix_tokens: int | None = None, grid: Sequence[int] | None = None
) -> tuple[int, tuple[int, int]]:
    """(prefix tokens, (rows, cols) of the patch grid) for ``num_tokens`` tokens: what is given,
    else a square grid after 0 or 1 prefix tokens."""
    if grid is not None:
        rows, cols = int(grid[0]), int(grid[1])
        prefix = num_tokens - rows * cols if num_prefix_tokens is None else num_prefix_tokens
    else:
        candidates = [num_prefix_tokens] if num_prefix_tokens is not None else [1, 0]
        prefix, rows = candidates[0], -1
        for candidate in candidates:
            side = math.isqrt(max(num_tokens - candidate, 0))
            if side * side == num_tokens - candidate and side > 0:
                prefix, rows = candidate, side
                break
        cols = rows
    if rows < 1 or cols < 1 or prefix < 0 or prefix + rows * cols != num_tokens:
        raise ZsqError(
            f"cannot place {num_tokens} tokens on a patch grid (prefix tokens "
            f"{num_prefix_tokens}, grid {grid}); give the model's num_prefix_tokens and grid"
        )
    return prefix, (rows, cols)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    taps = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    line = torch.exp(-taps.square() / (2 * sigma * sigma))
    line = line / line.sum()
    return line[:, None] * line[None, :]


def _window_size(rows: int, cols: int, window: int) -> int:
    size = min(window, rows, cols)
    return size if size % 2 == 1 else size - 1


def ssim_maps(
    a: Tensor, b: Tensor, data_range: Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA
) -> Tensor:
    """SSIM of corresponding maps ``a`` and ``b`` (M, rows, cols), each pair on its own data
    range (``data_range`` broadcastable to (M, 1, 1)); Gaussian window (module doc). (M,)"""
    rows, cols = a.shape[-2:]
    a, b = a / data_range, b / data_range
    stacked = torch.stack([a, b, a.square(), b.square(), a * b], dim=1)
    size = _window_size(rows, cols, window)
    kernel = _gaussian_window(size, sigma, a.device)
    local = F.conv2d(stacked, kernel.expand(5, 1, size, size), groups=5)
    mu_a, mu_b, mean_aa, mean_bb, mean_ab = local.unbind(1)
    var_a, var_b = mean_aa - mu_a.square(), mean_bb - mu_b.square()
    cov = mean_ab - mu_a * mu_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2)
    return (numerator / denominator).mean(dim=(-2, -1))


def spatial_maps(
    attention: Tensor, num_prefix_tokens: int | None = None, grid: Sequence[int] | None = None
) -> Tensor:
    """One layer's maps (B, heads, N, N) as (B, queries, heads, rows, cols): each spatial query
    patch's weights over the spatial keys on the patch grid (prefix tokens left out)."""
    if attention.dim() != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must be (B, heads, N, N), got {tuple(attention.shape)}")
    batch, heads, tokens, _ = attention.shape
    prefix, (rows, cols) = token_layout(tokens, num_prefix_tokens, grid)
    maps = attention[:, :, prefix:, prefix:].float()  # (B, H, Q, K)
    return maps.permute(0, 2, 1, 3).reshape(batch, rows * cols, heads, rows, cols)


def interhead_ssim(
    attention: Tensor,
    num_prefix_tokens: int | None = None,
    grid: Sequence[int] | None = None,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> Tensor:
    """SSIM between every pair of heads' attention maps, per image and spatial query patch.

    ``attention``: one layer's maps (B, heads, N, N). Each query patch's weights over the spatial
    keys form a (rows, cols) map; the result is (B, queries, heads*(heads-1)/2), pairs in the
    order of ``torch.triu_indices`` (module doc for the window and the data range).
    """
    maps = spatial_maps(attention, num_prefix_tokens, grid)
    batch, queries, heads, rows, cols = maps.shape
    scale = maps.detach().amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-12)  # per query
    first, second = torch.triu_indices(heads, heads, offset=1, device=maps.device)
    pairs = len(first)
    a = maps[:, :, first].reshape(-1, rows, cols)
    b = maps[:, :, second].reshape(-1, rows, cols)
    ranges = scale.expand(batch, queries, pairs, 1, 1).reshape(-1, 1, 1)
    return ssim_maps(a, b, ranges, window, sigma).reshape(batch, queries, pairs)


def head_alignment_loss(
    attention: Tensor,
    num_prefix_tokens: int | None = None,
    grid: Sequence[int] | None = None,
    *,
    signed: bool = True,
) -> Tensor:
    """MimiQ's head alignment for one layer: mean over images, query patches and head pairs of
    ``1 - SSIM * |SSIM|`` (``1 - SSIM^2`` with ``signed=False``, module doc); 0 for a single
    head. Zero exactly when every head attends alike."""
    if attention.shape[1] < 2:
        return attention.new_zeros((), dtype=torch.float32)
    ssim = interhead_ssim(attention, num_prefix_tokens, grid)
    square = ssim * ssim.abs() if signed else ssim.square()
    return (1 - square).mean()


@torch.no_grad()
def mean_interhead_similarity(model: nn.Module, images: Tensor, batch_size: int = 256) -> float:
    """Mean SSIM between the heads' attention maps (MimiQ's measure, per spatial query patch and
    head pair) over ``images``, averaged over layers with at least two heads.

    Real images give high values (MimiQ's observation); a source's synthetic images can be
    compared against them. A model with quantized attention is measured as it is (put in eval
    mode meanwhile); a float timm ViT through a copy that exposes its maps.
    """
    if not has_attention(model):
        raise ZsqError(
            f"mean_interhead_similarity needs a vision transformer with timm attention modules "
            f"and {type(model).__name__} has none"
        )
    layout = vit_layout(model)
    probe = model if attention_modules(model) else expose_attention(model)
    keep = {id(m): m.keep_attention for _, m in attention_modules(probe)}
    training = probe.training
    probe.eval()
    set_keep_attention(probe, True)
    device = next(probe.parameters()).device
    sums: dict[str, float] = {}
    count = 0
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].to(device)
            probe(chunk)
            for name, maps in attention_maps(probe).items():
                if maps.shape[1] > 1:
                    ssim = interhead_ssim(maps, *layout)
                    sums[name] = sums.get(name, 0.0) + float(ssim.mean(dim=(1, 2)).sum())
            count += len(chunk)
    finally:
        for _, module in attention_modules(probe):
            module.keep_attention = keep[id(module)]
            module.last_attention = None
        probe.train(training)
    if not sums or count == 0:
        raise ZsqError("mean_interhead_similarity needs images and attention with two heads")
    return sum(v / count for v in sums.values()) / len(sums)
