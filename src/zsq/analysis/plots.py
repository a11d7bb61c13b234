"""PNG plots of the run measurements (``runs``) and the Hessian measurements (``measure``).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch) and
written atomically (rendered in memory, then renamed into place). Each function returns the path
it wrote. matplotlib is the optional ``plots`` extra: ``require_matplotlib`` says how to get it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zsq.analysis.runs import RunMetrics, Series
from zsq.errors import ZsqError
from zsq.io import write_bytes
from zsq.numerics.hessian import Density, density_on_grid

TERM_STYLE = {"ce": ("CE (hard labels)", "tab:red"), "kl": ("KL to the teacher", "tab:blue")}
BROADENING = 0.01  # Gaussian width of the density plot: this share of a term's eigenvalue span
GRID_POINTS = 2000
DENSITY_FLOOR = 1e-6  # the log-density axis shows this fraction of the peak and above
SHARE_LABEL = "share of integer weights changed per step (epoch mean)"


def require_matplotlib() -> None:
    """A one-line error naming the extra when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ZsqError(
            "plots need matplotlib, which is not installed; install it with "
            "pip install 'zsq[plots]'"
        ) from None


def new_figure(width: float = 7.0, height: float = 4.5) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


SOFTWARE = "zsq"  # the PNG's Software text: how zsq knows a PNG it may replace is its own


def save_png(fig: Any, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, metadata={"Software": SOFTWARE})
    path = Path(path)
    write_bytes(path, buffer.getvalue())
    return path


def written_by_zsq(path: Path) -> bool:
    """Whether ``path`` is a PNG zsq wrote (its Software text says so)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == SOFTWARE
    except (OSError, UnidentifiedImageError):
        return False


def _positive(values: Sequence[float]) -> list[float]:
    """Values for a log axis: zeros and negatives become NaN (not drawn)."""
    return [v if v > 0 else math.nan for v in values]


def _log_or_note(ax: Any, values: Sequence[float], note: str) -> None:
    """Log y when something positive is drawn; otherwise say why the axes are empty."""
    if any(v > 0 for v in values):
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center")


# --- one run ------------------------------------------------------------------------------------


def plot_crossings(metrics: RunMetrics, path: str | Path, label: str | None = None) -> Path:
    """Per-layer crossing shares over epochs, log y (paper Figs. 3c, 4); rho dotted in red."""
    from matplotlib import colormaps

    fig = new_figure(9.0, 5.0)
    ax = fig.add_subplot()
    colours = colormaps["viridis"]
    count = max(len(metrics.layers), 1)
    for index, name in enumerate(metrics.layers):
        series = metrics.crossing[name]
        colour = colours(index / max(count - 1, 1))
        ax.plot(series.epochs, _positive(series.values), marker=".", color=colour, label=name)
    if metrics.rho.values:
        ax.plot(metrics.rho.epochs, metrics.rho.values, "r:", linewidth=2, label="ρ (GI target)")
    every = [v for s in metrics.crossing.values() for v in s.values]
    _log_or_note(ax, every, "no integer weight changed in any logged epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of integer weights\nchanged per step (epoch mean)")
    ax.set_title(f"Quantized-weight updates per layer: {label or metrics.method} (zero: not drawn)")
    if metrics.layers or metrics.rho.values:
        ax.legend(fontsize=6, ncol=1 + count // 16, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_png(fig, path)


# --- several runs -------------------------------------------------------------------------------


def _overlay(
    runs: Sequence[RunMetrics],
    labels: Sequence[str],
    series_of: Any,
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    log_y: bool = False,
    note: str = "nothing logged",
) -> Path:
    if len(runs) != len(labels):
        raise ZsqError(f"{len(runs)} runs but {len(labels)} labels; give one label per run")
    fig = new_figure()
    ax = fig.add_subplot()
    drawn: list[float] = []
    for run, label in zip(runs, labels, strict=True):
        series: Series = series_of(run)
        values = _positive(series.values) if log_y else series.values
        ax.plot(series.epochs, values, marker=".", label=label)
        drawn.extend(series.values)
    if log_y:
        _log_or_note(ax, drawn, note)
    elif not drawn:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return save_png(fig, path)


def plot_no_change(runs: Sequence[RunMetrics], labels: Sequence[str], path: str | Path) -> Path:
    """How many quantized layers changed no integer weight in each epoch, per run."""
    layers = max((len(run.layers) for run in runs), default=0)
    return _overlay(
        runs,
        labels,
        lambda run: run.no_change_layers,
        path,
        title="Layers whose integer weights did not change in the epoch",
        ylabel=f"layers with no change (of {layers})",
    )


def plot_probe_kl(runs: Sequence[RunMetrics], labels: Sequence[str], path: str | Path) -> Path:
    """KL(teacher || student) on the fixed probe batch over training (paper Fig. 5a)."""
    values = [v for run in runs for v in run.probe_kl.values]
    spread = values and min(values) > 0 and max(values) / min(values) > 20
    return _overlay(
        runs,
        labels,
        lambda run: run.probe_kl,
        path,
        title="KL divergence to the teacher over training (probe batch)",
        ylabel="KL(teacher ‖ student), T = 1 (nats per sample)",
        log_y=bool(spread),
    )


def plot_mean_crossing(runs: Sequence[RunMetrics], labels: Sequence[str], path: str | Path) -> Path:
    """The crossing share averaged over layers (each layer counts once), log y."""
    return _overlay(
        runs,
        labels,
        lambda run: run.mean_crossing,
        path,
        title="Quantized-weight updates, mean over layers",
        ylabel=SHARE_LABEL + ",\nmean over layers (zero: not drawn)",
        log_y=True,
        note="no integer weight changed in any logged epoch",
    )


def plot_grad_cosines(runs: Sequence[RunMetrics], labels: Sequence[str], path: str | Path) -> Path:
    """CE/KL gradient cosine per epoch (solid; Figs. 1, 5b) and the inter-epoch cosine of the
    mean gradient (dashed; Fig. 3a), as logged with ``analyze_every``."""
    fig = new_figure()
    ax = fig.add_subplot()
    for index, (run, label) in enumerate(zip(runs, labels, strict=True)):
        colour = f"C{index % 10}"
        cos, epoch = run.grad_cos_ce_kl, run.grad_cos_epoch
        ax.plot(cos.epochs, cos.values, "-", marker=".", color=colour, label=f"{label}: CE vs KL")
        if epoch.values:
            ax.plot(
                epoch.epochs, epoch.values, "--", color=colour, label=f"{label}: epoch vs previous"
            )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cosine similarity of gradients (−1 to 1)")
    ax.set_title("Gradient directions at the quantized weights")
    ax.legend(fontsize=8)
    return save_png(fig, path)


# --- Hessian ------------------------------------------------------------------------------------


def _terms(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    terms = result.get("terms") or {}
    if not terms:
        raise ZsqError("the Hessian result has no loss terms; pass measure_hessian's output")
    return list(terms.items())


def _density(term: dict[str, Any]) -> Density:
    d = term["density"]
    nodes = torch.tensor(d["nodes"], dtype=torch.float64)
    return Density((nodes,), (torch.tensor(d["weights"], dtype=torch.float64),), d["dim"])


def _width(nodes: torch.Tensor) -> float:
    span = float(nodes.max() - nodes.min())
    scale = float(nodes.abs().max())
    return max(BROADENING * span, 1e-3 * scale, 1e-12)


def _subtitle(result: dict[str, Any]) -> str:
    data = "real data" if result.get("real_data") else "synthetic data"
    return f"{result.get('method', '')}, one batch of {result.get('batch_size')} ({data})"


def plot_density(result: dict[str, Any], path: str | Path) -> Path:
    """Eigenvalue densities of the CE and KL Hessians (SLQ, each broadened by a Gaussian of 1% of
    its own eigenvalue span), log density (paper Fig. 2d)."""
    terms = _terms(result)
    densities = [(name, _density(term)) for name, term in terms]
    all_nodes = torch.cat([d.nodes[0] for _, d in densities])
    widths = {name: _width(d.nodes[0]) for name, d in densities}
    margin = 4 * max(widths.values())
    parts = [torch.linspace(float(all_nodes.min()) - margin, float(all_nodes.max()) + margin, 2)]
    for name, d in densities:  # a fine grid over each term's own range resolves narrow spectra
        low, high = float(d.nodes[0].min()), float(d.nodes[0].max())
        w = 4 * widths[name]
        parts.append(torch.linspace(low - w, high + w, GRID_POINTS, dtype=torch.float64))
    grid = torch.unique(torch.cat([p.double() for p in parts]))
    fig = new_figure()
    ax = fig.add_subplot()
    peak = 0.0
    for name, density in densities:
        values = density_on_grid(density, grid, widths[name])
        peak = max(peak, float(values.max()))
        label, colour = TERM_STYLE.get(name, (name, None))
        ax.plot(grid.numpy(), values.numpy(), color=colour, label=label)
    ax.set_yscale("log")
    peak = max(peak, 1e-300)
    ax.set_ylim(bottom=peak * DENSITY_FLOOR, top=peak * 10)
    ax.set_xlabel("Hessian eigenvalue λ (loss / weight²)")
    ax.set_ylabel("eigenvalue density (per unit λ, log)")
    ax.set_title(f"Hessian eigenvalue density (SLQ)\n{_subtitle(result)}", fontsize=10)
    ax.legend()
    return save_png(fig, path)


def plot_surface(result: dict[str, Any], path: str | Path) -> Path:
    """Loss change along each term's own top eigenvector (paper Fig. 2c)."""
    surface = result["surface"]
    ks = surface["k"]
    fig = new_figure()
    ax = fig.add_subplot()
    for name, term in _terms(result):
        label, colour = TERM_STYLE.get(name, (name, None))
        change = [v - term["loss"] for v in term["surface"]]
        ax.plot(ks, change, marker=".", color=colour, label=label)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    share = surface.get("radius_over_weight_norm")
    extent = f"±{share:.0%} of the weight norm" if share is not None else "k"
    ax.set_xlabel(f"step k along the unit top eigenvector (weight units; {extent})")
    ax.set_ylabel("loss change L(θ + k·e) − L(θ) (loss units)")
    ax.set_title(f"Loss along the top Hessian eigenvector\n{_subtitle(result)}", fontsize=10)
    ax.legend()
    return save_png(fig, path)


def plot_traces(result: dict[str, Any], path: str | Path) -> Path:
    """Hutchinson traces of the CE and KL Hessians with their standard errors (paper Fig. 2b)."""
    terms = _terms(result)
    names = [TERM_STYLE.get(name, (name, None))[0] for name, _ in terms]
    means = [term["trace"]["mean"] for _, term in terms]
    errors = [term["trace"]["std_error"] or 0.0 for _, term in terms]
    colours = [TERM_STYLE.get(name, (name, "grey"))[1] for name, _ in terms]
    fig = new_figure(5.0, 4.5)
    ax = fig.add_subplot()
    bars = ax.bar(names, means, yerr=errors, color=colours, capsize=6)
    texts = [f"{m:.4g}" + (f" ± {e:.2g}" if e else "") for m, e in zip(means, errors, strict=True)]
    ax.bar_label(bars, texts, label_type="center", color="white", fontsize=9)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    probes = ", ".join(f"{name}: {term['trace']['probes']}" for name, term in terms)
    ax.set_ylabel("Hessian trace tr(H) (loss / weight²)")
    ax.set_title(f"Hessian trace (Hutchinson; probes {probes})\n{_subtitle(result)}", fontsize=10)
    return save_png(fig, path)
