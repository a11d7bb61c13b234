"""``zsq demo``: the problem and each method's answer in under a minute, no files, no network.

A small CNN teacher is trained on scikit-learn's built-in 8x8 digits (a real dataset shipped with
that package), then quantized at a width where rounding alone breaks it (``DEMO_BITS``, W2A2) by
min/max, GDFQ, GDFQ+AIT and Genie (Genie-D images + block reconstruction); accuracy is measured on
the held-out split, which no method sees. The table, a closing line that reads it, and a PNG of
accuracy against seconds.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from zsq.data import load_dataset
from zsq.evaluate import evaluate
from zsq.ptq import calibrate_activations, gaussian_batches
from zsq.quant import QuantSpec, quantize_model
from zsq.runtime import resolve_device, seed_everything

DIGITS_MEAN = (0.305,)
DIGITS_STD = (0.376,)
IMAGE_SHAPE = (1, 8, 8)
DEMO_BITS = (2, 2)  # (weights, activations): min/max fails here and the methods differ


def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A small conv net with BatchNorm (the generator methods need BN statistics)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(in_channels, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def train_teacher(
    train_set: Dataset, *, epochs: int = 15, device: torch.device, seed: int = 0
) -> nn.Module:
    """Train the digits teacher with Adam (a few seconds on a CPU)."""
    seed_everything(seed)
    model = digits_cnn().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@dataclass
class DemoRow:
    name: str
    top1: float
    seconds: float
    data_used: str
    zero_shot: bool = True


def _quant(bits: tuple[int, int]) -> QuantSpec:
    return QuantSpec(wbits=bits[0], abits=bits[1])


def _minmax(teacher: nn.Module, bits: tuple[int, int], device: torch.device, seed: int):
    student = quantize_model(teacher, _quant(bits), IMAGE_SHAPE).to(device)
    calibrate_activations(student, gaussian_batches(512, IMAGE_SHAPE, seed=seed), device=device)
    return student


def _run(teacher: nn.Module, method, bits, device: torch.device, seed: int) -> nn.Module:  # noqa: ANN001
    from zsq.run.quantize import quantize

    result = quantize(
        teacher, method, image_shape=IMAGE_SHAPE, num_classes=10, quant=_quant(bits),
        device=device, seed=seed, progress=False,
    )  # fmt: skip
    return result.student


def _gdfq(ait: bool, scale: float) -> Any:
    from zsq.methods import GDFQ

    return GDFQ(ait=ait, recipe="demo", overrides=_scaled(DEMO_DISTILL, scale))


def _genie(scale: float) -> Any:
    from zsq.methods import Genie

    return Genie(
        recipe="short", convention="all", calib_size=DEMO_GENIE["images"],
        calib_options={"iters": max(1, round(DEMO_GENIE["distill_iters"] * scale)),
                       "batch_size": DEMO_GENIE["images"]},
        overrides={"iters": max(2, round(DEMO_GENIE["iters"] * scale)), "batch_size": 32},
    )  # fmt: skip


# the demo's sizes: 37 s on two idle CPU cores (docs/results.md section 3)
DEMO_DISTILL = {"epochs": 8, "iters_per_epoch": 20, "lr_milestones": (4, 6), "eval_every": 8}
DEMO_GENIE = {"images": 256, "distill_iters": 100, "iters": 400}


def _scaled(overrides: dict[str, Any], scale: float) -> dict[str, Any]:
    """``scale`` < 1 (the tests' short configuration): fewer epochs, the same shape."""
    if scale >= 1:
        return dict(overrides)
    epochs = max(2, round(overrides["epochs"] * scale))
    return {
        **overrides, "epochs": epochs, "iters_per_epoch": max(2, round(20 * scale)),
        "lr_milestones": (), "eval_every": epochs, "gen_warmup_epochs": 1,
        "act_calib_epochs": 1,
    }  # fmt: skip


def demo_methods(
    bits: tuple[int, int] = DEMO_BITS, scale: float = 1.0
) -> dict[str, Callable[[nn.Module, torch.device, int], nn.Module]]:
    """Rows of the demo table after FP32: name -> function(teacher, device, seed) -> student."""
    label = f"W{bits[0]}A{bits[1]}"
    return {
        "min/max W8A8": lambda t, d, s: _minmax(t, (8, 8), d, s),
        f"min/max {label}": lambda t, d, s: _minmax(t, bits, d, s),
        f"GDFQ {label}": lambda t, d, s: _run(t, _gdfq(False, scale), bits, d, s),
        f"GDFQ+AIT {label}": lambda t, d, s: _run(t, _gdfq(True, scale), bits, d, s),
        f"Genie {label}": lambda t, d, s: _run(t, _genie(scale), bits, d, s),
    }


@dataclass
class DemoResult:
    rows: list[DemoRow]
    n_test: int
    device: torch.device
    bits: tuple[int, int]

    def table(self) -> str:
        return format_table(self.rows, self.n_test, self.device)

    def ranking(self) -> list[DemoRow]:
        """The quantized rows at the demo's width, best first."""
        label = f"W{self.bits[0]}A{self.bits[1]}"
        return sorted((r for r in self.rows if r.name.endswith(label)), key=lambda r: -r.top1)

    def closing_line(self) -> str:
        teacher = self.rows[0].top1
        order = self.ranking()
        minmax = next(r for r in order if r.name.startswith("min/max"))
        best = order[0]
        ranked = ""
        for i, r in enumerate(order):  # equal scores (one test image is 0.19 points) tie
            ranked += ("" if i == 0 else " = " if r.top1 == order[i - 1].top1 else " > ") + (
                f"{r.name.rsplit(' ', 1)[0]} {r.top1:.1f}"
            )
        return (
            f"At W{self.bits[0]}A{self.bits[1]} rounding alone (min/max) loses "
            f"{teacher - minmax.top1:.1f} points of the teacher's {teacher:.1f}; ranked: "
            f"{ranked}. {best.name.rsplit(' ', 1)[0]} comes within {teacher - best.top1:.1f} "
            "points without seeing a real image."
        )


def run_demo(
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    *,
    bits: tuple[int, int] = DEMO_BITS,
    scale: float = 1.0,
) -> DemoResult:
    """Train the teacher, quantize it with every demo method; ``scale`` < 1 shortens every
    method (tests)."""
    dev = resolve_device(device)
    norm = {"normalize_mean": DIGITS_MEAN, "normalize_std": DIGITS_STD}
    train_set = load_dataset("digits", split="train", **norm)
    test_set = load_dataset("digits", split="test", **norm)

    started = time.perf_counter()
    teacher = train_teacher(train_set, device=dev, seed=seed)
    rows = [
        DemoRow(
            "FP32 teacher",
            _top1(teacher, test_set, dev),
            time.perf_counter() - started,
            "trained on the digits train split",
            zero_shot=False,
        )
    ]
    methods = demo_methods(bits, scale)
    for name, method in tqdm(methods.items(), desc="demo", disable=not progress, leave=False):
        started = time.perf_counter()
        seed_everything(seed)
        with _quiet():  # the table is the demo's output, not each run's log
            student = method(teacher, dev, seed)
        rows.append(
            DemoRow(name, _top1(student, test_set, dev), time.perf_counter() - started, "none")
        )
    return DemoResult(rows, len(test_set), dev, bits)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("zsq")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _top1(model: nn.Module, dataset: Dataset, device: torch.device) -> float:
    with _quiet():
        return evaluate(model, dataset, device=device, progress=False).top1


def format_table(rows: list[DemoRow], n_test: int, device: torch.device) -> str:
    header = f"zsq demo: digits CNN, held-out top-1 on {n_test} images, device {device}"
    teacher = rows[0].top1
    lines = [header, "", f"{'method':<18}{'top-1 %':>9}{'gap':>8}{'seconds':>9}  real data used"]
    lines.append("-" * len(lines[-1]))
    for r in rows:
        gap = "" if not r.zero_shot else f"{r.top1 - teacher:+.2f}"
        lines.append(f"{r.name:<18}{r.top1:>9.2f}{gap:>8}{r.seconds:>9.1f}  {r.data_used}")
    return "\n".join(lines)


def save_plot(result: DemoResult, path: str | Path) -> Path:
    """Accuracy against seconds, one point per method, the teacher as a line (needs
    matplotlib: ``pip install 'zsq[plots]'``)."""
    from zsq.analysis.plots import new_figure, save_png

    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    teacher = result.rows[0]
    ax.axhline(teacher.top1, color="grey", linestyle="--", label=f"FP32 teacher {teacher.top1:.1f}")
    for row in result.rows[1:]:
        ax.scatter(row.seconds, row.top1, s=40)
        ax.annotate(row.name, (row.seconds, row.top1), textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel("seconds on " + str(result.device))
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title("zsq demo: data-free quantization of a digits CNN")
    ax.legend(loc="lower right")
    return save_png(fig, path)
