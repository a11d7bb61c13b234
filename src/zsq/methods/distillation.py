"""The distillation methods' shared config and handler: the student learns from the teacher on
synthetic samples drawn from the method's sample source, on a recipe's schedule, with AIT's
changes (KL-only loss, gradient inundation) when ``ait`` is set.

A distillation method is a subclass of :class:`Distillation` naming its sample source (and the
recipe fields it sets), registered with :class:`DistillationHandler` (gdfq.py, qimera.py, ...).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from zsq import distributed
from zsq.distill import Distiller
from zsq.errors import ConfigError, ZsqError
from zsq.execution import Execution
from zsq.io import save_safetensors
from zsq.layout import RunLayout
from zsq.methods.base import (
    Context,
    MethodConfig,
    MethodHandler,
    Outcome,
    method_of,
    startable_methods,
)
from zsq.quant import quantize_model
from zsq.recipes import AIT_CHANGES, DistillRecipe, apply_overrides, get_recipe
from zsq.synth import build_source, check_source_options

log = logging.getLogger(__name__)

DEFAULT_RECIPE = "paper-cifar"  # what runs when no recipe is named: the papers' schedule
SMOKE_SCHEDULE = {  # three epochs of two iterations: every phase of the schedule, in seconds
    "epochs": 3,
    "iters_per_epoch": 2,
    "batch_size": 4,
    "gen_warmup_epochs": 1,
    "act_calib_epochs": 1,
    "lr_milestones": (),
    "probe_batch_size": 8,
}


@dataclass(frozen=True)
class Distillation(MethodConfig):
    """A student distilled on synthetic samples.

    ``recipe``: a preset (``paper-cifar`` when None: the papers' 80,000 iterations; ``short``
    runs in minutes on a CPU) or a :class:`~zsq.recipes.DistillRecipe`; ``ait``: AIT's changes
    (KL-only loss, gradient inundation, no weight decay); ``overrides``: recipe fields
    (``{"epochs": 10}``; text is read as ``--set`` reads it); ``source_options``: the sample
    source's (e.g. Qimera's ``mix_prob``); ``execution``: precision and ``torch.compile`` (speed
    only); ``init``: a post-training config (e.g. ``LAPQ()``) whose student the distillation
    starts from instead of the float copy.
    """

    ait: bool = False
    recipe: str | DistillRecipe | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    source_options: Mapping[str, Any] = field(default_factory=dict)
    execution: Execution = field(default_factory=Execution)
    init: MethodConfig | None = None
    resolved: DistillRecipe = field(init=False, repr=False, compare=False)

    SOURCE: ClassVar[str] = ""  # the sample source the student is distilled on
    RECIPE_CHANGES: ClassVar[Mapping[str, Any]] = {}  # fields the method sets before overrides
    SPEED_FIELDS: ClassVar[tuple[str, ...]] = ("execution",)
    REFUSAL: ClassVar[str] = (
        "its activation ranges come from its synthetic samples, and calibration data only serves "
        "a post-training start («init»): drop {it}, start from one («init» lapq), or use a "
        "method that takes {it}"
    )

    @classmethod
    def smoke(cls):
        return cls(recipe="demo", overrides=SMOKE_SCHEDULE)

    def __post_init__(self) -> None:
        if not isinstance(self.ait, bool):
            raise ConfigError(f"«ait» must be True or False, got {self.ait!r:.60}")
        if not isinstance(self.overrides, (Mapping, list)):
            raise ConfigError(
                f"«overrides» must be a dict of recipe field -> value, got {self.overrides!r:.60}",
            )
        if not isinstance(self.source_options, Mapping):
            raise ConfigError(
                f"«source_options» must be a dict of option -> value, got "
                f"{self.source_options!r:.60}",
            )
        if not isinstance(self.execution, Execution):
            raise ConfigError(
                f"«execution» must be a zsq.execution.Execution, got {self.execution!r:.60}",
            )
        object.__setattr__(self, "resolved", self._resolve_recipe())
        check_source_options(self.SOURCE, dict(self.source_options))
        self._check_init()

    def _resolve_recipe(self) -> DistillRecipe:
        """The preset, then AIT's changes, then the method's own, then the overrides."""
        recipe = self.recipe
        if recipe is not None and not isinstance(recipe, (str, DistillRecipe)):
            raise ConfigError(
                f"«recipe» must be a preset name or a DistillRecipe, got {recipe!r:.60}",
            )
        base = recipe if isinstance(recipe, DistillRecipe) else get_recipe(recipe or DEFAULT_RECIPE)
        if self.ait:
            base = apply_overrides(base, AIT_CHANGES)
        base = apply_overrides(base, dict(self.RECIPE_CHANGES))
        return apply_overrides(base, self.overrides)

    def _check_init(self) -> None:
        if self.init is None:
            return
        starts = startable_methods()
        if not isinstance(self.init, MethodConfig) or not method_of(self.init).handler.can_start:
            shown = type(self.init).__name__
            raise ConfigError(
                f"«init» must be the config of a method a distillation can start from "
                f"({', '.join(starts)}), got {shown}",
            )

    def record(self) -> dict[str, Any]:
        """The resolved recipe stands for the preset and its overrides."""
        record = super().record()
        for name in ("recipe", "overrides"):
            record.pop(name)
        return {**record, "recipe": self.resolved.to_dict()}

    def sample_sources(self) -> list[tuple[str, str]]:
        own = [(self.SOURCE, f"«method» {self.method}")]
        return own + (self.init.sample_sources() if self.init is not None else [])

    def datasets(self) -> list[tuple[str, str]]:
        return self.init.datasets() if self.init is not None else []

    def source_defaults(self, layout: RunLayout | None, progress: bool) -> dict[str, Any]:
        """Options of the sample source that come from the run, not the user: a BatchNorm
        generator's lr and BNS weight from the recipe."""
        return {"lr": self.resolved.gen_lr, "bns_weight": self.resolved.bns_weight}


def run_size(recipe: DistillRecipe) -> str:
    """'400 epochs x 200 iterations x batch 200 = 80,000 iterations', for the log."""
    total = recipe.epochs * recipe.iters_per_epoch
    return (
        f"{recipe.epochs} epochs x {recipe.iters_per_epoch} iterations x batch "
        f"{recipe.batch_size} = {total:,} iterations"
    )


class DistillationHandler(MethodHandler):
    """Builds the student (from ``init``'s result when given) and the sample source, then trains
    with :class:`~zsq.distill.Distiller`, resuming from the run folder's checkpoint."""

    multi_process = True

    def run(self, config: Distillation, ctx: Context) -> Outcome:
        recipe = config.resolved
        note = config.execution.inert_note(ctx.device)
        if note:
            log.info(note)
        if config.recipe is None:
            log.warning(
                "no recipe given: using %s, the papers' full schedule (%s; days on a CPU, an "
                "estimate follows the first iterations); name one (recipe short: minutes) for less",
                DEFAULT_RECIPE,
                run_size(recipe),
            )
        log.info("%s with recipe %s: %s", config.method, recipe.name, run_size(recipe))
        spec = ctx.quant
        if config.init is not None:  # the student the start fits
            spec = method_of(config.init).handler.spec(config.init, spec, ctx.teacher)
        student = quantize_model(ctx.teacher, spec, ctx.image_shape).to(ctx.device)  # first
        init = self._start(config, ctx, student, self._distilled_before(ctx))
        options = config.source_defaults(ctx.layout, ctx.progress) | dict(config.source_options)
        source = build_source(
            config.SOURCE,
            ctx.teacher,
            num_classes=ctx.num_classes,
            image_shape=ctx.image_shape,
            checked=True,  # by the config and the run
            **options,
        ).to(ctx.device)
        trainer = None
        try:
            trainer = Distiller(
                ctx.teacher,
                student,
                source,
                recipe,
                device=ctx.device,
                work_dir=ctx.layout.folder if ctx.layout is not None else None,
                evaluate=ctx.evaluate,
                progress=ctx.progress,
                execution=config.execution,
            )
            # a run stopped while its start was made has no distillation state yet: the
            # start went on above, the distillation begins now
            if ctx.resume and not trainer.resume() and config.init is None:
                raise ZsqError("no checkpoint to resume in the run folder; start it again")
            history = trainer.fit()
            _keep_source(source, ctx.layout)
        finally:
            if trainer is not None:
                trainer.close()
            source.close()
        last = history[-1] if history else {}
        report = {
            "method": config.method + ("+ait" if config.ait else ""),
            "recipe": recipe.to_dict(),
            "calibration": (
                "EMA of synthetic batches over the first "
                f"{recipe.act_calib_epochs} epochs (data-free)"
            ),
            "execution": vars(config.execution),
            "source_options": dict(config.source_options),
            "final_probe_kl": last.get("probe_kl"),
            "epochs_run": len(history),
            "metrics": RunLayout.METRICS,
            "init": init,
        }
        if init is not None:
            report["real_data"] = init["real_data"]
        return Outcome(student, report, history, quant=spec)

    @staticmethod
    def _distilled_before(ctx: Context) -> bool:
        """Whether the resumed run's checkpoint holds the distillation's state (not only the
        marker its start's kept images and units leave)."""
        layout = ctx.layout
        return bool(
            ctx.resume
            and layout is not None
            and layout.checkpoint.exists()
            and not layout.checkpoint_is_marker()
        )

    def _start(self, config: Distillation, ctx: Context, student, distilled: bool) -> Any:
        """The report of ``init``'s start: made now (going on from its own checkpoint when a
        run stopped while making it), or read back once the distillation has a checkpoint
        (the student's start is then in it)."""
        if config.init is None:
            return None
        name = config.init.method
        if distilled:
            record = json.loads(ctx.layout.init_report(name).read_text())
        else:
            record = method_of(config.init).handler.start(config.init, ctx, student)
        return {"method": name, **record}


def _keep_source(source: Any, layout: RunLayout | None) -> None:
    """The trained generator's weights in the run folder: the analyses draw their synthetic
    batches from the run's own generator (``zsq analyze``)."""
    state = source.state_dict()
    if layout is not None and state and distributed.world().is_main:
        save_safetensors(state, layout.generator, {"source": type(source).__name__})
