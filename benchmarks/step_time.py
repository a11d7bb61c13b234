"""Milliseconds per training iteration (generator step + student step) for each method.

    python benchmarks/step_time.py                      # CPU defaults: batch 32, 10 iterations
    python benchmarks/step_time.py --batch 200 --iters 50 --device cuda
    python benchmarks/step_time.py --device cuda --batch 200 --precision bf16 \
        --compile reduce-overhead
    python benchmarks/step_time.py --methods gdfq+ait --profile 5   # torch.profiler table
    ZSQ_CPU_ALLOCATOR=system python benchmarks/step_time.py         # glibc's malloc defaults

Timed in the steady state of the recipe (activation ranges frozen, GI past its warm-up), after
warm-up iterations that also absorb torch.compile's compilation (reported as ``warmup_s``).

The teacher is a ResNet-20 (the shared CIFAR-10-JPEG weights when present, else random init,
which does not change the cost). Also reports the share of the AIT step spent in gradient
inundation (the student update with GI minus the plain optimiser update).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zsq.distill import Distiller
from zsq.execution import COMPILE_FLAGS, PRECISIONS, Execution, tune_cpu_allocator
from zsq.methods import GDFQ
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


def build(
    method: str, ait: bool, batch: int, device: torch.device, execution: Execution
) -> Distiller:
    weights = shared_data_dir() / "weights" / "resnet20_cifar10jpeg.pt"
    teacher, _ = load_teacher("resnet20", weights if weights.exists() else None)
    teacher = teacher.to(device)
    recipe = GDFQ(  # the schedule is the method's; only its source differs here
        recipe="paper-cifar", ait=ait, overrides={"batch_size": batch, "gen_warmup_epochs": 0}
    ).resolved
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=4), (3, 32, 32)).to(device)
    source = build_source(method, teacher, num_classes=10, image_shape=(3, 32, 32)).to(device)
    return Distiller(
        teacher, student, source, recipe, device=device, progress=False, execution=execution
    )


def iteration(trainer: Distiller) -> None:
    """The training loop's body: one source step, one student step on its batch."""
    trainer.execution.begin_step()
    batch, _ = trainer.source.step(trainer.recipe.batch_size)
    trainer.student_step(batch)


def warm_up(trainer: Distiller, iters: int, device: torch.device) -> float:
    """Observe ranges as the first epochs do, then switch to the steady state (ranges frozen,
    GI past its warm-up) and run ``iters`` more; returns the seconds spent (compilation)."""
    recipe = trainer.recipe
    start = time.perf_counter()
    trainer.apply_schedule(0)
    for _ in range(2):
        iteration(trainer)
    trainer.apply_schedule(
        max(recipe.act_calib_epochs, recipe.gen_warmup_epochs + recipe.gi_warmup_epochs)
    )
    for _ in range(iters):  # lazy optimiser state, allocator, cudnn autotune, compilation
        iteration(trainer)
    _sync(device)
    return time.perf_counter() - start


def time_iterations(trainer: Distiller, iters: int, device: torch.device) -> float:
    """Mean ms per iteration of the real loop body: source step + student step."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        iteration(trainer)
    _sync(device)
    return (time.perf_counter() - start) * 1000 / iters


def profile(trainer: Distiller, iters: int, device: torch.device, rows: int = 20) -> str:
    """torch.profiler table of ``iters`` iterations, ops sorted by their own time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        for _ in range(iters):
            iteration(trainer)
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def time_update(trainer: Distiller, iters: int, device: torch.device, with_gi: bool) -> float:
    """Mean ms of the parameter update alone (GI step, or the bare optimiser step)."""
    trainer.execution.begin_step()
    batch, _ = trainer.source.step(trainer.recipe.batch_size)
    loss = trainer.student(batch.images).logsumexp(1).mean()
    loss.backward()
    for p in trainer.student.parameters():  # kept over the graph steps below (CUDA graphs)
        if p.grad is not None:
            p.grad = p.grad.clone()
    update = trainer.gi.step if with_gi else trainer.optimizer.step

    def step() -> None:
        trainer.execution.begin_step()
        update()

    for _ in range(3):  # untimed: a CUDA graph tree records this new path on its first steps
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) * 1000 / iters


def measure(
    name: str,
    method: str,
    ait: bool,
    args: argparse.Namespace,
    device: torch.device,
    execution: Execution,
) -> dict | None:
    trainer = build(method, ait, args.batch, device, execution)
    warmup_s = warm_up(trainer, args.warmup, device)
    if args.profile:
        print(f"== {name}: torch.profiler, {args.profile} iterations, batch {args.batch}")
        print(profile(trainer, args.profile, device), flush=True)
        return None
    row = {"method": name, "ms_per_iter": round(time_iterations(trainer, args.iters, device), 2)}
    if ait:
        gi_ms = time_update(trainer, args.iters, device, with_gi=True)
        plain_ms = time_update(trainer, args.iters, device, with_gi=False)
        row["gi_ms"] = round(gi_ms - plain_ms, 2)
        row["gi_share"] = round((gi_ms - plain_ms) / row["ms_per_iter"], 3)
    row["warmup_s"] = round(warmup_s, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--methods", default=",".join(ROWS))
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--compile", default="off", choices=COMPILE_FLAGS)
    parser.add_argument("--warmup", type=int, default=3, help="steady-state warm-up iterations")
    parser.add_argument("--profile", type=int, metavar="N", help="profile N iterations instead")
    args = parser.parse_args()
    allocator = "tuned" if tune_cpu_allocator() else "system"  # as the CLI
    device = resolve_device(args.device)
    execution = Execution.from_flags(args.precision, args.compile)
    torch.manual_seed(0)
    results = []
    for name in args.methods.split(","):
        method, ait = ROWS[name]
        if method not in available_sources():
            print(f"skip {name}: source {method!r} not available")
            continue
        with execution.tensor_core_scope():
            row = measure(name, method, ait, args, device, execution)
        if row is None:
            continue
        row.update(
            batch=args.batch,
            precision=args.precision,
            compile=args.compile,
            device=device_description(device),
            allocator=allocator,
        )
        results.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
