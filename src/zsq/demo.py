"""``zsq demo``: the whole story in a couple of minutes, with no files and no network.

A small CNN teacher is trained on scikit-learn's built-in 8x8 digits (a real dataset shipped with
that package), then quantized by each method; accuracy is measured on the held-out split, which
no method sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from zsq.data import load_dataset
from zsq.evaluate import evaluate
from zsq.ptq import calibrate_activations, gaussian_batches
from zsq.quant import QuantSpec, quantize_model
from zsq.runtime import resolve_device, seed_everything

DIGITS_MEAN = (0.305,)
DIGITS_STD = (0.376,)
IMAGE_SHAPE = (1, 8, 8)


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


def _minmax(teacher: nn.Module, bits: int, device: torch.device, seed: int) -> nn.Module:
    student = quantize_model(teacher, QuantSpec(wbits=bits, abits=bits), IMAGE_SHAPE).to(device)
    calibrate_activations(student, gaussian_batches(512, IMAGE_SHAPE, seed=seed), device=device)
    return student


def _distilled(teacher: nn.Module, device: torch.device, seed: int, ait: bool) -> nn.Module:
    from zsq.methods import GDFQ
    from zsq.run.quantize import quantize

    method = GDFQ(ait=ait, recipe="demo")
    result = quantize(
        teacher, method, image_shape=IMAGE_SHAPE, num_classes=10, device=device, seed=seed,
        progress=False,
    )  # fmt: skip
    return result.student


def demo_methods() -> dict[str, Callable[[nn.Module, torch.device, int], nn.Module]]:
    """Rows of the demo table after FP32: name -> function(teacher, device, seed) -> student."""
    return {
        "minmax W8A8": lambda t, d, s: _minmax(t, 8, d, s),
        "minmax W4A4": lambda t, d, s: _minmax(t, 4, d, s),
        "GDFQ W4A4": lambda t, d, s: _distilled(t, d, s, ait=False),
        "GDFQ+AIT W4A4": lambda t, d, s: _distilled(t, d, s, ait=True),
    }


def run_demo(seed: int = 0, device: str = "auto", progress: bool = True) -> str:
    """Train the teacher, quantize it with every demo method, return the table as text."""
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
            "trained on digits train split",
        )
    ]
    for name, method in demo_methods().items():
        started = time.perf_counter()
        seed_everything(seed)
        student = method(teacher, dev, seed)
        rows.append(
            DemoRow(
                name,
                _top1(student, test_set, dev),
                time.perf_counter() - started,
                "none (data-free)",
            )
        )
    return format_table(rows, len(test_set), dev)


def _top1(model: nn.Module, dataset: Dataset, device: torch.device) -> float:
    return evaluate(model, dataset, device=device, progress=False).top1


def format_table(rows: list[DemoRow], n_test: int, device: torch.device) -> str:
    header = f"zsq demo: digits CNN, held-out top-1 on {n_test} images, device {device}"
    lines = [header, "", f"{'method':<22}{'top-1 %':>9}{'seconds':>10}  real data used"]
    lines.append("-" * len(lines[-1]))
    for r in rows:
        lines.append(f"{r.name:<22}{r.top1:>9.2f}{r.seconds:>10.1f}  {r.data_used}")
    return "\n".join(lines)
