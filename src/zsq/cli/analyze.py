"""``zsq analyze``: the AIT paper's Section 3 measurements on finished runs (JSON and plots)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zsq.cli._common import add_common
from zsq.errors import ZsqError
from zsq.layout import RunLayout


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="the AIT paper's Sec. 3 measurements on finished runs: weight updates, KL over "
        "training, Hessian of CE vs KL; JSON and PNG plots (needs zsq[plots])",
    )
    modes = p.add_subparsers(dest="analysis", metavar="{run,hessian,compare}", required=True)

    a = modes.add_parser(
        "run", help="crossing shares per layer, layers with no change, probe KL of one run"
    )
    a.add_argument("dir", help="the output folder of a finished generator-method quantize run")
    a.add_argument("--out", help="folder for run.json and the plots (default DIR/analysis)")
    _add_overwrite(a)
    a.add_argument("--quiet", action="store_true", help="no info logs")
    a.set_defaults(func=run_analysis)

    a = modes.add_parser(
        "hessian",
        help="Hessian trace, top eigenvalue, eigenvalue density and loss surface of CE and KL "
        "at the run's student, on one batch",
    )
    a.add_argument("dir", help="the output folder of a finished quantize run")
    a.add_argument(
        "--data",
        help="real labelled test images (dataset spec, measurement only) instead of a batch "
        "from the run's generator (needed for runs without generator.safetensors)",
    )
    a.add_argument("--batch-size", type=int, default=200, help="images in the batch (200)")
    a.add_argument("--probes", type=int, default=100, help="Hutchinson probes per term (100)")
    a.add_argument(
        "--iters", type=int, default=30, help="power iterations and Lanczos steps per term (30)"
    )
    a.add_argument("--top-k", type=int, default=1, help="top eigenvalues per term (1)")
    a.add_argument(
        "--surface-points", type=int, default=21, help="loss-surface points along k (21)"
    )
    a.add_argument(
        "--surface-radius",
        type=float,
        default=0.02,
        help="loss surface from -K to K along the unit top eigenvector, K this fraction of the "
        "weights' norm (0.02: the paper's +-0.5 on a CIFAR ResNet-20)",
    )
    a.add_argument(
        "--time-limit",
        type=float,
        metavar="S",
        help="seconds for the trace probes of both terms together (each stops after the probe "
        "crossing its half)",
    )
    a.add_argument(
        "--weights", help="the teacher's weights, where the path in the run's report is not found"
    )
    a.add_argument("--out", help="folder for hessian.json and the plots (default DIR/analysis)")
    _add_overwrite(a)
    add_common(a)
    a.set_defaults(func=run_hessian)

    a = modes.add_parser(
        "compare", help="overlay runs: probe KL, layers with no change, mean crossing share"
    )
    a.add_argument("dirs", nargs="+", metavar="DIR", help="two or more finished run folders")
    a.add_argument("--out", required=True, help="folder for compare.json and the plots")
    _add_overwrite(a)
    a.add_argument("--quiet", action="store_true", help="no info logs")
    a.set_defaults(func=run_compare)


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite", action="store_true", help="replace this analysis's files where they exist"
    )


def _analysis_dir(out: str | None, default: Path, mode: str, overwrite: bool) -> Path:
    """Where analysis files go: ``--out``, else ``default``; created when the files are written.
    A folder is written into only if it holds nothing but zsq's analysis files, and this
    mode's own files only with ``--overwrite``."""
    folder = Path(out) if out else default
    if folder.resolve() == Path(folder.resolve().anchor):
        raise ZsqError(f"--out {out} is the filesystem root; name a folder for the analysis")
    if folder.exists() and not folder.is_dir():
        raise ZsqError(f"--out {folder} is a file; give a folder for the analysis files")
    if not folder.is_dir():
        return folder
    ours = {name for names in RunLayout.ANALYSIS_FILES.values() for name in names}
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in ours)
    if foreign:
        raise ZsqError(
            f"{folder} holds files zsq did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); give an empty or new folder with --out"
        )
    again = [n for n in RunLayout.ANALYSIS_FILES[mode] if (folder / n).exists()]
    if again and not overwrite:
        raise ZsqError(
            f"{folder} already holds this analysis ({again[0]}, ...); pass --overwrite to "
            "replace it or give another --out"
        )
    return folder


def _wrote(folder: Path, files: list[Path]) -> str:
    return f"wrote {', '.join(f.name for f in files)} to {folder}"


def run_analysis(args: argparse.Namespace) -> int:
    """Weight-update crossings, layers without change and probe KL of one run, with plots."""
    from zsq.analysis import plots
    from zsq.analysis.runs import read_run_metrics
    from zsq.io import write_json

    plots.require_matplotlib()
    metrics = read_run_metrics(args.dir)
    out = _analysis_dir(args.out, RunLayout(Path(args.dir)).analysis_dir, "run", args.overwrite)
    runs, labels = [metrics], [metrics.method]
    files = [
        plots.plot_crossings(metrics, out / "crossings.png"),
        plots.plot_no_change(runs, labels, out / "layers_no_change.png"),
        plots.plot_probe_kl(runs, labels, out / "probe_kl.png"),
    ]
    if metrics.grad_cos_ce_kl.values:
        files.append(plots.plot_grad_cosines(runs, labels, out / "grad_cosines.png"))
    write_json(out / "run.json", metrics.to_dict())
    files.append(out / "run.json")
    last = metrics.no_change_layers
    summary = f"{metrics.method}: {len(metrics.epochs)} epochs"
    if last.values:
        summary += f"; last epoch {last.values[-1]} of {len(metrics.layers)} layers unchanged"
    if metrics.probe_kl.values:
        summary += (
            f"; probe KL {metrics.probe_kl.values[0]:.4g} -> {metrics.probe_kl.values[-1]:.4g}"
        )
    print(summary)
    print(_wrote(out, files))
    return 0


def run_hessian(args: argparse.Namespace) -> int:
    """CE and KL Hessians at a run's student on one batch: JSON, density and surface plots."""
    from zsq.analysis import plots
    from zsq.analysis.measure import measure_hessian
    from zsq.io import write_json

    plots.require_matplotlib()
    layout = RunLayout(Path(args.dir))
    out = _analysis_dir(args.out, layout.analysis_dir, "hessian", args.overwrite)
    result = measure_hessian(
        args.dir,
        batch_size=args.batch_size,
        probes=args.probes,
        iters=args.iters,
        top_k=args.top_k,
        surface_points=args.surface_points,
        surface_radius=args.surface_radius,
        data=args.data,
        weights=args.weights,
        device=args.device,
        seed=args.seed,
        progress=not args.quiet,
        time_limit_s=args.time_limit,
    )
    files = [
        plots.plot_density(result, out / "hessian_density.png"),
        plots.plot_surface(result, out / "hessian_surface.png"),
        plots.plot_traces(result, out / "hessian_trace.png"),
    ]
    write_json(out / "hessian.json", result)
    files.append(out / "hessian.json")
    print(f"{result['method']} on {result['data']}")
    for name, term in result["terms"].items():
        trace = term["trace"]
        error = f" ± {trace['std_error']:.3g}" if trace["std_error"] is not None else ""
        eigen = ", ".join(f"{v:.4g}" for v in term["top_eigenvalues"])
        print(
            f"  {name}: loss {term['loss']:.4g}  trace {trace['mean']:.4g}{error} "
            f"({trace['probes']} probes)  top eigenvalue {eigen}"
        )
    print(f"{result['seconds']:.1f} s; {_wrote(out, files)}")
    return 0


def _same_teacher(dirs: list[str]) -> None:
    """Runs of different teachers (weights or model) compare nothing: refused."""
    from zsq.analysis.runs import finished_run

    def teacher(folder: str) -> tuple:
        options = finished_run(folder).options
        return (options.get("teacher.model"), options.get("teacher.weights_sha256"))

    first = teacher(dirs[0])
    for folder in dirs[1:]:
        other = teacher(folder)
        if None not in first + other and other != first:
            raise ZsqError(
                f"{dirs[0]} and {folder} quantize different teachers ({first[0]} with weights "
                f"{str(first[1])[:12]}..., {other[0]} with {str(other[1])[:12]}...); compare "
                "runs of one teacher"
            )


def run_compare(args: argparse.Namespace) -> int:
    """Several runs overlaid: probe KL, layers with no change, mean crossing share."""
    from zsq.analysis import plots
    from zsq.analysis.runs import read_run_metrics, run_labels
    from zsq.io import write_json

    if len(args.dirs) < 2:
        raise ZsqError("give at least two run folders to compare")
    real = [Path(d).resolve() for d in args.dirs]
    twice = next((d for i, d in enumerate(args.dirs) if real[i] in real[:i]), None)
    if twice is not None:
        raise ZsqError(f"{twice} is given twice; compare different runs")
    _same_teacher(args.dirs)
    plots.require_matplotlib()
    runs = [read_run_metrics(folder) for folder in args.dirs]
    labels = run_labels(runs)
    out = _analysis_dir(args.out, Path(), "compare", args.overwrite)  # --out is required here
    files = [
        plots.plot_probe_kl(runs, labels, out / "compare_probe_kl.png"),
        plots.plot_no_change(runs, labels, out / "compare_layers_no_change.png"),
        plots.plot_mean_crossing(runs, labels, out / "compare_mean_crossing.png"),
    ]
    if any(run.grad_cos_ce_kl.values for run in runs):
        files.append(plots.plot_grad_cosines(runs, labels, out / "compare_grad_cosines.png"))
    record = {"runs": [{"label": lb, **r.to_dict()} for lb, r in zip(labels, runs, strict=True)]}
    write_json(out / "compare.json", record)
    files.append(out / "compare.json")
    print(_wrote(out, files))
    return 0
