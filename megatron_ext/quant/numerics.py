"""The two low-precision number formats, emulated in float32 arithmetic (CPU and GPU alike).

* **E4M3** (``float8_e4m3fn``): 4 exponent bits (bias 7), 3 mantissa bits, no infinities.
  Normal numbers from 2^-6 to 448, subnormals down to 2^-9.
* **E2M1** (NVFP4's element type): 2 exponent bits (bias 1), 1 mantissa bit. The magnitudes
  are exactly ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (:data:`E2M1_VALUES`).

Both are rounded by :func:`round_minifloat`: round to the nearest representable value, ties
to the even mantissa, then saturate at the largest finite magnitude (448 or 6), as
Transformer Engine and ModelOpt do when they cast. Every step is exact in float32: the grid
spacing is a power of two, so dividing by it and multiplying back never rounds, and
``torch.round`` rounds half to even.

An E2M1 value is stored as a 4-bit code ``sign << 3 | index`` where ``index`` is its position
in :data:`E2M1_VALUES` (the standard bit layout: ``0b0001`` = 0.5, ``0b0111`` = 6). Two codes
share a byte (:func:`pack_e2m1`): element ``2i`` in the low nibble, ``2i + 1`` in the high
nibble, the layout of ModelOpt's and vLLM's NVFP4 checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor

E4M3_MAX = 448.0
"""Largest finite E4M3 magnitude."""

E2M1_MAX = 6.0
"""Largest E2M1 magnitude."""

E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Every non-negative E2M1 value, in code order."""

_E4M3 = (3, -6, E4M3_MAX)  # mantissa bits, smallest normal exponent, max magnitude
_E2M1 = (1, 0, E2M1_MAX)


def round_minifloat(x: Tensor, mantissa_bits: int, min_exponent: int, max_value: float) -> Tensor:
    """``x`` (float32) rounded to a float format with ``mantissa_bits`` and saturated.

    The spacing of representable values in the binade ``[2^e, 2^(e+1))`` is
    ``2^(e - mantissa_bits)``; below ``2^min_exponent`` (subnormals) it stays that of the
    smallest normal binade. NaN stays NaN; infinities saturate.
    """
    x = x.float()
    exponent = torch.frexp(x.abs())[1] - 1  # floor(log2 |x|) for x != 0
    exponent = exponent.clamp(min=min_exponent)
    step = torch.ldexp(torch.ones_like(x), exponent - mantissa_bits)
    rounded = torch.round(x / step) * step
    return rounded.clamp(-max_value, max_value)


def round_e4m3(x: Tensor) -> Tensor:
    """``x`` rounded to E4M3 (nearest, ties to even), saturated at ±448; float32 result."""
    return round_minifloat(x, *_E4M3)


def round_e2m1(x: Tensor) -> Tensor:
    """``x`` rounded to E2M1 (nearest, ties to even), saturated at ±6; float32 result."""
    return round_minifloat(x, *_E2M1)


def encode_e2m1(values: Tensor) -> Tensor:
    """4-bit codes (uint8, one per element) of ``values``, which must be E2M1 values."""
    table = torch.tensor(E2M1_VALUES, device=values.device)
    magnitude = values.abs().float()
    index = torch.searchsorted(table, magnitude)
    if bool((index >= len(E2M1_VALUES)).any()) or not torch.equal(
        table[index.clamp(max=len(E2M1_VALUES) - 1)], magnitude
    ):
        raise ValueError("encode_e2m1: some values are not E2M1 values; round them first")
    sign = torch.signbit(values).to(torch.uint8) << 3
    return sign | index.to(torch.uint8)


def decode_e2m1(codes: Tensor) -> Tensor:
    """float32 values of 4-bit E2M1 ``codes`` (uint8, one per element)."""
    table = torch.tensor(E2M1_VALUES, device=codes.device)
    magnitude = table[(codes & 7).long()]
    return torch.where((codes & 8).bool(), -magnitude, magnitude)


def pack_e2m1(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte along the last dimension (even index in the low nibble)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1: last dimension {codes.shape[-1]} is odd")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: Tensor) -> Tensor:
    """The inverse of :func:`pack_e2m1`: one code per element, last dimension doubled."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def to_e4m3(x: Tensor) -> Tensor:
    """``x`` as a ``torch.float8_e4m3fn`` tensor, rounded by :func:`round_e4m3` first.

    The values are already representable, so the cast itself is exact on every backend.
    """
    return round_e4m3(x).to(torch.float8_e4m3fn)
