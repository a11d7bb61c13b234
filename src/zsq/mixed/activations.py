"""Mixed activation widths under a BOPs budget: which quantizer feeds which layer, and the exact
joint choice of activation and weight widths.

A layer's BOPs are ``wbits * abits * MACs`` with ``abits`` the width of the activation quantizer
whose output the layer reads. That quantizer is a *site*: a layer's own input quantizer
(``input`` placement, a transformer's Linear) or the quantized ReLU before it (``reference``
placement). One site can feed several layers (a ResNet block input read by ``conv1`` and by a
1x1 downsample conv), and its width is then one choice for all of them, so the decision unit is
a *group*: a site with the layers it feeds, choosing the site's width and each layer's weight
width together. A layer fed by no site (the stem conv reading the float image, a classifier
after pooling) is a group of its own whose activation width stays ``--abits``.

Scores are ZeroQ's sensitivities: the KL to the teacher with only one layer's weights, or only
one site's activations, quantized, summed over a group's parts; the groups' multiple-choice
knapsack is solved exactly by :func:`zsq.mixed.solver.solve_allocation` (rows of different
lengths are padded with copies of their last entry, which changes no optimum).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from zsq.errors import ConfigError
from zsq.mixed.cost import LayerCost, layer_cost
from zsq.mixed.sensitivity import EVAL_BATCH, mean_kl, teacher_logits
from zsq.quant import (
    QuantSpec,
    act_quantizers,
    inspect_forward,
    quant_layers,
    quantize_model,
    set_observing,
)
from zsq.quant.model import set_act_observer

log = logging.getLogger(__name__)

MAX_GROUP_CHOICES = 20_000  # beyond this a group's joint choices are too many to enumerate
SUFFIX = ".act_quant"  # a site's quantizer module is PARENT.act_quant; the spec names PARENT


@dataclass(frozen=True)
class Site:
    """An activation quantizer that layers read, named as ``QuantSpec`` overrides name it."""

    name: str
    consumers: tuple[int, ...]  # indexes into the quantized layers, in module order


@dataclass(frozen=True)
class Option:
    """One joint choice of a group: the site's width (None: no site) and its layers' widths."""

    abits: int | None
    wbits: tuple[int, ...]


@dataclass(frozen=True)
class Group:
    site: str | None
    layers: tuple[int, ...]
    options: tuple[Option, ...]


def activation_sites(model: nn.Module, image_shape: Sequence[int]) -> list[Site]:
    """The sites of a fake-quantized ``model`` and the layers each feeds, from one forward.

    A layer is fed by a site when its input tensor *is* that quantizer's output (or the layer
    quantizes its own input). The forward runs on zeros in eval mode with observers paused and
    the RNG forked, so the model's state is unchanged.
    """
    layers = [layer for _, layer in quant_layers(model)]
    index = {id(layer): i for i, layer in enumerate(layers)}
    site_of_output: dict[int, str] = {}
    kept: list[Tensor] = []  # outputs stay alive so their ids cannot be reused in the forward
    consumers: dict[str, list[int]] = {}

    def after_quantizer(name: str, output: Tensor) -> None:
        kept.append(output)
        site_of_output[id(output)] = name

    def before_layer(layer: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        i = index[id(layer)]
        if layer.act_quant is not None and layer.act_quant.bits is not None:
            site = names[id(layer.act_quant)]
        else:
            site = site_of_output.get(id(inputs[0]))
        if site is not None and i not in consumers.setdefault(site, []):
            consumers[site].append(i)

    quantizers = [(_site_name(name), aq) for name, aq in act_quantizers(model)]
    names = {id(aq): name for name, aq in quantizers}
    handles = [
        aq.register_forward_hook(lambda _m, _i, out, n=name: after_quantizer(n, out))
        for name, aq in quantizers
        if aq.bits is not None
    ]
    handles += [layer.register_forward_pre_hook(before_layer) for layer in layers]
    try:
        inspect_forward(model, image_shape)
    finally:
        for handle in handles:
            handle.remove()
    order = [name for name, _ in quantizers]
    return [Site(name, tuple(sorted(consumers[name]))) for name in order if name in consumers]


def _site_name(quantizer_name: str) -> str:
    return quantizer_name[: -len(SUFFIX)] if quantizer_name.endswith(SUFFIX) else quantizer_name


def build_groups(
    sites: Sequence[Site],
    n_layers: int,
    wchoices: Sequence[int],
    achoices: Sequence[int],
) -> list[Group]:
    """One group per site (its width x its layers' widths), one per layer no site feeds."""
    groups, fed = [], set()
    for site in sites:
        parts = [list(achoices), *[list(wchoices)] * len(site.consumers)]
        count = len(achoices) * len(wchoices) ** len(site.consumers)
        if count > MAX_GROUP_CHOICES:
            raise ConfigError(
                f"activation {site.name!r} feeds {len(site.consumers)} layers: {count} joint "
                "width options are too many; give fewer «choices» or «act_choices»",
            )
        options = tuple(Option(a, tuple(w)) for a, *w in itertools.product(*parts))
        groups.append(Group(site.name, site.consumers, options))
        fed.update(site.consumers)
    for i in range(n_layers):
        if i not in fed:
            groups.append(Group(None, (i,), tuple(Option(None, (w,)) for w in wchoices)))
    return groups


def group_costs(
    groups: Sequence[Group], costs: Sequence[LayerCost], kind: str, abits: int | None
) -> list[list[float]]:
    """Each group's cost at each of its options (a site-less group's layers at ``abits``)."""
    return [
        [
            sum(
                layer_cost(costs[i], kind, w, abits if o.abits is None else o.abits)
                for i, w in zip(g.layers, o.wbits, strict=True)
            )
            for o in g.options
        ]
        for g in groups
    ]


def group_scores(
    groups: Sequence[Group],
    weight_scores: Sequence[Sequence[float]],
    site_scores: dict[str, list[float]],
    wchoices: Sequence[int],
    achoices: Sequence[int],
) -> list[list[float]]:
    """A group option's score: its site's sensitivity at its width plus its layers' at theirs."""
    w_at = {b: k for k, b in enumerate(wchoices)}
    a_at = {b: k for k, b in enumerate(achoices)}
    rows = []
    for g in groups:
        row = []
        for o in g.options:
            score = sum(weight_scores[i][w_at[w]] for i, w in zip(g.layers, o.wbits, strict=True))
            if o.abits is not None:
                score += site_scores[g.site][a_at[o.abits]]
            row.append(score)
        rows.append(row)
    return rows


def padded(rows: Sequence[Sequence[float]]) -> list[list[float]]:
    """Rows made equally long by repeating each row's last entry (the exact solver's shape)."""
    width = max(len(r) for r in rows)
    return [[*r, *[r[-1]] * (width - len(r))] for r in rows]


def site_sensitivities(
    teacher: nn.Module,
    spec: QuantSpec,
    sites: Sequence[Site],
    achoices: Sequence[int],
    images: Tensor,
    progress: bool = True,
) -> dict[str, list[float]]:
    """KL(teacher || model with only one site's activations quantized), per site and width.

    Ranges are the min/max over the synthetic images (observed once in full precision; a
    range does not depend on the width); weights and every other quantizer stay float.
    """
    model = quantize_model(teacher, replace(spec, wbits=None, overrides={}), images.shape[1:])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    set_act_observer(model, "minmax")
    with torch.no_grad():
        for x in images.split(EVAL_BATCH):
            model(x)
    set_observing(model, False)
    quantizers = {_site_name(name): aq for name, aq in act_quantizers(model)}
    for aq in quantizers.values():
        aq.bits = None
    targets = teacher_logits(teacher, images)
    scores = {}
    for site in tqdm(sites, desc="activation sensitivity", disable=not progress, leave=False):
        aq, row = quantizers[site.name], []
        for bits in achoices:
            aq.bits = bits
            row.append(mean_kl(model, images, targets))
        aq.bits = None
        scores[site.name] = row
    return scores


def sites_of(teacher: nn.Module, spec: QuantSpec, image_shape: Sequence[int]) -> list[Site]:
    """The sites of ``teacher`` quantized as ``spec`` places activations."""
    student = quantize_model(teacher, replace(spec, overrides={}), image_shape)
    return activation_sites(student, image_shape)
