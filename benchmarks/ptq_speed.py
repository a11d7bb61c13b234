"""Speed of the post-training methods on the shared ResNet-20 (CIFAR-10-JPEG) teacher.

    PATH=.venv/bin:$PATH python benchmarks/ptq_speed.py [--threads 2] [--zeroq fp32,bf16] [--lapq]
        [--genie IMAGES]
    ZSQ_CPU_ALLOCATOR=system ... ptq_speed.py ...   # glibc's malloc defaults instead of the CLI's

ZeroQ: distil 512 images (500 steps, the reference's settings) at each precision given.
LAPQ: W4A4 on 512 real training images (the paper's calibration set size), every phase.
Genie-D: IMAGES images in batches of 128 at the `short` recipe's 80 iterations per batch (1,024
images: Genie `short`'s images, the largest part of its 15-minute target, issue 25).
One JSON line per measurement: wall seconds, threads, device. Targets (issue 11): ZeroQ 512
images under 5 minutes, LAPQ under 10 minutes, on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zsq.data import load_dataset
from zsq.execution import tune_cpu_allocator
from zsq.methods.genie import GENIE_RECIPES
from zsq.models import load_teacher
from zsq.paths import shared_data_dir
from zsq.ptq import LapqConfig, lapq_quantize, real_calibration
from zsq.quant import QuantSpec
from zsq.synth import ZeroQOptions, distill_images
from zsq.synth.genie import GenieOptions, distill_genie


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--zeroq", default="fp32,bf16", help="precisions to time ('' for none)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lapq", action="store_true", help="also time LAPQ W4A4 (real data)")
    parser.add_argument(
        "--genie",
        type=int,
        default=0,
        metavar="IMAGES",
        help="also time Genie-D on this many images (recipe short's iterations)",
    )
    args = parser.parse_args()
    allocator = "tuned" if tune_cpu_allocator() else "system"  # as the CLI
    torch.set_num_threads(args.threads)
    shared = shared_data_dir()
    teacher, meta = load_teacher("resnet20", str(shared / "weights/resnet20_cifar10jpeg.pt"))
    common = {
        "threads": args.threads,
        "device": "cpu",
        "teacher": "resnet20_cifar10jpeg",
        "allocator": allocator,
    }
    for precision in filter(None, args.zeroq.split(",")):
        torch.manual_seed(0)
        options = ZeroQOptions(steps=args.steps, precision=precision)
        started = time.perf_counter()
        _, report = distill_images(teacher, 512, (3, 32, 32), options, progress=False)
        seconds = time.perf_counter() - started
        layers = report["bn_mismatch"].values()
        print(
            json.dumps(
                {
                    "measure": "zeroq distil 512 images",
                    "precision": precision,
                    "steps": args.steps,
                    "passes": [b["images"] for b in report["batches"]],
                    "seconds": round(seconds, 1),
                    "loss_end": [b["loss_end"] for b in report["batches"]],
                    "mean_abs_error_std": round(
                        sum(v["mean_abs_error_std"] for v in layers) / len(layers), 4
                    ),
                    **common,
                }
            ),
            flush=True,
        )
    if args.lapq:
        train = load_dataset(
            f"cifar10-jpeg:{shared / 'cifar10-jpeg'}",
            split="train",
            normalize_mean=meta.normalize_mean,
            normalize_std=meta.normalize_std,
            channels=3,
            image_size=32,
            num_classes=10,
        )
        calib = real_calibration(train, 512, 0, "cifar10-jpeg")
        started = time.perf_counter()
        _, report = lapq_quantize(
            teacher, QuantSpec(wbits=4, abits=4), calib, LapqConfig(), progress=False
        )
        print(
            json.dumps(
                {
                    "measure": "lapq W4A4, 512 real images",
                    "seconds": round(time.perf_counter() - started, 1),
                    "phases": report["seconds"],
                    "loss_evaluations": report["loss_evaluations"],
                    "loss_final": report["loss_final"],
                    **common,
                }
            ),
            flush=True,
        )
    if args.genie:
        torch.manual_seed(0)
        options = GenieOptions(iters=GENIE_RECIPES["short"]["distill"]["iters"])
        started = time.perf_counter()
        _, report = distill_genie(teacher, args.genie, (3, 32, 32), options, progress=False)
        print(
            json.dumps(
                {
                    "measure": f"genie-d {args.genie} images",
                    "iters": options.iters,
                    "seconds": round(time.perf_counter() - started, 1),
                    "loss_last": report["loss_last"],
                    **common,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
