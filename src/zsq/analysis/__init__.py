"""Loss-surface analysis (paper Sec. 3): gradient cosines, Hessian trace, eigenpairs, density.

Each function takes a zero-argument ``loss_fn`` returning a scalar loss built from ``params``, so
the caller picks the batch and the loss term (CE, KL, ...). On a finished run: ``read_run_metrics``
(what it logged while training), ``measure_hessian`` (CE vs KL at its student), and the plots.
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
from zsq.analysis.measure import measure_hessian
from zsq.analysis.plots import (
    plot_crossings,
    plot_density,
    plot_grad_cosines,
    plot_mean_crossing,
    plot_no_change,
    plot_probe_kl,
    plot_surface,
    plot_traces,
    require_matplotlib,
)
from zsq.analysis.runs import RunMetrics, Series, finished_run, read_run_metrics, run_labels

__all__ = [
    "Density",
    "GradientMeter",
    "HessianOperator",
    "RunMetrics",
    "Series",
    "TraceEstimate",
    "Tridiagonal",
    "cosine_similarity",
    "density_on_grid",
    "finished_run",
    "flat_grad",
    "grad_cosine",
    "hutchinson_trace",
    "hvp",
    "lanczos",
    "loss_along",
    "measure_hessian",
    "plot_crossings",
    "plot_density",
    "plot_grad_cosines",
    "plot_mean_crossing",
    "plot_no_change",
    "plot_probe_kl",
    "plot_surface",
    "plot_traces",
    "read_run_metrics",
    "require_matplotlib",
    "run_labels",
    "slq_density",
    "top_eigenpairs",
]
