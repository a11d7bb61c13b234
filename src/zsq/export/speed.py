"""What an exported model costs where it is deployed: latency, throughput, and the kernels
onnxruntime actually runs after its graph optimisations."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def latency(
    run: Callable[[np.ndarray], Any],
    image_shape: Sequence[int],
    batch: int,
    *,
    seconds: float = 1.0,
    min_repeats: int = 5,
    warmup: int = 3,
) -> dict[str, float]:
    """Median wall time of ``run`` on a batch of ``batch`` random images after ``warmup`` calls,
    repeated for ``seconds`` (at least ``min_repeats`` times): ms per image and images/s."""
    x = np.random.default_rng(0).standard_normal((batch, *image_shape)).astype(np.float32)
    for _ in range(warmup):
        run(x)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - started < seconds:
        tick = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - tick)
    per_batch = statistics.median(times)
    return {
        "batch": batch,
        "ms_per_image": round(per_batch / batch * 1e3, 4),
        "images_per_second": round(batch / per_batch, 1),
        "repeats": len(times),
    }


def session_runner(session: Any) -> Callable[[np.ndarray], Any]:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def optimized_ops(path: str | Path, level: str = "all", threads: int | None = None) -> Counter:
    """Operator counts of the graph onnxruntime runs for ``path`` after its optimisations at
    ``level`` (``basic`` or ``all``): ``QLinearConv``/``ConvInteger`` are integer kernels,
    ``DequantizeLinear`` before ``Conv`` is float arithmetic on dequantized weights."""
    import onnx
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        if threads is not None:
            options.intra_op_num_threads = threads
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return Counter(node.op_type for node in graph.node)


def ops_text(ops: Counter, top: int = 6) -> str:
    return ", ".join(f"{op} {count}" for op, count in ops.most_common(top))
