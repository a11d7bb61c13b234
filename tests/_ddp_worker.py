"""What each rank of the torch.distributed tests runs (a module so torch.multiprocessing can spawn
it): real gloo process groups on CPU, the library's own trainer and sources."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from tests._teachers import tiny_teacher
from torch.utils.data import TensorDataset

from zsq import distributed
from zsq.distill import Distiller
from zsq.evaluate import evaluate
from zsq.methods import GDFQ
from zsq.numerics.losses import kl_to_teacher
from zsq.quant import QuantSpec, quantize_model, set_observing
from zsq.runtime import seed_everything
from zsq.synth.gdfq import GdfqSource

GLOBAL_BATCH = 8
TINY_SCHEDULE = {
    "epochs": 4,
    "iters_per_epoch": 3,
    "batch_size": GLOBAL_BATCH,
    "gen_warmup_epochs": 1,
    "act_calib_epochs": 2,
    "probe_batch_size": 8,
}


def spawn(task: str, out: Path, world_size: int = 2) -> list[dict[str, Any]]:
    """Run ``task`` on ``world_size`` gloo ranks; each rank's result, in rank order."""
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(world_size, port, str(out), task), nprocs=world_size, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _rank_main(rank: int, world_size: int, port: int, out: str, task: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        ZSQ_DIST_TIMEOUT="60",
    )
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")  # as the CLI joins
    try:
        result = TASKS[task]()
        torch.save(result, Path(out) / f"rank{rank}.pt")
        distributed.barrier()
    finally:
        distributed.shutdown()


def eval_set(n: int = 37) -> TensorDataset:
    """An odd number of images, so the two shards differ in size."""
    gen = torch.Generator().manual_seed(5)
    return TensorDataset(
        torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    )


def train() -> dict[str, Any]:
    """A few epochs of GDFQ+AIT through the trainer: what every rank ends with."""
    seed_everything(0)
    teacher = tiny_teacher()
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=4), (3, 8, 8))
    source = GdfqSource(teacher, num_classes=10, image_shape=(3, 8, 8))
    recipe = GDFQ(recipe="demo", ait=True, overrides=TINY_SCHEDULE).resolved
    data = eval_set()
    trainer = Distiller(
        teacher,
        student,
        source,
        recipe,
        device=torch.device("cpu"),
        progress=False,
        evaluate=lambda s: evaluate(s, data, device="cpu", progress=False, distributed=True).top1,
    )
    history = trainer.fit()
    return {
        "eval_sharded": evaluate(
            student, data, device="cpu", progress=False, distributed=True
        ).top1,
        "eval_whole": evaluate(student, data, device="cpu", progress=False).top1,
        "student": {k: v.clone() for k, v in student.state_dict().items()},
        "source": {k: v.clone() for k, v in source.state_dict().items()},
        "history": history,
        "probe": trainer.probe.images.clone(),
        "local_batch": trainer.local_batch,
    }


def gradient_case(rank: int, world_size: int) -> dict[str, Any]:
    """Student and generator gradients from this rank's share of one fixed batch, averaged over
    ranks; with ``world_size`` 1 the single-process gradients of the whole batch."""
    seed_everything(0)
    teacher = tiny_teacher()
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=4), (3, 8, 8))
    source = GdfqSource(teacher, num_classes=10, image_shape=(3, 8, 8))
    distributed.use_global_batchnorm(source)
    share = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    images = (torch.randn(GLOBAL_BATCH, 3, 8, 8) * 1.3 + 0.2)[share]
    z = torch.randn(GLOBAL_BATCH, source.latent_dim)[share]
    cond, targets, _ = source.draw_targets(GLOBAL_BATCH)
    with distributed.synced_statistics():
        with torch.no_grad():
            student(images)  # activation ranges from the global batch
        set_observing(student, False)
        kl = kl_to_teacher(student(images), teacher(images), 4.0, "mean")
        kl.backward()
        distributed.average_gradients(student.parameters())
        fake = source.generate(z, cond[share])
        with source.bns:
            logits = source.teacher(fake)
        loss = source.generator_loss(logits, targets[share]) + source.bns_weight * source.bns.loss()
        loss.backward()
        distributed.average_gradients(source.parameters())
    return {
        "student": {n: p.grad.clone() for n, p in student.named_parameters()},
        "generator": {n: p.grad.clone() for n, p in source.named_parameters()},
        "ranges": {
            n: b.clone() for n, b in student.named_buffers() if n.endswith(("x_min", "x_max"))
        },
    }


def gradients() -> dict[str, Any]:
    current = distributed.world()
    return gradient_case(current.rank, current.size)


def vit_teacher() -> tuple[torch.nn.Module, Any]:
    from zsq.models import load_teacher
    from zsq.paths import shared_data_dir

    return load_teacher(None, shared_data_dir() / "weights" / "vit_fashionmnist.safetensors")


VIT_POOL = {"num_images": 4, "batch_size": 1, "steps": 2, "progress": False}


def vit_pool() -> dict[str, Any]:
    """A MimiQ pool made under torchrun, each rank starting from its own RNG stream."""
    from zsq.synth.mimiq import MimiqSource

    torch.manual_seed(100 + distributed.world().rank)
    teacher, meta = vit_teacher()
    source = MimiqSource(teacher, num_classes=10, image_shape=(1, 28, 28), **VIT_POOL)
    return {"images": source.images().clone(), "labels": source.labels().clone()}


def vit_train() -> dict[str, Any]:
    """MimiQ+AIT (KL, attention distillation, GI) through the API over the ranks."""
    import zsq

    teacher, meta = vit_teacher()
    method = zsq.MimiQ(
        ait=True,
        recipe="demo",
        overrides={**TINY_SCHEDULE, "epochs": 3, "iters_per_epoch": 2},
        source_options={k: v for k, v in VIT_POOL.items() if k != "progress"},
    )
    result = zsq.quantize(
        teacher, method, image_shape=(1, 28, 28), num_classes=10, device="cpu", progress=False
    )
    state = {k: v.clone() for k, v in result.student.state_dict().items()}
    return {"student": state, "history": result.history}


def teardown() -> dict[str, Any]:
    """Import what timm and torch._dynamo import once the group exists, then shut it down: how
    many gloo worker threads outlive the shutdown (each could abort the exit)."""
    import torch.distributed.nn  # noqa: F401

    distributed.broadcast_object({"a": torch.ones(3)})  # a collective holding Python tensors
    distributed.barrier()
    distributed.shutdown()
    return {"gloo_threads_left": gloo_worker_threads()}


def gloo_worker_threads() -> int:
    tasks = Path("/proc/self/task")
    return sum(
        (t / "comm").read_text().strip() == "pt_gloo_runloop"
        for t in tasks.iterdir()
        if (t / "comm").exists()
    )


TASKS = {
    "train": train,
    "gradients": gradients,
    "vit_pool": vit_pool,
    "vit_train": vit_train,
    "teardown": teardown,
}
