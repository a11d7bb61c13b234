"""Generator + student distillation, the GDFQ schedule with AIT's switches.

One epoch is ``iters_per_epoch`` iterations; each draws a synthetic batch (updating a trainable
source once against the teacher) and, after the generator warm-up, takes one student step on the
same batch. During the first ``act_calib_epochs`` the student's activation ranges follow an EMA of
batch min/max; then they are frozen. All learning rates (and rho) are multiplied by ``lr_gamma`` at
``lr_milestones``. Everything the schedule needs is derived from the epoch number, so a checkpoint
of (models, optimisers, RNG, probe batch, epoch) resumes exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from zsq import distributed
from zsq.distill.inundation import CrossingMeter, GradientInundation, InundationStats
from zsq.errors import ZsqError
from zsq.execution import Execution, compile_in_place, release_compiled
from zsq.io import read_verified, write_text, write_verified
from zsq.layout import RunLayout, is_resume_marker
from zsq.numerics import GradientMeter, cosine_similarity, grads_or_zeros
from zsq.numerics.losses import kl_to_teacher, soft_cross_entropy
from zsq.quant import prepare_buffers, quant_layers, quantizer_settings, set_observing
from zsq.recipes import DistillRecipe
from zsq.runtime import module_digest, rng_state, seed_everything, set_rng_state
from zsq.synth import SampleSource, SynthBatch

log = logging.getLogger(__name__)

ETA_AFTER_ITERATIONS = 5  # iterations timed before the log estimates how long the run takes
Evaluator = Callable[[nn.Module], float]


def build_optimizer(params: list[nn.Parameter], recipe: DistillRecipe) -> torch.optim.Optimizer:
    """The student optimiser with the reference code's settings (Nesterov SGD; Table 3's Adam
    with eps 1e-5 and RMSprop with alpha 0.9, eps 1.0, momentum 0.9)."""
    lr = recipe.student_lr * recipe.lr_mult
    wd = recipe.weight_decay
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=recipe.momentum, nesterov=True, weight_decay=wd
        )
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, eps=1e-5, weight_decay=wd)
    if recipe.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1.0, momentum=0.9, weight_decay=wd)
    raise ZsqError(f"unknown optimizer {recipe.optimizer!r}")


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"about {seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds:.0f} s"


def accumulate(total: Tensor | None, value: Tensor) -> Tensor:
    """``total + value``; the first value is copied, since under CUDA graphs a compiled call's
    output is overwritten by a later replay (:meth:`Execution.begin_step`)."""
    return value.clone() if total is None else total + value


def owned(value: Tensor | None) -> Tensor | None:
    """A copy that outlives the CUDA-graph step that produced ``value``."""
    return None if value is None else value.clone()


@dataclass
class _EpochTotals:
    """Sums kept on the device during an epoch; read once at its end (one host sync)."""

    terms: dict[str, Tensor]
    fraction: Tensor | None = None
    kappa: Tensor | None = None
    grad_cosines: list[float] = field(default_factory=list)  # CE/KL, measured steps
    student_steps: int = 0
    source_steps: int = 0

    def add_terms(self, terms: dict[str, Tensor]) -> None:
        for key, value in terms.items():
            self.terms[key] = accumulate(self.terms.get(key), value.detach().float())


class Distiller:
    """Trains ``student`` to match ``teacher`` on samples from ``source`` as ``recipe`` says.

    ``work_dir`` receives ``metrics.jsonl`` and ``checkpoint/last.pt`` every epoch; ``evaluate``
    (optional) scores the student on real data for the log only, never to select or train.
    ``execution`` sets precision and ``torch.compile`` (see :mod:`zsq.execution`); compiled
    modules get their eager forward back from :meth:`close`. Under ``torchrun`` every rank runs
    this loop on its share of each batch (:mod:`zsq.distributed`); rank 0 writes.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        source: SampleSource,
        recipe: DistillRecipe,
        *,
        device: torch.device,
        work_dir: Path | None = None,
        evaluate: Evaluator | None = None,
        progress: bool = True,
        execution: Execution | None = None,
    ) -> None:
        self.teacher = teacher.eval()
        self.student = student
        self.source = source
        self.recipe = recipe
        self.device = device
        self.work_dir = work_dir
        self.evaluate = evaluate
        self.progress = progress
        self.execution = execution or Execution()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        for p in self.student.parameters():  # the student may be a copy of a frozen teacher
            p.requires_grad_(True)

        self.world = distributed.world()
        self.local_batch = distributed.local_batch_size(recipe.batch_size, self.world)
        if self.world.active:
            self._join_ranks()
        self.layers = list(quant_layers(student))
        self.optimizer = build_optimizer(list(student.parameters()), recipe)
        self.gi = (
            GradientInundation(
                self.optimizer,
                self.layers,
                rho=recipe.rho,
                max_kappa=recipe.max_kappa,
                count=recipe.gi_count,
                search=recipe.gi_search,
                compile_mode=self.execution.compile,
            )
            if recipe.gi
            else None
        )
        self.crossings = CrossingMeter(self.layers, count=recipe.gi_count)
        self.layer_names = [n for n, _ in self.crossings.layers]  # the layers GI and counts see
        self._weights = [layer.weight for _, layer in self.crossings.layers]
        self.grad_meter = GradientMeter()  # used when recipe.analyze_every is set
        self.attention_teacher = self._attention_teacher() if recipe.attn_distill else None
        self.optimizers = [self.optimizer]
        if source.optimizer is not None:
            self.optimizers.append(source.optimizer)
        self.base_lrs = [[g["lr"] for g in opt.param_groups] for opt in self.optimizers]
        self.epoch = 0
        self.probe: SynthBatch | None = None
        self.history: list[dict[str, Any]] = []
        source.forward_precision = lambda: self.execution.autocast(device)
        self._compiled: list[nn.Module] = []
        if self.execution.compile:
            modules = [teacher, student, *source.children()]
            self._compiled = compile_in_place(modules, self.execution.compile)

    def _join_ranks(self) -> None:
        """Rank 0's student and source everywhere, global BatchNorm statistics in the source,
        and this rank's own RNG stream for its share of the samples."""
        for module in (self.student, self.source):
            for tensor in module.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        distributed.use_global_batchnorm(self.source)
        seed = distributed.rank_seed(torch.initial_seed(), self.world.rank)
        seed_everything(seed)

    def _attention_teacher(self) -> nn.Module:
        """A float copy of the ViT teacher that keeps its attention maps, and the student set to
        keep its own (MimiQ's head-wise attention distillation)."""
        from zsq.quant.attention import attention_modules, expose_attention, set_keep_attention

        if not attention_modules(self.student):
            raise ZsqError(
                "attn_distill needs a vision transformer (timm attention modules); drop "
                "the recipe field attn_distill for this model"
            )
        set_keep_attention(self.student, True)
        copy = expose_attention(self.teacher)
        set_keep_attention(copy, True)
        return copy

    def close(self) -> None:
        """Undo what the trainer did to shared objects: compiled forwards, the source's autocast."""
        release_compiled(self._compiled)
        self._compiled = []
        self.source.forward_precision = contextlib.nullcontext

    # --- schedule, derived from the epoch number --------------------------------------------
    def decay_at(self, epoch: int) -> float:
        """Factor on every learning rate and on rho: gamma per milestone reached."""
        passed = sum(1 for m in self.recipe.lr_milestones if epoch >= m)
        return self.recipe.lr_gamma**passed

    def apply_schedule(self, epoch: int) -> None:
        decay = self.decay_at(epoch)
        for opt, base in zip(self.optimizers, self.base_lrs, strict=True):
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"] = lr * decay
        set_observing(self.student, epoch < self.recipe.act_calib_epochs)
        if self.gi is not None:
            self.gi.rho = self.recipe.rho * decay
            self.gi.warmup = self.in_gi_warmup(epoch)

    def in_gi_warmup(self, epoch: int) -> bool:
        start = self.recipe.gen_warmup_epochs
        return start <= epoch < start + self.recipe.gi_warmup_epochs

    def trains_student(self, epoch: int) -> bool:
        return epoch >= self.recipe.gen_warmup_epochs

    # --- the loop --------------------------------------------------------------------------
    def fit(self, max_epochs: int | None = None) -> list[dict[str, Any]]:
        """Run (or continue) training to ``recipe.epochs``; returns the per-epoch metrics.

        ``max_epochs`` stops after that many more epochs (a time-sliced job; resume later).
        """
        stop = (
            self.recipe.epochs
            if max_epochs is None
            else min(self.recipe.epochs, self.epoch + max_epochs)
        )
        self._eta_pending = {False, True}  # one estimate per phase: warm-up, student epochs
        while self.epoch < stop:
            started = time.perf_counter()
            with self.execution.tensor_core_scope(), distributed.synced_statistics():
                metrics = self.train_epoch(self.epoch)
            metrics["seconds"] = round(time.perf_counter() - started, 3)
            self.history.append(metrics)
            self.epoch += 1
            self._log_epoch(metrics)
            self.save_checkpoint()
        if self.epoch >= self.recipe.act_calib_epochs:
            set_observing(self.student, False)
        return self.history

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        self.student.eval()  # BN uses the teacher's running statistics, as in the reference
        self.apply_schedule(epoch)
        if self.trains_student(epoch) and self.probe is None:
            self.execution.begin_step()
            probe = self.source.sample(self.recipe.probe_batch_size)
            self.probe = SynthBatch(**{k: owned(v) for k, v in vars(probe).items()})
        totals = _EpochTotals(terms={})
        bar = tqdm(
            range(self.recipe.iters_per_epoch),
            desc=f"epoch {epoch + 1}/{self.recipe.epochs}",
            disable=not self.progress,
            leave=False,
        )
        started = time.perf_counter()
        for i in bar:
            if i == min(ETA_AFTER_ITERATIONS, self.recipe.iters_per_epoch - 1):
                self._log_eta(epoch, i, started)
            self.execution.begin_step()
            batch, source_terms = self.source.step(self.local_batch)
            totals.add_terms(source_terms)
            totals.source_steps += 1
            if self.trains_student(epoch):
                every = self.recipe.analyze_every
                measure = every is not None and i % every == 0
                terms, fraction, kappa = self.student_step(batch, totals if measure else None)
                totals.add_terms(terms)
                totals.fraction = accumulate(totals.fraction, fraction)
                if kappa is not None:
                    totals.kappa = accumulate(totals.kappa, kappa)
                totals.student_steps += 1
            else:
                with torch.no_grad():
                    self.student(batch.images)  # observe activation ranges only
        return self._epoch_metrics(epoch, totals)

    def _log_eta(self, epoch: int, done: int, started: float) -> None:
        """Once per phase of a ``fit``: the time ``done`` iterations took, extrapolated."""
        phase = self.trains_student(epoch)
        pending = getattr(self, "_eta_pending", set())
        if done == 0 or phase not in pending:
            return
        pending.discard(phase)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once: the queued iterations must count
        per_iteration = (time.perf_counter() - started) / done
        left = (self.recipe.epochs - epoch) * self.recipe.iters_per_epoch - done
        log.info(
            "%.3g s per %s iteration: %s for the %d iterations left%s",
            per_iteration,
            "student" if phase else "generator warm-up",
            _duration(per_iteration * left),
            left,
            "" if phase else " (at least: student iterations cost more, estimated when they start)",
        )

    def student_step(
        self, batch: SynthBatch, measure: _EpochTotals | None = None
    ) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
        """One optimiser step of the student on ``batch``. Returns loss terms, per-layer share
        of weight levels changed, and per-layer kappa (GI only); all device tensors. With
        ``measure`` (every ``analyze_every`` steps) the CE/KL gradient cosine goes into it and
        the applied gradient into the epoch mean, without changing the update."""
        teacher = self.attention_teacher or self.teacher
        with torch.no_grad(), self.execution.autocast(self.device):
            teacher_logits = teacher(batch.images).float()
        student_logits = self.student(batch.images)
        terms: dict[str, Tensor] = {}
        if self.attention_teacher is not None:
            terms["student_attn"] = self.recipe.attn_distill * self._attention_loss()
        if "kl" in self.recipe.loss:
            terms["student_kl"] = kl_to_teacher(
                student_logits, teacher_logits, self.recipe.temperature, self.recipe.kl_reduction
            )
        if "ce" in self.recipe.loss:
            terms["student_ce"] = soft_cross_entropy(student_logits, batch.targets)
        loss = sum(terms.values())
        if measure is not None:
            measure.grad_cosines.append(self._ce_kl_cosine(student_logits, teacher_logits, batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.student.parameters())
        if measure is not None:
            self.grad_meter.update(grads_or_zeros([w.grad for w in self._weights], self._weights))
        if self.gi is not None:
            stats: InundationStats = self.gi.step()
            return terms, stats.fraction, stats.kappa
        self.crossings.before()
        self.optimizer.step()
        return terms, self.crossings.after(), None

    def _attention_loss(self) -> Tensor:
        from zsq.distill.attention import structural_attention_loss
        from zsq.models.introspect import vit_layout
        from zsq.quant.attention import attention_maps

        prefix, grid = vit_layout(self.teacher)
        return structural_attention_loss(
            attention_maps(self.student), attention_maps(self.attention_teacher), prefix, grid
        )

    # --- measurement -----------------------------------------------------------------------
    def _ce_kl_cosine(
        self, student_logits: Tensor, teacher_logits: Tensor, batch: SynthBatch
    ) -> float:
        """Cosine between the CE and KL gradients at the quantized weights (paper Figs. 1, 5b),
        whichever loss the run trains with; the graph is kept for the update's backward."""
        ce = soft_cross_entropy(student_logits, batch.targets)
        kl = kl_to_teacher(
            student_logits, teacher_logits, self.recipe.temperature, self.recipe.kl_reduction
        )
        weights = self._weights
        g_ce = torch.autograd.grad(ce, weights, retain_graph=True, allow_unused=True)
        g_kl = torch.autograd.grad(kl, weights, retain_graph=True, allow_unused=True)
        g_ce, g_kl = grads_or_zeros(g_ce, weights), grads_or_zeros(g_kl, weights)
        n = len(g_ce)
        both = distributed.average_tensors([*g_ce, *g_kl])  # the global batch's gradients
        return cosine_similarity(both[:n], both[n:])

    @torch.no_grad()
    def probe_metrics(self) -> dict[str, float]:
        """True KL(teacher || student) (T=1, per sample) and top-1 agreement on the fixed batch."""
        if self.probe is None:
            return {}
        x = self.probe.images
        t, s = self.teacher(x), self.student(x)
        kl = kl_to_teacher(s, t, temperature=1.0, reduction="batchmean")
        agree = (t.argmax(1) == s.argmax(1)).float().mean() * 100
        return {"probe_kl": float(kl), "probe_agreement": float(agree)}

    def _epoch_metrics(self, epoch: int, totals: _EpochTotals) -> dict[str, Any]:
        metrics: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        for key, value in totals.terms.items():
            steps = totals.student_steps if key.startswith("student") else totals.source_steps
            metrics[key] = float(value) / max(steps, 1)
        if totals.fraction is not None:
            share = (totals.fraction / totals.student_steps).tolist()
            metrics["crossing_fraction"] = dict(zip(self.layer_names, share, strict=True))
        if totals.kappa is not None:
            kappa = (totals.kappa / totals.student_steps).tolist()
            metrics["kappa"] = dict(zip(self.layer_names, kappa, strict=True))
            metrics["rho"] = self.gi.rho
        if totals.grad_cosines:
            metrics["grad_cos_ce_kl"] = sum(totals.grad_cosines) / len(totals.grad_cosines)
            metrics["grad_cos_ce_kl_steps"] = totals.grad_cosines
            metrics["grad_cos_epoch"] = self.grad_meter.end_epoch()
        if self.trains_student(epoch):
            self.execution.begin_step()  # the probe and evaluation forwards: a graph step
            set_observing(self.student, False)  # measuring must not move ranges; reset per epoch
            metrics.update(self.probe_metrics())
            last = epoch + 1 == self.recipe.epochs
            if self.evaluate is not None and ((epoch + 1) % self.recipe.eval_every == 0 or last):
                metrics["eval_top1"] = self.evaluate(self.student)
        return metrics

    def _log_epoch(self, m: dict[str, Any]) -> None:
        parts = [f"epoch {m['epoch']}/{self.recipe.epochs}"]
        for key in ("gen_loss", "student_kl", "student_ce", "probe_kl", "eval_top1"):
            if key in m and not math.isnan(m[key]):
                parts.append(f"{key} {m[key]:.4g}")
        if "crossing_fraction" in m:
            values = list(m["crossing_fraction"].values())
            parts.append(f"crossing mean {sum(values) / len(values):.2e}")
        parts.append(f"{m['seconds']:.1f}s")
        log.info("  ".join(parts))

    # --- checkpoints ------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path | None:
        return None if self.work_dir is None else RunLayout(Path(self.work_dir)).checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "student": self.student.state_dict(),
            "source": self.source.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "source_optimizer": (
                None if self.source.optimizer is None else self.source.optimizer.state_dict()
            ),
            "gi": None if self.gi is None else self.gi.state_dict(),
            "grad_mean": self.grad_meter.previous_mean,
            "probe": None if self.probe is None else vars(self.probe),
            "history": json.dumps(self.history),
            "recipe": json.dumps(self.recipe.to_dict()),
            "teacher": self._teacher_digest(),
            "quantizers": json.dumps(quantizer_settings(self.student)),
            "rng": rng_state(),
            "world_size": self.world.size,
        }

    def _teacher_digest(self) -> str:
        """sha256 of the teacher's tensors, computed once (the teacher is frozen): a resume with
        another teacher of the same shape is refused instead of silently mixing two."""
        if getattr(self, "_teacher_sha256", None) is None:
            self._teacher_sha256 = module_digest(self.teacher)
        return self._teacher_sha256

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        prepare_buffers(self.student, state["student"])  # e.g. the grids a reconstruction left
        self.student.load_state_dict(state["student"])
        self.crossings.regroup()  # the codes are counted on those grids
        if self.gi is not None:
            self.gi.regroup()
        self.source.load_state_dict(state["source"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.source.optimizer is not None:
            self.source.optimizer.load_state_dict(state["source_optimizer"])
        if self.gi is not None:
            self.gi.load_state_dict(state["gi"])
        self.probe = (
            None if state["probe"] is None else SynthBatch(**state["probe"]).to(self.device)
        )
        self.history = json.loads(state["history"])
        previous = state.get("grad_mean")  # loaded on the CPU
        self.grad_meter.previous_mean = None if previous is None else previous.to(self.device)
        ranks = state.get("rng_ranks")
        set_rng_state(state["rng"] if ranks is None else ranks[self.world.rank])

    def save_checkpoint(self) -> None:
        """Rank 0 writes (atomically, with its sha256); every rank's RNG state goes in."""
        path = self._checkpoint_path()
        if path is None:
            return
        rngs = distributed.gather_objects(rng_state()) if self.world.active else None
        if not self.world.is_main:
            return
        state = self.state_dict()
        if rngs is not None:
            state["rng_ranks"] = rngs
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_verified(path, buffer.getvalue())  # with its sha256: a damaged file is refused
        lines = "".join(json.dumps(m) + "\n" for m in self.history)
        write_text(RunLayout(Path(self.work_dir)).metrics, lines)

    def resume(self) -> bool:
        """Load ``checkpoint/last.pt`` if present (returns whether it did; not when it is only
        the marker a run's start leaves before the distillation trains).

        Refuses (``ZsqError``) a checkpoint whose sha256 does not match, one made with another
        recipe, and one whose tensors do not fit this student and source (another teacher).
        """
        path = self._checkpoint_path()
        if path is None:
            return False
        payload = distributed.on_main(lambda: read_verified(path) if path.exists() else None)
        if payload is None or is_resume_marker(payload):  # a start's marker: nothing trained yet
            return False
        try:
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file: say which and what to do
            raise ZsqError(
                f"cannot read checkpoint {path} ({err}); remove it or start again"
            ) from None
        saved = _with_new_fields(json.loads(state["recipe"]))
        current = json.loads(json.dumps(self.recipe.to_dict()))  # tuples read back as lists
        if saved != current:
            changed = sorted(k for k in {*saved, *current} if saved.get(k) != current.get(k))
            raise ZsqError(
                f"checkpoint {path} was made with a different recipe (fields {changed}); resume "
                "with the same options"
            )
        saved_world = state.get("world_size", 1)
        if saved_world != self.world.size:
            raise ZsqError(
                f"checkpoint {path} was made by {saved_world} process(es), this run has "
                f"{self.world.size}; resume with --nproc-per-node (times nodes) = {saved_world}"
            )
        if state.get("teacher", self._teacher_digest()) != self._teacher_digest():
            raise ZsqError(
                f"checkpoint {path} was made with another teacher (its weights differ); resume "
                "with the teacher the run started with"
            )
        self._check_quantizers(path, state.get("quantizers"))
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as err:  # torch's message spans many lines
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = (lines[1] if len(lines) > 1 else lines[0])[:160] if lines else repr(err)
            raise ZsqError(
                f"checkpoint {path} does not fit this teacher and method ({detail}); resume with "
                "the teacher and options the run started with"
            ) from None
        log.info("resumed from %s at epoch %d/%d", path, self.epoch, self.recipe.epochs)
        return True

    def _check_quantizers(self, path: Path, saved: str | None) -> None:
        """The checkpoint's student quantized as this one (bits, granularity, ...): the state
        dict alone would load a W4A4 student into a W2A8 one without complaint."""
        if saved is None:  # written before checkpoints recorded it
            return
        before, now = json.loads(saved), json.loads(json.dumps(quantizer_settings(self.student)))
        changed = [name for name in {**before, **now} if before.get(name) != now.get(name)]
        if changed:
            name = changed[0]
            raise ZsqError(
                f"checkpoint {path} was made with other quantizer settings ({len(changed)} "
                f"quantizers differ, e.g. {name!r}: {before.get(name)} -> {now.get(name)}); "
                "resume with the bits and quantization options the run started with"
            )


def _with_new_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recipe with the fields added to ``DistillRecipe`` since it was written
    at their defaults: the run that wrote it behaved as the default does."""
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(DistillRecipe)
        if f.default is not dataclasses.MISSING
    }
    return json.loads(json.dumps({**defaults, **saved}))
