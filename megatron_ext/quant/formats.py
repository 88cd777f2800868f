"""FP8 (E4M3, per-tensor scale) and NVFP4 (E2M1, E4M3 scale per 16, FP32 per-tensor scale).

Scales follow the ModelOpt / Hugging Face checkpoint convention, dequantized value =
stored value × scales:

* **FP8**: one FP32 ``scale = amax / 448``; ``q = e4m3(x / scale)``.
* **NVFP4**: one FP32 ``scale`` (``weight_scale_2`` / ``input_scale``) ``= amax / (6 · 448)``
  and, per block of :data:`NVFP4_BLOCK` consecutive elements of the last dimension (the
  GEMM input dimension), an E4M3 ``block_scale = e4m3(block_amax / (6 · scale))``; then
  ``q = e2m1(x / (block_scale · scale))``. When ``block_scale`` rounds down, the block's
  largest values saturate at ±6; a block whose scale underflows to 0 is all zero.

``amax`` is the per-tensor absolute maximum: the full tensor's for weights, the calibrated
maximum for inputs. A zero scale (amax 0) quantizes everything to 0.

:func:`fake_quantize` is ``dequantize(quantize(x))`` computed with the very same float32
operations as :meth:`QTensor.dequantize`, so a fake-quantized tensor is bit-identical to
the dequantized export of the same tensor. :class:`FakeQuantize` is its straight-through
autograd function: the forward quantizes, the backward passes the gradient unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_ext.quant.numerics import (
    E2M1_MAX,
    E4M3_MAX,
    decode_e2m1,
    encode_e2m1,
    round_e2m1,
    round_e4m3,
    to_e4m3,
)

FORMATS: tuple[str, ...] = ("fp8", "nvfp4")
NVFP4_BLOCK = 16
"""Elements per NVFP4 block scale, along the GEMM input dimension."""

_RANGE = {"fp8": E4M3_MAX, "nvfp4": E2M1_MAX * E4M3_MAX}


def check_format(fmt: str) -> None:
    """Raise ``ValueError`` unless ``fmt`` is one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"quantization format {fmt!r} is not one of {FORMATS}")


def amax(x: Tensor) -> Tensor:
    """Absolute maximum of ``x`` as a float32 scalar tensor (no gradient; 0 when empty)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.detach().abs().amax().float()


def scale_from_amax(value: Tensor | float, fmt: str) -> Tensor:
    """The per-tensor FP32 scale of a tensor whose absolute maximum is ``value``."""
    check_format(fmt)
    return torch.as_tensor(value, dtype=torch.float32) / _RANGE[fmt]


def _safe(scale: Tensor) -> Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


@dataclass
class QTensor:
    """A quantized tensor: its stored values and scales.

    ``data``: FP8 values (``float8_e4m3fn``, the tensor's shape) or NVFP4 codes (``uint8``,
    one 4-bit code per element, unpacked). ``block_scale``: NVFP4 only, ``float8_e4m3fn`` of
    shape ``[..., K / 16]``. ``scale``: the FP32 per-tensor scale (0-dim).
    """

    fmt: str
    data: Tensor
    scale: Tensor
    block_scale: Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The represented values, in ``dtype``."""
        if self.fmt == "fp8":
            return (self.data.float() * self.scale).to(dtype)
        assert self.block_scale is not None
        values = decode_e2m1(self.data).unflatten(-1, (-1, NVFP4_BLOCK))
        out = values * (self.block_scale.float() * self.scale).unsqueeze(-1)
        return out.flatten(-2).to(dtype)


def _check_blocks(x: Tensor) -> None:
    if x.shape[-1] % NVFP4_BLOCK:
        raise ValueError(
            f"NVFP4 needs the last (GEMM input) dimension to be a multiple of {NVFP4_BLOCK}; "
            f"got shape {tuple(x.shape)}"
        )


def _nvfp4_parts(x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(E2M1 values ``[..., K/16, 16]``, E4M3 block scales, their float32 product with scale)."""
    _check_blocks(x)
    blocks = x.float().unflatten(-1, (-1, NVFP4_BLOCK))
    block_amax = blocks.abs().amax(dim=-1)
    block_scale = to_e4m3(block_amax / (E2M1_MAX * _safe(scale)))
    full = block_scale.float() * scale
    values = round_e2m1(blocks / _safe(full).unsqueeze(-1))
    values = torch.where(full.unsqueeze(-1) > 0, values, torch.zeros_like(values))
    return values, block_scale, full


def quantize(x: Tensor, scale: Tensor, fmt: str) -> QTensor:
    """Quantize ``x`` with the per-tensor ``scale`` (see :func:`scale_from_amax`)."""
    check_format(fmt)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if fmt == "fp8":
        return QTensor(fmt, to_e4m3(x.float() / _safe(scale)), scale)
    values, block_scale, _ = _nvfp4_parts(x, scale)
    return QTensor(fmt, encode_e2m1(values.flatten(-2)), scale, block_scale)


def fake_quantize(x: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """``quantize(x, scale, fmt).dequantize(x.dtype)``, without building the codes."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if fmt == "fp8":
        return (round_e4m3(x.float() / _safe(scale)) * scale).to(x.dtype)
    check_format(fmt)
    values, _, full = _nvfp4_parts(x, scale)
    return (values * full.unsqueeze(-1)).flatten(-2).to(x.dtype)


class FakeQuantize(torch.autograd.Function):
    """Straight-through fake quantization: quantize-dequantize forward, identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, fmt: str) -> Tensor:  # type: ignore[override]
        """The fake-quantized ``x``."""
        return fake_quantize(x, scale, fmt)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        """The gradient passes unchanged to ``x``; none to the scale."""
        return grad, None, None


def fake_quant(x: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """:class:`FakeQuantize` applied to ``x`` (differentiable, straight-through)."""
    return FakeQuantize.apply(x, scale, fmt)  # type: ignore[no-any-return]
