"""Loss-surface analysis (paper Sec. 3): gradient cosines, Hessian trace, eigenpairs, density.

Each function takes a zero-argument ``loss_fn`` returning a scalar loss built from ``params``, so
the caller picks the batch and the loss term (CE, KL, ...).
"""

from zsq.analysis.gradients import GradientMeter, cosine_similarity, flat_grad, grad_cosine
from zsq.analysis.hessian import (
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
    "hutchinson_trace",
    "hvp",
    "lanczos",
    "loss_along",
    "slq_density",
    "top_eigenpairs",
]
