"""Issue 13's speed benchmark: the 100-probe Hutchinson trace and the top eigenvalue of a
ResNet-20 W4A4 student, one term, on one synthetic batch of 200 from the run's own generator.

    python benchmarks/hessian_speed.py runs/analysis-w4a4/cifar10-jpeg/gdfq+ait --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zsq.analysis.measure import (
    _student,
    _teacher,
    kl_settings,
    loss_functions,
    measured_weights,
    synthetic_batch,
)
from zsq.analysis.runs import finished_run
from zsq.numerics.hessian import hutchinson_trace, top_eigenpairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--iters", type=int, default=20, help="power iterations")
    parser.add_argument("--term", choices=("ce", "kl"), default="kl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    run = finished_run(args.run)
    student, info = _student(run, device)
    teacher = _teacher(run, info, None).to(device)
    batch = synthetic_batch(run, teacher, info, 200, 0, device)
    _, params = measured_weights(student)
    loss = loss_functions(student, batch, *kl_settings(run))[args.term]
    started = time.perf_counter()
    trace = hutchinson_trace(loss, params, probes=args.probes)
    traced = time.perf_counter()
    values, _ = top_eigenpairs(loss, params, k=1, iters=args.iters)
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "term": args.term,
                "threads": args.threads,
                "probes": args.probes,
                "trace": round(trace.mean, 2),
                "trace_std_error": round(trace.std_error, 2),
                "top_eigenvalue": round(values[0], 3),
                "trace_s": round(traced - started, 1),
                "eigen_s": round(done - traced, 1),
                "total_s": round(done - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
