"""QuantAttention against timm's float attention, and quantize_model on a small timm ViT."""

import copy
import pickle

import pytest
import torch
from torch import nn

from zsq.quant import (
    ActQuantizer,
    QuantAttention,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    UnitRangeQuantizer,
    act_quantizers,
    attention_maps,
    expose_attention,
    quant_layers,
    quantize_model,
    set_keep_attention,
    set_observing,
)

vt = pytest.importorskip("timm.models.vision_transformer")

DIM, HEADS, TOKENS, BATCH = 64, 4, 50, 4
HEAD_DIM = DIM // HEADS
SMALL_VIT = {
    "img_size": 16,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 3,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}


def _timm_attention(seed: int = 0, identity_proj: bool = False, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    attn = vt.Attention(DIM, num_heads=HEADS, qkv_bias=True, **kwargs).eval()
    if identity_proj:
        with torch.no_grad():
            attn.proj.weight.copy_(torch.eye(DIM))
            attn.proj.bias.zero_()
    return attn


def _split_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q (already times the scale), k and v of timm's attention: (batch, heads, tokens, dim)."""
    qkv = attn.qkv(x).reshape(x.shape[0], x.shape[1], 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return q * attn.scale, k, v


def _small_vit() -> nn.Module:
    from zsq.models import create_model

    torch.manual_seed(0)
    return create_model("timm:vit_tiny_patch16_224", model_kwargs=SMALL_VIT).eval()


# --- float equivalence -------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_float_quant_attention_equals_timm(fused, qk_norm):
    norm = {"qk_norm": True, "norm_layer": nn.LayerNorm} if qk_norm else {}
    attn = _timm_attention(**norm)
    attn.fused_attn = fused
    ours = QuantAttention.from_timm(copy.deepcopy(attn))
    x = torch.randn(BATCH, TOKENS, DIM)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), attn(x), atol=1e-6, rtol=0)


def test_masks_follow_timm():
    attn = _timm_attention()
    attn.fused_attn = False
    ours = QuantAttention.from_timm(copy.deepcopy(attn))
    x = torch.randn(2, 6, DIM)
    keep = torch.rand(2, 1, 6, 6) > 0.3
    keep |= torch.eye(6, dtype=torch.bool)  # no query without a key
    additive = torch.randn(6, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, attn_mask=keep), attn(x, attn_mask=keep))
        torch.testing.assert_close(ours(x, attn_mask=additive), attn(x, attn_mask=additive))
        torch.testing.assert_close(ours(x, is_causal=True), attn(x, is_causal=True))


# --- 8-bit error against what the quantizer scales predict -------------------------------------

QUANTIZED_PARTS = {"all": ("q", "k", "v", "attn"), "qk": ("q", "k"), "v": ("v",), "attn": ("attn",)}


def _calibrated_8bit(attn: nn.Module, x: torch.Tensor, parts: tuple[str, ...]) -> QuantAttention:
    """QuantAttention with 8-bit quantizers on ``parts``, min/max observed on ``x`` itself."""
    quantizers = {f"{p}_quant": ActQuantizer(8, "minmax") for p in parts if p != "attn"}
    if "attn" in parts:
        quantizers["attn_quant"] = UnitRangeQuantizer(8)
    ours = QuantAttention.from_timm(copy.deepcopy(attn), **quantizers)
    with torch.no_grad():
        ours(x)
    set_observing(ours, False)
    return ours


def _step(quantizer: ActQuantizer | None) -> float:
    """Grid step 1/S of a quantizer (0 when absent: no rounding error there)."""
    return 0.0 if quantizer is None else float(1 / quantizer.qparams()[0])


@pytest.mark.parametrize("parts", list(QUANTIZED_PARTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_8bit_attention_error_matches_quantizer_scales(parts, seed):
    r"""The 8-bit output's error against timm's float output, from the quantizers' steps.

    Setup: proj is the identity, so the output is the attention result o_i = sum_j p_ij v_j
    itself (proj is an ordinary Linear; its error propagation is a plain matmul). Every range is
    the min/max of this very batch, so nothing is clipped and each fake-quantized value differs
    from its input by a rounding error of at most half a step D = 1/S: q^ = q + xi,
    k^ = k + eta, v^ = v + zeta, p^ = p' + alpha, |xi| <= Dq/2, ... and Da = 1/255 on [0, 1].

    Worst case (asserted elementwise). Scores s = q.k (q already scaled) move by
    |ds_ij| <= e_ij = |q_i|_1 Dk/2 + |k_j|_1 Dq/2 + d Dq Dk/4. With E_i = max_j e_ij, every
    ratio p'_ij / p_ij = exp(ds_ij) / sum_l p_il exp(ds_il) lies in [exp(-2 E_i), exp(2 E_i)],
    so |p'_ij - p_ij| <= p_ij (exp(2 E_i) - 1). Then
    o^_i - o_i = sum_j (p^_ij - p_ij) v^_j + sum_j p_ij zeta_j, and since sum_j p_ij = 1,
    |o^_ic - o_ic| <= sum_j (p_ij (exp(2 E_i) - 1) + Da/2) (|v_jc| + Dv/2) + Dv/2.

    Typical size (asserted on the RMS). The worst case adds every rounding error with the same
    sign, about 10x the real error here. Model the rounding errors as independent, uniform on
    [-D/2, D/2] (variance D^2/12), and linearise the softmax:
    dp_ij = p_ij (ds_ij - sum_l p_il ds_il). Collecting each independent error gives
        var(do_ic) = Dq^2/12 sum_t A_ict^2
                   + Dk^2/12 sum_{t,l} q_it^2 p_il^2 (v_lc - o_ic)^2
                   + Da^2/12 sum_j v_jc^2 + Dv^2/12 sum_j p_ij^2,
    A_ict = sum_j p_ij v_jc (k_jt - kbar_it), kbar_i = sum_j p_ij k_j (xi_i is shared by all j;
    eta_l by all terms of query i through the softmax's normaliser). The error divided by this
    sigma must have RMS 1 (asserted within [0.9, 1.1]) and no element beyond 6 sigma.
    """
    attn = _timm_attention(seed, identity_proj=True)
    attn.fused_attn = False
    torch.manual_seed(100 + seed)
    x = torch.randn(BATCH, TOKENS, DIM)
    ours = _calibrated_8bit(attn, x, QUANTIZED_PARTS[parts])
    dq, dk, dv = (_step(getattr(ours, f"{p}_quant")) for p in ("q", "k", "v"))
    da = _step(ours.attn_quant)
    with torch.no_grad():
        error = ours(x) - attn(x)
        q, k, v = _split_heads(attn, x)
        p = (q @ k.transpose(-2, -1)).softmax(-1)

        e = (q.abs().sum(-1) * dk / 2)[..., :, None] + (k.abs().sum(-1) * dq / 2)[..., None, :]
        e_max = (e + HEAD_DIM * dq * dk / 4).amax(-1, keepdim=True)
        worst = (p * torch.expm1(2 * e_max) + da / 2) @ (v.abs() + dv / 2) + dv / 2

        kbar, obar = p @ k, p @ v
        a = torch.einsum("bhij,bhjc,bhjt->bhict", p, v, k) - obar[..., None] * kbar[..., None, :]
        spread = (v[:, :, None] - obar[:, :, :, None]) ** 2  # (b, h, i, l, c)
        var = (
            dq**2 / 12 * (a**2).sum(-1)
            + dk**2 / 12 * torch.einsum("bhit,bhil,bhilc->bhic", q**2, p**2, spread)
            + da**2 / 12 * (v**2).sum(-2, keepdim=True)
            + dv**2 / 12 * (p**2).sum(-1, keepdim=True)
        )
    error = error.reshape(BATCH, TOKENS, HEADS, HEAD_DIM).transpose(1, 2)  # like o: per head
    assert error.abs().max() > 0  # quantization is on
    assert (error.abs() <= worst + 1e-5).all()
    z = error / var.sqrt()
    assert 0.9 <= z.pow(2).mean().sqrt() <= 1.1
    assert z.abs().max() <= 6


def test_unit_range_quantizer_is_fixed_and_unsigned():
    aq = UnitRangeQuantizer(4)
    aq.observing = True  # set_observing turns it on: the range must not move
    x = torch.tensor([0.0, 0.02, 0.5, 0.9, 1.0])
    out = aq(x * 0.5)
    assert (aq.x_min.item(), aq.x_max.item()) == (0.0, 1.0)
    # grid k/15: 0 -> 0, 0.01 -> 0, 0.25 -> 4/15, 0.45 -> 7/15, 0.5 -> 7/15 or 8/15 (ties to even)
    torch.testing.assert_close(out * 15, torch.tensor([0.0, 0.0, 4.0, 7.0, 8.0]))
    scale, zero_point = aq.qparams()
    assert (scale.item(), zero_point.item()) == (15.0, 8.0)


# --- exposed attention maps --------------------------------------------------------------------


def test_kept_maps_are_softmax_rows_with_gradient():
    attn = _timm_attention()
    ours = QuantAttention.from_timm(
        copy.deepcopy(attn),
        q_quant=ActQuantizer(8, "minmax"),
        k_quant=ActQuantizer(8, "minmax"),
        attn_quant=UnitRangeQuantizer(8),
    )
    x = torch.randn(BATCH, TOKENS, DIM, requires_grad=True)
    ours(x)
    assert ours.last_attention is None  # kept only on request
    set_keep_attention(ours, True)
    ours(x)
    maps = attention_maps(ours)
    assert list(maps) == [""]
    attention = maps[""]
    assert attention.shape == (BATCH, HEADS, TOKENS, TOKENS)
    torch.testing.assert_close(attention.sum(-1), torch.ones(BATCH, HEADS, TOKENS))
    assert (attention >= 0).all()
    attention[:, 0].max(-1).values.sum().backward()  # a loss on the maps reaches the input
    assert x.grad is not None and x.grad.abs().sum() > 0
    copy.deepcopy(ours)  # a kept map (with its graph) does not break copying or pickling
    pickle.dumps(ours)
    set_keep_attention(ours, False)
    assert ours.last_attention is None


def test_float_maps_equal_hand_softmax():
    attn = _timm_attention()
    ours = QuantAttention.from_timm(copy.deepcopy(attn))
    ours.keep_attention = True
    x = torch.randn(2, TOKENS, DIM)
    with torch.no_grad():
        ours(x)
        q, k, _ = _split_heads(attn, x)
        torch.testing.assert_close(ours.last_attention, (q @ k.transpose(-2, -1)).softmax(-1))


# --- quantize_model on a timm ViT -------------------------------------------------------------


def test_quantize_vit_swaps_every_layer_and_attention():
    vit = _small_vit()
    student = quantize_model(vit, QuantSpec(wbits=4, abits=4), (1, 16, 16))
    attentions = [m for m in student.modules() if isinstance(m, QuantAttention)]
    assert len(attentions) == SMALL_VIT["depth"]
    assert not any(isinstance(m, vt.Attention) for m in student.modules())
    layers = dict(quant_layers(student))
    n_linear = sum(isinstance(m, nn.Linear) for m in vit.modules())
    assert len(layers) == n_linear + 1  # + the patch embedding's convolution
    assert isinstance(layers["patch_embed.proj"], QuantConv2d)
    assert layers["patch_embed.proj"].act_quant is None  # the image stays float (reference)
    for name in ("blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.0.mlp.fc1", "head"):
        assert isinstance(layers[name], QuantLinear) and layers[name].act_quant.bits == 4
        assert layers[name].w_channel_axis == 0  # per output channel
    for a in attentions:
        assert (a.q_quant.bits, a.k_quant.bits, a.v_quant.bits, a.attn_quant.bits) == (4,) * 4
    # the float model's state loads into the student (same names; quantizer buffers added)
    missing = student.load_state_dict(vit.state_dict(), strict=False).missing_keys
    assert all(key.endswith(("x_min", "x_max", "num_observed")) for key in missing)
    assert isinstance(vit.blocks[0].attn, vt.Attention)  # the input model is untouched


def test_quantize_vit_input_placement_and_overrides():
    vit = _small_vit()
    overrides = {"blocks.0.attn.*": {"abits": 8}, "blocks.1.attn.attn_quant": {"abits": None}}
    spec = QuantSpec(wbits=4, abits=4, act_placement="input", overrides=overrides)
    student = quantize_model(vit, spec)
    assert student.patch_embed.proj.act_quant.bits == 4
    first, second = student.blocks[0].attn, student.blocks[1].attn
    assert (first.q_quant.bits, first.attn_quant.bits, first.qkv.act_quant.bits) == (8, 8, 8)
    assert (second.q_quant.bits, second.attn_quant) == (4, None)


def test_full_precision_spec_keeps_the_vit_output_and_calibration_freezes():
    vit = _small_vit()
    x = torch.randn(3, 1, 16, 16)
    student = quantize_model(vit, QuantSpec(wbits=None, abits=None))
    assert not list(act_quantizers(student))
    with torch.no_grad():
        torch.testing.assert_close(student(x), vit(x), atol=1e-6, rtol=0)
    quantized = quantize_model(vit, QuantSpec(wbits=8, abits=8), (1, 16, 16))
    with torch.no_grad():
        quantized(x)
    set_observing(quantized, False)  # every quantizer (the fixed softmax one too) has a range
    with torch.no_grad():
        assert (quantized(x) - vit(x)).abs().max() < 0.1 * vit(x).abs().max()


def test_expose_attention_gives_float_teacher_maps():
    vit = _small_vit()
    teacher = expose_attention(vit)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), vit(x), atol=1e-6, rtol=0)
    maps = attention_maps(teacher)
    assert list(maps) == ["blocks.0.attn", "blocks.1.attn"]
    tokens = (16 // 4) ** 2 + 1
    assert maps["blocks.1.attn"].shape == (2, 2, tokens, tokens)
    assert not any(isinstance(m, ActQuantizer) for m in teacher.modules())
