"""Quantized multi-head self-attention, swapped in for timm's ``Attention`` without editing timm.

Both matrix products inside attention get fake-quantized inputs: q and k before ``q @ k^T``
(per-tensor, signed ranges observed like any activation), the softmax output on its own
unsigned quantizer with the fixed range [0, 1] before ``attn @ v``, and v there too. LayerNorm
(``q_norm``/``k_norm``/``norm``), softmax and GELU stay in float; the qkv/proj Linears are left to
``quantize_model``'s layer swap, which gives them per-channel weights and per-tensor inputs.

Each module can keep the last forward's per-head attention maps (after softmax, before its
quantizer) for losses that read them (MimiQ's head alignment, head-wise attention distillation).
They are kept with their autograd graph, so a loss on them reaches the input and the weights.
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import Any

import torch
from torch import Tensor, nn

from zsq.quant.modules import ActQuantizer

log = logging.getLogger(__name__)

__all__ = [
    "QuantAttention",
    "UnitRangeQuantizer",
    "attention_maps",
    "expose_attention",
    "set_keep_attention",
    "timm_attention_class",
]


class UnitRangeQuantizer(ActQuantizer):
    """Unsigned quantizer of probabilities: the range is fixed to [0, 1], never observed.

    With ``n`` bits the grid is ``k / (2^n - 1)``, k = 0 .. 2^n - 1 (code ``k - 2^(n-1)``, zero
    point ``2^(n-1)``), so 0 and 1 are exact and no calibration is needed. A softmax output
    lies in [0, 1] whatever the input, so a fixed range clips nothing; observing a narrower range
    would only pay off where no query ever attends strongly (rare: most batches hold a max near 1).
    """

    def __init__(self, bits: int | None) -> None:
        super().__init__(bits, observer="minmax", symmetric=False)
        self.set_range(0.0, 1.0)

    def observe(self, x: Tensor) -> None:  # the range is fixed: nothing to learn from data
        return None


def timm_attention_class() -> type[nn.Module] | None:
    """timm's ``vision_transformer.Attention`` when timm is already imported (else None).

    A model holding timm modules has imported timm, so a CNN run never pays timm's import.
    """
    if sys.modules.get("timm") is None:
        return None
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:
        return None
    return Attention


class QuantAttention(nn.Module):
    """timm's multi-head self-attention with both matmuls fake-quantized on both inputs.

    The same arithmetic as ``timm.models.vision_transformer.Attention`` (non-fused path):
    ``qkv`` -> (q, k, v) per head -> ``q_norm``/``k_norm`` -> ``q * scale`` -> ``q @ k^T`` (+ mask)
    -> softmax -> ``attn_drop`` -> ``@ v`` -> merge heads -> ``norm`` -> (gate) -> ``proj``.
    Quantizers (None: full precision): ``q_quant`` on ``q * scale`` (the scale folds into the
    quantizer's, so quantizing after it is the integer kernel's input), ``k_quant`` on k,
    ``attn_quant`` (a :class:`UnitRangeQuantizer`) on the softmax output, ``v_quant`` on v.
    Submodule names match timm's, so a timm state_dict loads and layer patterns stay the same.

    With ``keep_attention`` on, ``last_attention`` holds the last forward's maps,
    ``(batch, heads, tokens, tokens)``, each row summing to one.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        qkv: nn.Module,
        proj: nn.Module,
        *,
        scale: float | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        norm: nn.Module | None = None,
        gate: nn.Module | None = None,
        attn_drop: nn.Module | None = None,
        proj_drop: nn.Module | None = None,
        q_quant: ActQuantizer | None = None,
        k_quant: ActQuantizer | None = None,
        v_quant: ActQuantizer | None = None,
        attn_quant: ActQuantizer | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.qkv = qkv
        self.q_norm = q_norm or nn.Identity()
        self.k_norm = k_norm or nn.Identity()
        self.attn_drop = attn_drop or nn.Identity()
        self.norm = norm or nn.Identity()
        self.gate = gate
        self.proj = proj
        self.proj_drop = proj_drop or nn.Identity()
        self.q_quant = q_quant
        self.k_quant = k_quant
        self.attn_quant = attn_quant
        self.v_quant = v_quant
        self.keep_attention = False
        self.last_attention: Tensor | None = None

    @classmethod
    def from_timm(
        cls,
        attn: nn.Module,
        *,
        q_quant: ActQuantizer | None = None,
        k_quant: ActQuantizer | None = None,
        v_quant: ActQuantizer | None = None,
        attn_quant: ActQuantizer | None = None,
    ) -> QuantAttention:
        """Wrap a timm ``Attention``'s submodules (shared, not copied) with these quantizers."""
        module = cls(
            attn.num_heads,
            attn.head_dim,
            attn.qkv,
            attn.proj,
            scale=attn.scale,
            q_norm=attn.q_norm,
            k_norm=attn.k_norm,
            norm=getattr(attn, "norm", None),
            gate=getattr(attn, "gate", None),
            attn_drop=attn.attn_drop,
            proj_drop=attn.proj_drop,
            q_quant=q_quant,
            k_quant=k_quant,
            v_quant=v_quant,
            attn_quant=attn_quant,
        )
        return module.train(attn.training)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, scale={self.scale:.4g}"

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = _quant(self.q_quant, q * self.scale)
        scores = q @ _quant(self.k_quant, k).transpose(-2, -1)
        scores = _add_mask(scores, attn_mask, is_causal)
        attn = scores.softmax(dim=-1)
        self.last_attention = attn if self.keep_attention else None
        attn = self.attn_drop(_quant(self.attn_quant, attn))
        out = (attn @ _quant(self.v_quant, v)).transpose(1, 2).reshape(batch, tokens, -1)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def __getstate__(self) -> dict[str, Any]:
        # a kept map carries its autograd graph, which cannot be deep-copied or pickled
        return {**super().__getstate__(), "last_attention": None}


def _quant(quantizer: ActQuantizer | None, x: Tensor) -> Tensor:
    return x if quantizer is None else quantizer(x)


def _add_mask(scores: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """Additive mask with ``scaled_dot_product_attention``'s meaning (timm's convention):
    ``is_causal`` hides later tokens; a bool mask keeps True; a float mask is added."""
    tokens = scores.shape[-1]
    if is_causal:
        hidden = torch.ones(tokens, tokens, dtype=torch.bool, device=scores.device).triu(1)
        return scores.masked_fill(hidden, float("-inf"))
    if attn_mask is None:
        return scores
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(~attn_mask, float("-inf"))
    return scores + attn_mask


def attention_modules(model: nn.Module) -> list[tuple[str, QuantAttention]]:
    """(name, module) of every :class:`QuantAttention`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantAttention)]


def set_keep_attention(model: nn.Module, keep: bool = True) -> int:
    """Keep (or stop keeping and drop) every attention module's last maps; returns how many."""
    modules = attention_modules(model)
    for _, module in modules:
        module.keep_attention = keep
        if not keep:
            module.last_attention = None
    return len(modules)


def attention_maps(model: nn.Module) -> dict[str, Tensor]:
    """The maps kept by the last forward, by module name: ``(batch, heads, tokens, tokens)``."""
    return {
        n: m.last_attention for n, m in attention_modules(model) if m.last_attention is not None
    }


def expose_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose timm attention modules are float :class:`QuantAttention`
    keeping their maps (a teacher whose attention a loss reads); nothing is quantized."""
    copied = copy.deepcopy(model)
    swapped = _swap_float_attention(copied)
    if swapped == 0:
        log.warning(
            "%s has no timm Attention module: no attention maps to expose", type(model).__name__
        )
    set_keep_attention(copied, True)
    return copied


def _swap_float_attention(module: nn.Module) -> int:
    attention_cls = timm_attention_class()
    if attention_cls is None:
        return 0
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is attention_cls:
            setattr(module, name, QuantAttention.from_timm(child))
            count += 1
        else:
            count += _swap_float_attention(child)
    return count
