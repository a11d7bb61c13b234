"""Batch-norm statistics (BNS) loss: how far synthetic inputs are from the teacher's training data.

Every BatchNorm layer of a trained teacher remembers the mean and variance of its input over the
real training set (``running_mean``/``running_var``). A generator whose samples make each BN
layer's *batch* statistics match those running statistics produces inputs that look, layer by
layer, like the real data. GDFQ, Qimera, ARC and ZeroQ all use this signal.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsq import distributed
from zsq.errors import ZsqError
from zsq.models.introspect import batchnorm_layers

log = logging.getLogger(__name__)


def batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dim but 1, as BN computes them.

    Half-precision inputs are upcast so the statistics are compared in float32. In a run over
    several processes (:mod:`zsq.distributed`) they cover every rank's share of the batch.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    dims = [0, *range(2, x.dim())]
    if distributed.syncing():
        mean, var, _ = distributed.global_mean_var(x, dims)
        return mean, var
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


class BatchNormStatsLoss:
    """Records BN-input batch statistics of a teacher while enabled; turns them into the BNS loss.

    Usage::

        bns = BatchNormStatsLoss(teacher)
        with bns:                      # collect only during this forward
            logits = teacher(images)
        loss = bns.loss()              # mean over BN calls of MSE(mean) + MSE(var)
        bns.remove()                   # when done with the teacher

    Outside the ``with`` block the hooks return immediately, so the same teacher can be used for
    distillation targets or evaluation without recording anything. Each ``with`` starts a fresh
    record; a BN layer called twice inside one block contributes two terms.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise ZsqError(
                f"teacher {type(model).__name__} has no BatchNorm layers; GDFQ, Qimera, ARC and "
                "ZeroQ need BatchNorm running statistics to synthesise samples; use a teacher "
                "with BatchNorm (not fused into convs) or the 'gaussian' source"
            )
        self.enabled = False
        # (layer, batch mean, batch var) per BN call in the last enabled block.
        self.records: list[tuple[nn.Module, Tensor, Tensor]] = []
        self._layer_ids = {id(m) for m in self.layers}
        self._handles = [m.register_forward_pre_hook(self._make_hook()) for m in self.layers]
        log.debug("BNS loss hooked %d BatchNorm layers", len(self.layers))

    def _make_hook(self) -> Any:
        # A closure, not a bound method: ``copy.deepcopy`` of the teacher (e.g. to build a
        # student) shares a closure instead of cloning this object, and the id check then keeps
        # the copy's BN layers from recording into this loss.
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.enabled and id(module) in self._layer_ids:
                mean, var = batch_mean_var(args[0])
                self.records.append((module, mean, var))

        return hook

    def __enter__(self) -> BatchNormStatsLoss:
        if self.enabled:
            raise RuntimeError("BatchNormStatsLoss is already collecting; blocks cannot nest")
        if not self._handles:
            raise RuntimeError("BatchNormStatsLoss hooks were removed; build a new one")
        self.records = []
        self.enabled = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.enabled = False

    def loss(self) -> Tensor:
        """Mean over recorded BN calls of MSE(mean, running_mean) + MSE(biased var, running_var)."""
        if not self.records:
            raise ZsqError(
                "no BatchNorm statistics were recorded; run the teacher forward inside "
                "`with bns:` before calling bns.loss()"
            )
        terms = [
            F.mse_loss(mean, layer.running_mean.to(mean.dtype))
            + F.mse_loss(var, layer.running_var.to(var.dtype))
            for layer, mean, var in self.records
        ]
        return torch.stack(terms).mean()

    def remove(self) -> None:
        """Detach the hooks from the teacher (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.records = []
        self.enabled = False
