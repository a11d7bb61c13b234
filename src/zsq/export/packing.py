"""Integer codes of 4 bits and below, two per byte.

A code is a signed integer in ``[-2^(b-1), 2^(b-1) - 1]`` (paper Eq. 1). For ``b <= 4`` its low
four bits are stored: element ``2i`` in the low nibble of byte ``i``, element ``2i + 1`` in the
high nibble (an odd count is padded with a zero nibble). Unpacking sign-extends the nibble, which
is exact for 2, 3 and 4 bits alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zsq.errors import ZsqError
from zsq.quant import code_range

PACKED_BITS = 4  # codes of this width or narrower are packed two per byte


def is_packed(bits: int) -> bool:
    return bits <= PACKED_BITS


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``codes`` (any integer or integral float tensor) as uint8 bytes, two codes per byte."""
    if not is_packed(bits):
        raise ZsqError(f"only codes of {PACKED_BITS} bits or fewer are packed, got {bits}")
    qmin, qmax = code_range(bits)
    flat = codes.detach().reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < qmin or int(flat.max()) > qmax):
        raise ZsqError(f"codes outside the {bits}-bit range [{qmin}, {qmax}] cannot be packed")
    nibbles = (flat & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_codes(packed: Tensor, numel: int) -> Tensor:
    """The first ``numel`` codes of ``packed`` as int8, sign-extended from their nibbles."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() * 2 < numel:
        raise ZsqError(
            f"packed codes must be a 1-D uint8 tensor of at least {(numel + 1) // 2} bytes"
        )
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:numel]
    signed = nibbles.to(torch.int8)
    return torch.where(signed >= 8, signed - 16, signed)
