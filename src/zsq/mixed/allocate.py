"""Per-layer weight bit widths under a hard budget, chosen without data.

Four allocators see only the teacher and synthetic images:

- ``sensitivity`` (ZeroQ): the KL between the teacher and the model with only one layer
  quantized, for every layer and width; the allocation minimising the summed KL under the budget
  is solved exactly (:func:`zsq.mixed.solver.solve_allocation`).
- ``hessian`` (HAWQ-V2's criterion): the layer's mean Hessian diagonal (Hutchinson trace / weight
  count, of the KL at the full-precision model, i.e. its Fisher information) times the squared
  weight-quantization error at each width; the same exact solver.
- ``constrained`` (HDX's idea for bit widths) and ``penalty`` (its plain baseline): a
  differentiable search over per-layer width probabilities while the model is distilled, the
  hard budget kept by projecting the gradient (:mod:`zsq.mixed.search`).

The result is an :class:`Allocation`, applied through :class:`QuantSpec` overrides and kept as
``bits.json`` so another run can reuse it (``--bits-from``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from zsq.errors import ConfigError, ZsqError
from zsq.layout import RunLayout
from zsq.mixed.activations import (
    build_groups,
    group_costs,
    group_scores,
    padded,
    site_sensitivities,
    sites_of,
)
from zsq.mixed.cost import (
    Budget,
    budget_limit,
    layer_cost,
    layer_costs,
    parse_budget,
    total_cost,
)
from zsq.mixed.sensitivity import EVAL_BATCH, mean_kl, teacher_logits
from zsq.mixed.solver import cheapest_cost, solve_allocation
from zsq.numerics.losses import kl_to_teacher
from zsq.options import read_options, whole_number
from zsq.ptq.calibration import check_calibration_options
from zsq.quant import QuantSpec, parse_bits, quant_layers, quantize_model
from zsq.quant.placement import resolve_placement
from zsq.quant.spec import exact_pattern

log = logging.getLogger(__name__)

ALLOCATORS = ("sensitivity", "hessian", "constrained", "penalty")
DEFAULT_CHOICES = (2, 3, 4, 5, 6, 8)


@dataclass
class Allocation:
    """Weight bits per quantized layer, the budget they meet and how they were found."""

    allocator: str
    budget: str
    kind: str
    limit: float
    layers: list[str]
    wbits: list[int]
    abits: int | None
    cost: float
    choices: list[int]
    seconds: float = 0.0
    samples: str = ""
    scores: list[list[float]] | None = None  # what the solver minimised, per layer and width
    details: dict[str, Any] = field(default_factory=dict)
    act_sites: list[str] = field(default_factory=list)  # mixed activations (a bops budget)
    act_bits: list[int] = field(default_factory=list)  # the width of each site

    def overrides(self) -> dict[str, dict[str, int | None]]:
        """``QuantSpec.overrides`` entries naming each layer (and activation site) exactly."""
        pairs = zip(self.layers, self.wbits, strict=True)
        out: dict[str, dict[str, int | None]] = {
            exact_pattern(name): {"wbits": bits} for name, bits in pairs
        }
        for site, bits in zip(self.act_sites, self.act_bits, strict=True):
            out[exact_pattern(site)] = {**out.get(exact_pattern(site), {}), "abits": bits}
        return out

    def apply(self, spec: QuantSpec) -> QuantSpec:
        """``spec`` with this allocation's widths (after the spec's own overrides)."""
        return replace(spec, overrides={**spec.overrides, **self.overrides()})

    def mean_wbits(self, params: Sequence[int]) -> float:
        return sum(b * n for b, n in zip(self.wbits, params, strict=True)) / sum(params)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = ["| layer | wbits |", "|---|---|"]
        lines += [f"| {n} | {b} |" for n, b in zip(self.layers, self.wbits, strict=True)]
        if self.act_sites:
            lines += ["", "| activation | abits |", "|---|---|"]
            lines += [f"| {n} | {b} |" for n, b in zip(self.act_sites, self.act_bits, strict=True)]
        return "\n".join(lines)


def parse_choices(text: str | Sequence[int], name: str = "choices") -> tuple[int, ...]:
    """``"2,3,4,5,6,8"`` -> (2, 3, 4, 5, 6, 8): distinct widths 2..8, at least two."""
    items = text.split(",") if isinstance(text, str) else list(text)
    widths = []
    for item in items:
        bits = parse_bits(str(item).strip())
        if bits is None:
            raise ConfigError(f"«{name}» takes bit widths 2..8, not 'off'")
        widths.append(bits)
    widths = sorted(set(widths))
    if len(widths) < 2:
        raise ConfigError(f"«{name}» needs at least two widths, got {text!r}; e.g. 2,3,4,5,6,8")
    return tuple(widths)


def check_allocator(name: str) -> str:
    if name not in ALLOCATORS:
        raise ZsqError(f"unknown allocator {name!r}; use one of {', '.join(ALLOCATORS)}")
    return name


@dataclass(frozen=True)
class MixedConfig:
    """Per-layer bit widths chosen under a hard ``budget`` before the method runs, or reused
    from an earlier run's allocation (``bits_from``: its ``bits.json`` or folder).

    ``allocator``: sensitivity, hessian, constrained or penalty (``penalty``: its weight);
    ``choices``: the candidate weight widths; ``source``/``samples``: the synthetic images the
    allocator sees (any registered source; ZeroQ's distilled data by default), with
    ``source_options`` (e.g. zeroq's ``steps`` or ``cache``); ``probes`` (hessian), ``steps``
    (constrained, penalty). ``act_choices``: activation widths chosen with the weights under a
    ``bops=`` budget by the sensitivity allocator; ``"auto"`` (default) takes ``choices`` there
    and none elsewhere, ``"off"`` none.
    """

    budget: str | None = None
    allocator: str = "sensitivity"
    choices: tuple[int, ...] = DEFAULT_CHOICES
    penalty: float | None = None
    bits_from: str | None = None
    source: str = "zeroq"
    samples: int = 64
    probes: int = 20
    steps: int = 200
    source_options: dict[str, Any] = field(default_factory=dict)
    act_choices: tuple[int, ...] | str | None = "auto"

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.bits_from is None):
            raise ConfigError(
                "a bit allocation and its options need «budget» (to choose the bits) or "
                "«bits_from» (to reuse a run's): give one of them",
            )
        if self.bits_from is not None:
            self._refuse_with_reuse()
        if self.budget is not None:
            parse_budget(self.budget)
        check_allocator(self.allocator)
        object.__setattr__(self, "choices", parse_choices(self.choices))
        object.__setattr__(self, "act_choices", self._act_choices())
        if self.penalty is not None and self.allocator != "penalty":
            raise ConfigError(
                "«penalty» has no effect unless «allocator» is penalty; drop it",
            )
        if self.penalty is not None and not 0 <= self.penalty < float("inf"):
            raise ConfigError(f"«penalty» must be a finite number >= 0, got {self.penalty}")
        read_options("allocation", MIXED_RULES, {k: getattr(self, k) for k in MIXED_RULES})
        check_calibration_options(self.source, dict(self.source_options), size_field="samples")

    def _refuse_with_reuse(self) -> None:
        """A reused allocation is not searched: the search's options would do nothing."""
        given = [
            f.name
            for f in fields(self)
            if f.name not in ("budget", "bits_from") and getattr(self, f.name) != _default(f)
        ]
        if given:
            raise ConfigError(
                f"«bits_from» reuses a finished allocation: "
                f"{', '.join(f'«{g}»' for g in given)} would have no effect; drop them",
            )

    def _act_choices(self) -> tuple[int, ...] | None:
        """The activation widths to choose from (see the class doc)."""
        value = self.act_choices
        bops = self.budget is not None and parse_budget(self.budget).kind == "bops"
        if value == "auto":
            return self.choices if bops and self.allocator == "sensitivity" else None
        if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
            return None
        widths = parse_choices(value, "act_choices")
        if not bops:
            raise ConfigError(
                "«act_choices» mixes activation widths under a bops= budget only",
            )
        if self.allocator != "sensitivity":
            raise ConfigError(
                "«act_choices» needs the sensitivity «allocator» (the others keep activations at "
                "«abits»); use it or drop «act_choices»",
            )
        return widths

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


MIXED_RULES = {
    "samples": whole_number(1, 64),
    "probes": whole_number(1, 20),
    "steps": whole_number(1, 200),
}


# --- bits.json ----------------------------------------------------------------------------
def write_bits(allocation: Allocation, path: Path) -> None:
    from zsq.io import write_json

    write_json(path, allocation.to_dict())


def bits_file(path: str | Path) -> Path:
    """The bits.json a ``bits_from`` names: the file, or the one in a run's folder."""
    path = Path(path)
    return path / RunLayout.BITS if path.is_dir() else path


def read_bits(path: str | Path) -> Allocation:
    """An allocation written by an earlier run (``DIR/bits.json``)."""
    path = bits_file(path)
    if not path.is_file():
        raise ConfigError(f"«bits_from» {path}: no such file; give a run's bits.json")
    try:
        raw = json.loads(path.read_text())
        allocation = Allocation(**raw)
    except (ValueError, TypeError, OSError) as err:  # not JSON, not UTF-8, not an allocation
        reason = str(err).splitlines()[0][:120]
        raise ConfigError(f"«bits_from» {path} is not a zsq bits.json ({reason})") from None
    for bits in allocation.wbits:
        parse_bits(bits)
    return allocation


def check_fits(allocation: Allocation, model: nn.Module) -> None:
    """The allocation names exactly the model's quantizable layers."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if names != allocation.layers:
        missing = sorted(set(allocation.layers) ^ set(names))[:3]
        raise ConfigError(
            f"the bit allocation does not fit this model (layers differ: {missing}...); make it "
            "for this model with «budget=»SPEC",
        )


def check_reuse(
    allocation: Allocation, model: nn.Module, image_shape: tuple[int, int, int], spec: QuantSpec
) -> Allocation:
    """A reused allocation (``--bits-from``) for this run: it must name this model's layers and
    activation sites, and still meet its budget on this model, input and ``--abits``. Its cost
    is recomputed, not trusted (another model with the same layer names, or other activation
    bits, cost differently); returns it with the cost and limit of this run."""
    check_fits(allocation, model)
    sites = {site.name for site in sites_of(model, spec, image_shape)}
    lost = [site for site in allocation.act_sites if site not in sites]
    if lost:
        raise ConfigError(
            f"the bit allocation sets activation widths at {lost[:3]}, where this run has no "
            "activation quantizer (another «quant.act_placement»?); make one for this run with "
            "«budget=»SPEC",
        )
    if allocation.act_sites:  # the sites' own widths count, as the allocator counted them
        return allocation
    costs = layer_costs(model, image_shape)
    budget = parse_budget(allocation.budget)
    cost = total_cost(costs, budget.kind, allocation.wbits, [spec.abits] * len(costs))
    limit = budget_limit(budget, costs)
    if cost > limit * (1 + 1e-9):
        raise ConfigError(
            f"the reused bit allocation costs {cost:.6g} on this model with activations at "
            f"{spec.abits or 'full precision'}, over its budget {allocation.budget} "
            f"({limit:.6g}); make one for this run with «budget=»SPEC",
        )
    return replace(allocation, cost=cost, limit=limit)


# --- the allocators -----------------------------------------------------------------------
def allocate(
    teacher: nn.Module,
    *,
    image_shape: tuple[int, int, int],
    budget: Budget | str,
    allocator: str = "sensitivity",
    choices: Sequence[int] = DEFAULT_CHOICES,
    spec: QuantSpec | None = None,
    images: Tensor | None = None,
    samples: str = "",
    penalty: float = 1.0,
    search_steps: int = 200,
    probes: int = 20,
    seed: int = 0,
    progress: bool = True,
    act_choices: Sequence[int] | None = None,
) -> Allocation:
    """Widths for every Conv2d/Linear of ``teacher`` meeting ``budget``, chosen by ``allocator``
    on the synthetic ``images`` (in the teacher's input space, on its device).

    ``act_choices`` (a ``bops`` budget, the ``sensitivity`` allocator): the activation widths
    are chosen too, jointly with the weights (:mod:`zsq.mixed.activations`).
    """
    started = time.perf_counter()
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    check_allocator(allocator)
    choices = parse_choices(list(choices))
    spec = resolve_placement(teacher, spec or QuantSpec(), image_shape)
    if act_choices is not None:
        _check_act_mixing(budget, allocator)
        act_choices = parse_choices(list(act_choices))
    costs, table, limit = cost_problem(
        teacher, image_shape, budget, choices, spec.abits, act_choices, spec
    )
    if images is None:
        raise ZsqError("an allocator needs synthetic images (images=...)")
    if act_choices is not None:
        chosen = _joint_choice(
            teacher, costs, limit, budget, choices, act_choices, spec, images, image_shape,
            progress,
        )  # fmt: skip
    else:
        chosen = _weight_choice(
            teacher, table, limit, allocator, choices, spec, images, penalty, search_steps,
            probes, seed, progress,
        )  # fmt: skip
    allocation = Allocation(
        allocator=allocator,
        budget=budget.text,
        kind=budget.kind,
        limit=limit,
        layers=[c.name for c in costs],
        wbits=chosen.wbits,
        abits=spec.abits,
        cost=chosen.cost,
        choices=list(choices),
        seconds=round(time.perf_counter() - started, 2),
        samples=samples,
        scores=chosen.scores,
        details=chosen.details,
        act_sites=chosen.act_sites,
        act_bits=chosen.act_bits,
    )
    log.info(
        "%s allocation: cost %.6g of %.6g (%s); weights %s%s; %.1f s",
        allocator,
        chosen.cost,
        limit,
        budget.text,
        chosen.wbits,
        f", activations {chosen.act_bits}" if chosen.act_sites else "",
        allocation.seconds,
    )
    return allocation


@dataclass
class _Chosen:
    """What an allocator picked: weight widths per layer (and widths per activation site)."""

    wbits: list[int]
    cost: float
    scores: list[list[float]] | None
    details: dict[str, Any]
    act_sites: list[str] = field(default_factory=list)
    act_bits: list[int] = field(default_factory=list)


def _weight_choice(
    teacher: nn.Module,
    table: list[list[float]],
    limit: float,
    allocator: str,
    choices: tuple[int, ...],
    spec: QuantSpec,
    images: Tensor,
    penalty: float,
    search_steps: int,
    probes: int,
    seed: int,
    progress: bool,
) -> _Chosen:
    """Weight widths by one of the four allocators, activations left at ``spec.abits``."""
    details: dict[str, Any] = {}
    scores = None
    if allocator in ("sensitivity", "hessian"):
        if allocator == "sensitivity":
            scores = sensitivity_scores(teacher, spec, choices, images, progress=progress)
        else:
            scores, traces = hessian_scores(
                teacher, spec, choices, images, probes=probes, seed=seed, progress=progress
            )
            details["mean_hessian_diagonal"] = traces
        picked = solve_allocation(scores, table, limit)
    else:
        picked, details = _search(
            teacher, spec, choices, table, limit, images, allocator, penalty, search_steps, seed,
            progress,
        )  # fmt: skip
    cost = sum(row[i] for row, i in zip(table, picked, strict=True))
    return _Chosen([choices[i] for i in picked], cost, scores, details)


def cost_problem(
    model: nn.Module,
    image_shape: tuple[int, int, int],
    budget: Budget,
    choices: Sequence[int],
    abits: int | None,
    act_choices: Sequence[int] | None = None,
    spec: QuantSpec | None = None,
) -> tuple[list[Any], list[list[float]], float]:
    """Layer costs, the cost of every layer at every width, and the limit; an impossible budget
    (below every layer at its narrowest width) is an error naming the smallest achievable.
    With ``act_choices`` the smallest cost has every activation site at its narrowest width."""
    costs = layer_costs(model, image_shape)
    limit = budget_limit(budget, costs)
    table = [[layer_cost(c, budget.kind, b, abits) for b in choices] for c in costs]
    cheapest = cheapest_cost(table)
    narrowest = f"every layer at {min(choices)} bits"
    if act_choices is not None:
        sites = sites_of(model, spec or QuantSpec(abits=abits), image_shape)
        groups = build_groups(sites, len(costs), choices, act_choices)
        cheapest = cheapest_cost(padded(group_costs(groups, costs, budget.kind, abits)))
        narrowest += f", activations at {min(act_choices)}"
    if cheapest > limit * (1 + 1e-9):
        raise ConfigError(
            f"budget {budget.text} is below the smallest achievable cost "
            f"{_in_budget_units(cheapest, budget, costs)} ({narrowest}); "
            "raise it or add narrower «choices»",
        )
    return costs, table, limit


def check_feasible(
    model: nn.Module, image_shape: tuple[int, int, int], mixed: MixedConfig, spec: QuantSpec
) -> None:
    budget = parse_budget(mixed.budget)
    cost_problem(model, image_shape, budget, mixed.choices, spec.abits, mixed.act_choices, spec)


def _check_act_mixing(budget: Budget, allocator: str) -> None:
    if budget.kind != "bops" or allocator != "sensitivity":
        raise ZsqError(
            "activation widths are chosen under a bops= budget by the sensitivity allocator "
            f"only (got {budget.kind}=, {allocator}); drop act_choices or use those"
        )


def _joint_choice(
    teacher: nn.Module,
    costs: Sequence[Any],
    limit: float,
    budget: Budget,
    choices: tuple[int, ...],
    act_choices: tuple[int, ...],
    spec: QuantSpec,
    images: Tensor,
    image_shape: tuple[int, int, int],
    progress: bool,
) -> _Chosen:
    """Weight and activation widths together by sensitivity (module doc of
    :mod:`zsq.mixed.activations`): per-layer and per-site KLs, summed per group, solved exactly."""
    sites = sites_of(teacher, spec, image_shape)
    groups = build_groups(sites, len(costs), choices, act_choices)
    weight_scores = sensitivity_scores(teacher, spec, choices, images, progress=progress)
    site_scores = site_sensitivities(teacher, spec, sites, act_choices, images, progress)
    table = group_costs(groups, costs, budget.kind, spec.abits)
    scores = group_scores(groups, weight_scores, site_scores, choices, act_choices)
    picked = solve_allocation(padded(scores), padded(table), limit)
    details = {
        "act_choices": list(act_choices),
        "site_scores": site_scores,
        "site_layers": {s.name: [costs[i].name for i in s.consumers] for s in sites},
    }
    chosen = _Chosen([0] * len(costs), 0.0, weight_scores, details)
    for group, row, k in zip(groups, table, picked, strict=True):
        k = min(k, len(group.options) - 1)  # a padded copy is its row's last option
        option = group.options[k]
        chosen.cost += row[k]
        for i, w in zip(group.layers, option.wbits, strict=True):
            chosen.wbits[i] = w
        if group.site is not None:
            chosen.act_sites.append(group.site)
            chosen.act_bits.append(option.abits)
    return chosen


def _in_budget_units(cost: float, budget: Budget, costs: Sequence[Any]) -> str:
    if budget.kind == "wbits":
        return f"wbits={cost / sum(c.params for c in costs):.3f}"
    if budget.kind == "size":
        return f"size={cost / 1e6:.4g}MB"
    return f"bops={cost:.4g}"


def _full_precision_copy(teacher: nn.Module, spec: QuantSpec) -> nn.Module:
    """The teacher with quant layers at full precision: one layer's width can then be set."""
    fp = replace(spec, wbits=None, abits=None, overrides={})
    model = quantize_model(teacher, fp).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def sensitivity_scores(
    teacher: nn.Module,
    spec: QuantSpec,
    choices: Sequence[int],
    images: Tensor,
    progress: bool = True,
) -> list[list[float]]:
    """ZeroQ's sensitivity: KL(teacher || model with only layer l at width b), mean per image."""
    model = _full_precision_copy(teacher, spec)
    targets = teacher_logits(teacher, images)
    scores = []
    layers = list(quant_layers(model))
    for _, layer in tqdm(layers, desc="sensitivity", disable=not progress, leave=False):
        row = []
        for bits in choices:
            layer.wbits = bits
            row.append(mean_kl(model, images, targets))
        layer.wbits = None
        scores.append(row)
    return scores


def weight_errors(layer: nn.Module, choices: Sequence[int]) -> list[float]:
    """||W - Q_b(W)||^2 at each width, with the layer's own quantizer settings."""
    saved = layer.wbits
    errors = []
    with torch.no_grad():
        for bits in choices:
            layer.wbits = bits
            errors.append(float((layer.fake_quant_weight() - layer.weight).pow(2).sum()))
    layer.wbits = saved
    return errors


def hessian_scores(
    teacher: nn.Module,
    spec: QuantSpec,
    choices: Sequence[int],
    images: Tensor,
    *,
    probes: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[list[float]], list[float]]:
    """HAWQ-V2: mean Hessian diagonal of each layer (Hutchinson, one shared set of Rademacher
    probes for all layers) x squared quantization error. Returns the scores and the means."""
    from zsq.numerics.hessian import HessianOperator, unflatten

    model = _full_precision_copy(teacher, spec)
    layers = [layer for _, layer in quant_layers(model)]
    weights = [layer.weight for layer in layers]
    for w in weights:
        w.requires_grad_(True)
    targets = torch.cat(teacher_logits(teacher, images))

    def loss() -> Tensor:
        return kl_to_teacher(model(images), targets, 1.0, "batchmean")

    op = HessianOperator(loss, weights)
    gen = torch.Generator(device=op.device).manual_seed(seed)
    sums = torch.zeros(len(weights), dtype=torch.float64)
    for _ in tqdm(range(probes), desc="hessian probes", disable=not progress, leave=False):
        v = torch.randint(0, 2, (op.dim,), generator=gen, device=op.device).to(op.dtype) * 2 - 1
        hv = op(v)
        pairs = zip(unflatten(v, weights), unflatten(hv, weights), strict=True)
        for i, (a, b) in enumerate(pairs):
            sums[i] += float((a.double() * b.double()).sum())
    means = [float(s) / probes / w.numel() for s, w in zip(sums, weights, strict=True)]
    scores = [
        [max(m, 0.0) * e for e in weight_errors(layer, choices)]
        for m, layer in zip(means, layers, strict=True)
    ]
    return scores, means


def _search(
    teacher: nn.Module,
    spec: QuantSpec,
    choices: Sequence[int],
    table: list[list[float]],
    limit: float,
    images: Tensor,
    mode: str,
    penalty: float,
    steps: int,
    seed: int,
    progress: bool,
) -> tuple[list[int], dict[str, Any]]:
    """The differentiable search on a student at the widest choice, activations observed on
    the synthetic images first."""
    from zsq.mixed.search import differentiable_search
    from zsq.quant import set_observing

    widest = replace(spec, wbits=max(choices), overrides={})
    student = quantize_model(teacher, widest, images.shape[1:]).eval()
    with torch.no_grad():
        for x in images.split(EVAL_BATCH):
            student(x)
    set_observing(student, False)
    sample = _sampler(images, seed)
    result = differentiable_search(
        teacher,
        student,
        choices,
        table,
        limit,
        sample,
        mode="constrained" if mode == "constrained" else "penalty",
        penalty=penalty,
        steps=steps,
        seed=seed,
        progress=progress,
    )
    details = {
        "steps": steps,
        "final_expected_cost": result.final_expected_cost,
        "repaired": result.repaired,
        "argmax_wbits": [choices[i] for i in result.argmax_choice],
        "expected_cost": result.expected_cost,
        "probs": result.probs,
    }
    if mode == "penalty":
        details["penalty"] = penalty
    return result.choice, details


def _sampler(images: Tensor, seed: int) -> Callable[[int], Tensor]:
    """Random batches from the fixed synthetic set (its own generator: the caller's RNG stays)."""
    gen = torch.Generator().manual_seed(seed)

    def sample(n: int) -> Tensor:
        index = torch.randint(0, len(images), (n,), generator=gen)
        return images[index.to(images.device)]

    return sample
