"""Milliseconds per training iteration (generator step + student step) for each method.

    python benchmarks/step_time.py                      # CPU defaults: batch 32, 10 iterations
    python benchmarks/step_time.py --batch 200 --iters 50 --device cuda

The teacher is a ResNet-20 (the shared CIFAR-10-JPEG weights when present, else random init,
which does not change the cost). Also reports the share of the AIT step spent in gradient
inundation (the student update with GI minus the plain optimiser update).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zsq.api import resolve_recipe
from zsq.distill import Distiller
from zsq.models import load_teacher
from zsq.paths import shared_data_dir
from zsq.quant import QuantSpec, quantize_model
from zsq.runtime import device_description, resolve_device
from zsq.synth import available_sources, build_source

ROWS = {
    "gdfq": ("gdfq", False),
    "gdfq+ait": ("gdfq", True),
    "qimera": ("qimera", False),
    "qimera+ait": ("qimera", True),
    "arc": ("arc", False),
    "arc+ait": ("arc", True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(method: str, ait: bool, batch: int, device: torch.device) -> Distiller:
    weights = shared_data_dir() / "weights" / "resnet20_cifar10jpeg.pt"
    teacher, _ = load_teacher("resnet20", weights if weights.exists() else None)
    teacher = teacher.to(device)
    recipe = resolve_recipe(
        "paper-cifar", ait=ait, overrides={"batch_size": batch, "gen_warmup_epochs": 0}
    )
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=4)).to(device)
    source = build_source(method, teacher, num_classes=10, image_shape=(3, 32, 32)).to(device)
    trainer = Distiller(teacher, student, source, recipe, device=device, progress=False)
    trainer.apply_schedule(0)  # observing ranges, as in the first epochs
    return trainer


def time_iterations(trainer: Distiller, iters: int, device: torch.device) -> float:
    """Mean ms per iteration of the real loop body: source step + student step."""
    for _ in range(3):  # warm-up (lazy optimiser state, allocator, cudnn autotune)
        batch, _ = trainer.source.step(trainer.recipe.batch_size)
        trainer.student_step(batch)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        batch, _ = trainer.source.step(trainer.recipe.batch_size)
        trainer.student_step(batch)
    _sync(device)
    return (time.perf_counter() - start) * 1000 / iters


def time_update(trainer: Distiller, iters: int, device: torch.device, with_gi: bool) -> float:
    """Mean ms of the parameter update alone (GI step, or the bare optimiser step)."""
    batch, _ = trainer.source.step(trainer.recipe.batch_size)
    loss = trainer.student(batch.images).logsumexp(1).mean()
    loss.backward()
    update = trainer.gi.step if with_gi else trainer.optimizer.step
    update()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        update()
    _sync(device)
    return (time.perf_counter() - start) * 1000 / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--methods", default=",".join(ROWS))
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    results = []
    for name in args.methods.split(","):
        method, ait = ROWS[name]
        if method not in available_sources():
            print(f"skip {name}: source {method!r} not available")
            continue
        trainer = build(method, ait, args.batch, device)
        row = {
            "method": name,
            "ms_per_iter": round(time_iterations(trainer, args.iters, device), 2),
        }
        if ait:
            gi_ms = time_update(trainer, args.iters, device, with_gi=True)
            plain_ms = time_update(trainer, args.iters, device, with_gi=False)
            row["gi_ms"] = round(gi_ms - plain_ms, 2)
            row["gi_share"] = round((gi_ms - plain_ms) / row["ms_per_iter"], 3)
        row.update(batch=args.batch, device=device_description(device))
        results.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
