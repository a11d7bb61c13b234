"""One run over several processes with torch.distributed (``torchrun``), identical on every rank.

``torchrun --nproc-per-node N -m zsq quantize ...`` starts N copies of the CLI; each finds its
rank in the environment torchrun sets and joins the process group (NCCL on GPUs, gloo on CPU).
Every rank draws its own share of each synthetic batch from its own RNG stream; what the share
changes is made global again so that the run is the single-process run on the concatenated batch:

- gradients of the student and of the sample source are averaged (:func:`average_gradients`);
- batch statistics that a step reads, the activation observers' min/max and the BatchNorm
  statistics of the generator and of the BNS loss, are reduced over the global batch while
  :func:`synced_statistics` is on (the trainer turns it on for its loop);
- evaluation counts are summed over each rank's shard of the evaluation set.

Identical gradients and optimiser states then give identical parameters and, for gradient
inundation, identical kappas on every rank with no extra communication. Only rank 0 writes.
A rank that dies makes the others' next collective fail (or time out after ``ZSQ_DIST_TIMEOUT``
seconds, default 600), so the run ends with an error and its last checkpoint, never a hang.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from zsq.errors import ConfigError, ZsqError

log = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_ENV = "ZSQ_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes (1 when not launched)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.size, "backend": self.backend}


def world() -> World:
    """The current process group as a :class:`World` (a single process when none is set up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(
        dist.get_rank(),
        dist.get_world_size(),
        int(os.environ.get("LOCAL_RANK", 0)),
        dist.get_backend(),
    )


def launched_size() -> int:
    """WORLD_SIZE as torchrun set it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def timeout_seconds() -> int:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = int(text)
    except ValueError:
        raise ZsqError(f"{TIMEOUT_ENV}={text!r} is not a whole number of seconds") from None
    if seconds < 1:
        raise ZsqError(f"{TIMEOUT_ENV} must be >= 1 second, got {seconds}")
    return seconds


def init_from_env(device: str | None = "auto") -> World:
    """Join the process group torchrun describes (no-op for a single process).

    The backend is NCCL when the run uses CUDA, gloo otherwise; each rank takes the GPU of its
    ``LOCAL_RANK``. Returns the :class:`World`; :func:`device_for` gives the rank's device.
    """
    if launched_size() <= 1 or dist.is_initialized():
        return world()
    if not dist.is_available():
        raise ZsqError("this torch build has no torch.distributed; run one process")
    cuda = device not in ("cpu",) and torch.cuda.is_available()
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"«device» {device!r} requested but CUDA is not available; use «device» cpu"
        )
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    unpin_default_group()
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()))
    current = world()
    log.info("rank %d of %d joined (%s)", current.rank, current.size, backend)
    return current


def device_for(name: str | None, current: World) -> str | None:
    """The device a rank runs on: its own GPU (``cuda:LOCAL_RANK``) when the run uses CUDA."""
    if not current.active or current.backend != "nccl":
        return name
    return f"cuda:{current.local_rank}"


def unpin_default_group() -> None:
    """Import ``torch.distributed.nn.functional`` before the process group exists.

    That module binds ``group.WORLD`` as default arguments when it is first imported. Imported
    after ``init_process_group`` (timm, ``torch._dynamo`` and FSDP import it), it keeps the group
    alive past ``destroy_process_group``. gloo's worker threads then free the last tensors of
    finished collectives while the interpreter shuts down, and the process aborts ("terminate
    called without an active exception"). Imported first, those defaults are None.
    """
    import torch.distributed.nn.functional  # noqa: F401


def shutdown() -> None:
    """Destroy the process group; gloo's worker threads are joined here, not at interpreter exit
    (see :func:`unpin_default_group`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_WORK_STARTED = False


def begin_work() -> None:
    """Mark the end of the checks: until then every process checks the same options, teacher
    and files alike, so an error then is every rank's (rank 0 says it); after it, an error may
    be one rank's own (its share of the data)."""
    global _WORK_STARTED
    _WORK_STARTED = True


def work_started() -> bool:
    return _WORK_STARTED


def reset_work() -> None:
    """Back to the checks (a new command in the same process)."""
    global _WORK_STARTED
    _WORK_STARTED = False


def rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank``'s own RNG stream, derived from the run's ``--seed``."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0])


def local_batch_size(batch_size: int, current: World) -> int:
    """Each rank's share of the global ``batch_size`` (which must divide evenly)."""
    if batch_size % current.size:
        raise ConfigError(
            f"the batch size {batch_size} does not split evenly over {current.size} processes; "
            f"use a multiple of {current.size} (the recipe field batch_size) or another process "
            "count",
        )
    return batch_size // current.size


# --- gradients -----------------------------------------------------------------------------
def average_gradients(params: Iterable[Tensor]) -> None:
    """Replace each ``.grad`` by its mean over ranks, in one flat all-reduce (no-op alone).

    A parameter without a gradient on every rank is skipped on every rank (its ``.grad`` is None
    everywhere: the ranks run the same graph).
    """
    current = world()
    if not current.active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= current.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def optimized_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def average_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The mean over ranks of each tensor (copies; the same tensors alone)."""
    current = world()
    if not current.active or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= current.size
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


# --- batch statistics over the global batch --------------------------------------------------
_SYNCING = False


@contextlib.contextmanager
def synced_statistics() -> Iterator[None]:
    """Within the block, batch statistics (observers, BatchNorm, BNS) cover every rank's share.

    Every rank must then run the same forward passes in the same order (the trainer's loop does).
    """
    global _SYNCING
    previous, _SYNCING = _SYNCING, world().active
    try:
        yield
    finally:
        _SYNCING = previous


def syncing() -> bool:
    return _SYNCING


def global_extremes(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """min and max over ranks (one all-reduce) while syncing; as given otherwise."""
    if not _SYNCING:
        return low, high
    both = torch.stack([-low.float(), high.float()])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return -both[0], both[1]


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks as well: each rank's
    inputs then get the gradient of the sum of every rank's loss."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


def _differentiable_sum(x: Tensor) -> Tensor:
    return _SumOverRanks.apply(x)


def global_mean_var(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of ``x`` over ``dims`` and every rank's share.

    Two passes (mean, then squared deviations) like a single process's ``var_mean``; gradients
    flow through both all-reduces to each rank's inputs. Returns the global sample count too.
    """
    count = 1
    for d in dims:
        count *= x.shape[d]
    total = count * world().size
    mean = _differentiable_sum(x.sum(dim=list(dims))) / total
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    deviation = x - mean.view(shape)
    var = _differentiable_sum((deviation * deviation).sum(dim=list(dims))) / total
    return mean, var, total


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training-mode statistics cover the global batch while syncing.

    torch's SyncBatchNorm runs on GPUs only; this one runs wherever the process group does and
    keeps BatchNorm's parameters, buffers and state-dict keys, so checkpoints are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _SYNCING):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        mean, var, total = global_mean_var(x.float(), dims)
        self._update_running(mean.detach(), var.detach(), total)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, total: int) -> None:
        if not self.track_running_stats or self.running_mean is None:
            return
        self.num_batches_tracked += 1
        momentum = self.momentum
        if momentum is None:  # cumulative average, as BatchNorm
            momentum = 1.0 / float(self.num_batches_tracked)
        unbiased = var * total / max(total - 1, 1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def use_global_batchnorm(module: nn.Module) -> int:
    """Turn every BatchNorm1d/2d/3d of ``module`` into a :class:`GlobalBatchNorm` in place.

    The class is swapped on the existing objects, so parameters, buffers and optimiser
    references stay as they are. Returns how many layers changed.
    """
    changed = 0
    for m in module.modules():
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            m.__class__ = GlobalBatchNorm
            changed += 1
    return changed


# --- rank 0 decides, every rank learns the outcome ------------------------------------------
def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (itself alone)."""
    if not world().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank ([obj] alone)."""
    current = world()
    if not current.active:
        return [obj]
    out: list[Any] = [None] * current.size
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and hand its result, or its ``ZsqError``, to every rank.

    Checks that only rank 0 can make (its output folder) then fail the same way everywhere
    instead of leaving the other ranks waiting in their next collective.
    """
    current = world()
    if not current.active:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    failure: ZsqError | None = None
    if current.is_main:
        try:
            outcome = ("ok", fn())
        except ConfigError as err:  # its marked options, so every rank words it alike
            outcome, failure = ("config", err.template), err
        except ZsqError as err:
            outcome, failure = ("error", str(err)), err
    outcome = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if outcome[0] == "config":
        raise ConfigError(outcome[1])
    if outcome[0] == "error":
        raise ZsqError(outcome[1])
    return outcome[1]


def _comm_device(current: World) -> torch.device:
    """Where a collective's own tensors live: NCCL reduces CUDA tensors only."""
    if current.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_counts(values: Sequence[int]) -> list[int]:
    """Integer counts summed over ranks (exact)."""
    current = world()
    if not current.active:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(current))
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def barrier() -> None:
    if world().active:
        dist.barrier()
