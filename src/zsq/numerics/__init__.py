"""Numerics shared by distillation, mixed precision and analysis: the KL/CE losses, gradient
meters and cosines, Hessian-vector products and the estimators built on them.

Below every package that trains or measures, so each imports them without importing another.
"""

from zsq.numerics.gradients import (
    GradientMeter,
    cosine_similarity,
    flat_grad,
    grad_cosine,
    grads_or_zeros,
)
from zsq.numerics.hessian import (
    Density,
    HessianOperator,
    TraceEstimate,
    Tridiagonal,
    density_on_grid,
    hutchinson_trace,
    hvp,
    lanczos,
    loss_along,
    slq_density,
    top_eigenpairs,
)
from zsq.numerics.losses import kl_to_teacher, soft_cross_entropy

__all__ = [
    "Density",
    "GradientMeter",
    "HessianOperator",
    "TraceEstimate",
    "Tridiagonal",
    "cosine_similarity",
    "density_on_grid",
    "flat_grad",
    "grad_cosine",
    "grads_or_zeros",
    "hutchinson_trace",
    "hvp",
    "kl_to_teacher",
    "lanczos",
    "loss_along",
    "slq_density",
    "soft_cross_entropy",
    "top_eigenpairs",
]
