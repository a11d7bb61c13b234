"""What a quantization method is to zsq: a typed config that validates itself, and a handler
registered under the method's name.

The registry is the one list of methods: the CLI's ``--method`` choices, the Python API, the
README's method table and the tests read it. A new method is one module that defines its config
and handler and calls :func:`register_method` (see docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

from zsq.errors import ConfigError
from zsq.layout import RunLayout
from zsq.quant import QuantSpec

C = TypeVar("C", bound="MethodConfig")
Evaluator = Callable[[nn.Module], float]


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: a frozen dataclass whose fields are the method's options,
    checked in ``__post_init__`` with :class:`~zsq.errors.ConfigError` messages that name the
    fields.

    Class attributes a subclass may set:
    ``SPEED_FIELDS``: fields that change how fast a run goes, not its result (a resume may change
    them; the run record leaves them out). ``REFUSAL``: why an option of other methods has no
    effect with this one, and what to do instead (``{it}`` is 'it' or 'them').
    """

    SPEED_FIELDS: ClassVar[tuple[str, ...]] = ()
    REFUSAL: ClassVar[str] = "drop {it}"

    @property
    def method(self) -> str:
        """The name this config's method is registered under."""
        return method_of(self).name

    @classmethod
    def smoke(cls: type[C]) -> C:
        """A configuration that runs in seconds on a small model: tests and examples use it,
        so a new method is in the registry-wide tests without editing them."""
        return cls()

    @classmethod
    def from_fields(cls: type[C], values: Mapping[str, Any]) -> C:
        """The config from ``{field: value}``, refusing in one line the names it does not take
        (an option another method has would otherwise be silently ignored)."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = [name for name in values if name not in names]
        if unknown:
            raise refusal(cls, unknown)
        return cls(**values)

    def record(self) -> dict[str, Any]:
        """The fields that define a run's result, as JSON values (the run record; a resume with
        other values is refused). Subclasses whose fields resolve to something else (a recipe
        preset and its overrides) record what they resolve to."""
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.init and f.name not in self.SPEED_FIELDS
        }
        return {name: as_record(value) for name, value in values.items()}

    def sample_sources(self) -> list[tuple[str, str]]:
        """The sample sources this config draws from, as (source, where it is named, with the
        option marked: '«calib» zeroq'): the run checks each fits the teacher before any work."""
        return []

    def datasets(self) -> list[tuple[str, str]]:
        """The real datasets (spec, where named) this config reads: loaded before any work, so
        a wrong path fails first. Real data makes the run a data-driven baseline."""
        return []


def as_record(value: Any) -> Any:
    """A config value as the run record keeps it (JSON; a nested config as its record with its
    method's name; a Dataset by its type and size)."""
    if isinstance(value, MethodConfig):
        return {"method": value.method, **value.record()}
    if isinstance(value, Dataset):
        return dataset_label(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return as_record(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): as_record(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [as_record(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return json.loads(json.dumps(value, default=str))


def dataset_label(dataset: Dataset) -> str:
    """A dataset passed from Python, as reports and the run record name it."""
    size = len(dataset) if hasattr(dataset, "__len__") else "?"
    return f"a {type(dataset).__name__} of {size} images"


def refusal(cls: type[MethodConfig], names: list[str]) -> ConfigError:
    """'recipe has no effect with method minmax (...)': options the method would ignore, with
    the methods that do take them."""
    name = registered_name(cls)
    shown = ", ".join(f"«{n}»" for n in names)
    verb = "has" if len(names) == 1 else "have"
    takers = [m.name for m in _METHODS.values() if set(names) & _field_names(m.config)]
    taken = f" (an option of {', '.join(takers)})" if takers else ""
    hint = cls.REFUSAL.format(it="it" if len(names) == 1 else "them")
    return ConfigError(f"{shown} {verb} no effect with «method» {name}{taken}; {hint}")


def _field_names(config: type[MethodConfig]) -> set[str]:
    return {f.name for f in dataclasses.fields(config) if f.init}


# --- handlers ---------------------------------------------------------------------------------
@dataclass
class Context:
    """What a method's handler receives: the teacher, the resolved quantization, where to write.

    ``layout``: the run folder being written (``OUT.partial``), None where nothing may be written.
    ``resume``: the run continues an interrupted one in ``layout``. ``evaluate``: top-1 on the
    evaluation data, for the log only (never to train or select). ``dataset(spec)``: a real
    dataset named in the config, read in the teacher's input space (loaded before any work).
    """

    teacher: nn.Module
    image_shape: tuple[int, int, int]
    num_classes: int
    quant: QuantSpec
    device: torch.device
    seed: int = 0
    progress: bool = True
    layout: RunLayout | None = None
    resume: bool = False
    evaluate: Evaluator | None = None
    dataset: Callable[[str], Dataset] = field(default=lambda spec: _no_dataset(spec))


def _no_dataset(spec: str) -> Dataset:
    raise ConfigError(f"dataset {spec!r} was not loaded for this run")


@dataclass
class Outcome:
    """What a method made: the student, its part of the report, per-epoch history if it trained,
    and the quantization its student was built with when it is not the run's (``quant``)."""

    student: nn.Module
    report: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    quant: QuantSpec | None = None


class MethodHandler:
    """How a registered method runs. Override :meth:`run`; the class attributes tell the run
    what it must know before it starts.

    ``multi_process``: it runs over several processes under torchrun.
    ``writes``: file names of its own in the run folder beyond :class:`RunLayout`'s (so
    ``--overwrite`` recognises them as zsq's). ``can_start``: its student can be the start of a
    distillation (``init``), through :meth:`start`. ``learns_quantization``: it learns ranges or
    rounding, so a student with nothing quantized (and no bit allocation) is refused before any
    work. An interrupted run can be resumed once the handler has written
    ``ctx.layout.checkpoint`` (its state, or the marker of
    :func:`~zsq.methods.calibration.mark_resumable` when only its images are kept).
    """

    multi_process: ClassVar[bool] = False
    writes: ClassVar[tuple[str, ...]] = ()
    can_start: ClassVar[bool] = False
    learns_quantization: ClassVar[bool] = False

    def run(self, config: Any, ctx: Context) -> Outcome:
        raise NotImplementedError

    def check(self, config: Any, ctx: Context) -> None:
        """Checks that need the teacher, before any work (default: none beyond the sources')."""

    def check_allocation(self, config: Any) -> None:
        """Refuse a per-layer bit allocation the method cannot honour (default: any is fine)."""

    def start(self, config: Any, ctx: Context, student: nn.Module) -> dict[str, Any]:
        """Make ``student`` start from this method's result; returns what to report."""
        raise NotImplementedError

    def spec(self, config: Any, spec: QuantSpec, model: nn.Module) -> QuantSpec:
        """The quantization this method's student has, from the run's (a distillation starting
        from this method builds its student so; default: the run's)."""
        return spec

    def student_spec(self, report: dict[str, Any], spec: QuantSpec, model: nn.Module) -> QuantSpec:
        """The spec a finished run's student was built with, from its report (export rebuilds
        the student from it); default: the run's spec."""
        return spec


# --- the registry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A registered method: its name, config type, handler and a one-line summary."""

    name: str
    config: type[MethodConfig]
    handler: MethodHandler
    summary: str = ""
    family: str = ""  # 'post-training' or 'distillation': how the docs and --help group it


_METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    config: type[MethodConfig],
    handler: MethodHandler,
    *,
    summary: str = "",
    family: str = "",
    replace: bool = False,
) -> Method:
    """Make ``config`` the config of method ``name``, run by ``handler``."""
    key = name.strip().lower()
    if not replace and (key in _METHODS or any(m.config is config for m in _METHODS.values())):
        raise ValueError(f"method {key!r} (or its config {config.__name__}) is registered already")
    method = Method(key, config, handler, summary, family)
    _METHODS[key] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method (a plugin's, or a test's)."""
    _METHODS.pop(name.strip().lower(), None)


def method_names(family: str | None = None) -> tuple[str, ...]:
    """The registered methods in registration order (of one ``family`` if given)."""
    return tuple(m.name for m in _METHODS.values() if family is None or m.family == family)


def get_method(name: str) -> Method:
    key = str(name).strip().lower()
    if key not in _METHODS:
        raise ConfigError(
            f"unknown «method» {name!r}; choose one of {', '.join(method_names())}",
        )
    return _METHODS[key]


def method_of(config: MethodConfig) -> Method:
    """The method ``config`` configures (by its exact type)."""
    for method in _METHODS.values():
        if type(config) is method.config:
            return method
    raise ConfigError(
        f"{type(config).__name__} is not the config of a registered method; register it with "
        "zsq.methods.register_method",
    )


def registered_name(config: type[MethodConfig]) -> str:
    return next((m.name for m in _METHODS.values() if m.config is config), config.__name__)


def startable_methods() -> tuple[str, ...]:
    """The methods whose student can start a distillation (``init``)."""
    return tuple(m.name for m in _METHODS.values() if m.handler.can_start)


def method_list(family: str) -> str:
    """'gdfq, qimera, arc, psaq, mimiq': the methods of a family, for messages."""
    return ", ".join(method_names(family))
