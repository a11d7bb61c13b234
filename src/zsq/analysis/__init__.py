"""The paper's Section 3 measurements on finished runs: ``read_run_metrics`` (what a run logged
while training), ``measure_hessian`` (CE vs KL at its student), and the plots. The estimators
themselves (gradient cosines, Hutchinson trace, eigenpairs, density, loss along a direction) are
:mod:`zsq.numerics`, below the packages that train and search."""

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
    "RunMetrics",
    "Series",
    "finished_run",
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
]
