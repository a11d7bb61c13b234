"""What one distributed GDFQ+AIT step communicates, measured collectives, and the expected scaling.

    python benchmarks/ddp_scaling.py                       # sizes only (seconds)
    python benchmarks/ddp_scaling.py --measure gloo        # + 2-process gloo collectives, CPU
    torchrun --nproc-per-node 8 benchmarks/ddp_scaling.py --measure nccl   # on 8 GPUs

Per step every rank all-reduces the student's and the generator's gradients (one flat fp32
buffer each) and, for the statistics computed over the global batch, two small all-reduces
forward and two backward per BatchNorm layer of the teacher (BNS loss) and of the generator.
The expected time per step on N processes is then

    t_N = t_1 * c(N) + t_allreduce(bytes) + n_small * t_latency

with ``t_1`` the single-process step, ``c(N) >= 1/N`` the compute share at the smaller local
batch; ``t_allreduce`` and ``t_latency`` are measured here for the backend at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from zsq.models import create_model
from zsq.quant import quantize_model
from zsq.synth.bns import batchnorm_layers
from zsq.synth.gdfq import build_gdfq_generator

MODELS = (("resnet20", 10, 32), ("resnet18", 1000, 224), ("resnet50", 1000, 224))
MODELS += (("mobilenet_v2", 1000, 224),)


def sizes() -> list[dict]:
    rows = []
    for name, classes, size in MODELS:
        teacher = create_model(name, num_classes=classes, in_channels=3)
        generator = build_gdfq_generator(classes, (3, size, size))
        student = quantize_model(teacher, image_shape=(3, size, size))
        student = sum(p.numel() for p in student.parameters())
        gen = sum(p.numel() for p in generator.parameters())
        bn = len(batchnorm_layers(teacher)) + len(batchnorm_layers(generator))
        rows.append(
            {
                "model": f"{name} @{size}px",
                "student_params": student,
                "generator_params": gen,
                "allreduce_MB": round((student + gen) * 4 / 1e6, 2),
                "small_allreduces": 4 * bn,
            }
        )
    return rows


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(rows: list[dict]) -> dict:
    """Median all-reduce time of each model's gradient buffer, and of one small statistic."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dist.get_backend() != "nccl":
        device = torch.device("cpu")
    out = {"world_size": dist.get_world_size(), "backend": dist.get_backend()}
    small = torch.ones(64, device=device)
    out["small_allreduce_us"] = round(_timed(lambda: dist.all_reduce(small), 50) * 1e6, 1)
    for row in rows:
        flat = torch.ones(row["student_params"] + row["generator_params"], device=device)
        out[row["model"]] = round(_timed(lambda flat=flat: dist.all_reduce(flat), 5) * 1e3, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", choices=("gloo", "nccl"), help="time real collectives")
    args = parser.parse_args()
    rows = sizes()
    result: dict = {"sizes": rows}
    if args.measure:
        if "WORLD_SIZE" not in os.environ:  # started by hand: be two local gloo processes
            parser.error("start it with torchrun, e.g. torchrun --nproc-per-node 2 " + __file__)
        if args.measure == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(args.measure)
        result["allreduce_ms"] = measure(rows)
        if dist.get_rank() != 0:
            dist.destroy_process_group()
            return
        dist.destroy_process_group()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
