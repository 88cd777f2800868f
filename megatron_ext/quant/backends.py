"""Where quantized GEMMs run: fake-quant, ``torch._scaled_mm`` FP8, or Transformer Engine.

* ``fake``: quantize-dequantize in float32 (:mod:`megatron_ext.quant.formats`), then the
  upstream GEMM in the model's dtype. Any device; the reference the others are checked
  against, and the only NVFP4 path (NVFP4 GEMMs need Blackwell kernels; on Hopper NVFP4 is
  emulated: Hopper has FP8 GEMMs only).
* ``scaled_mm``: FP8 only, on a GPU of compute capability 8.9 or newer. The forward GEMM
  multiplies E4M3 operands with their per-tensor scales through ``torch._scaled_mm`` (FP32
  accumulation); the backward is straight-through, with the dequantized operands. A GEMM
  that needs megatron's tensor-parallel communication inside ``_forward_impl`` (TP > 1
  without sequence parallelism) falls back to fake-quant.
* ``te``: Transformer Engine's own FP8 / NVFP4 recipe around the forward passes, on
  megatron-core's TE layer spec (``model_backend=te``). TE keeps its own scales, so the
  fake-quant calibration, exact quantized slicing and the quantized export do not apply.

:func:`resolve_backend` turns ``quant.backend`` (``auto`` included) into one of these and
says why; the recipes report it in ``summary.json``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from megatron_ext.compat.optional import have_fp8_gemm, have_transformer_engine
from megatron_ext.models.config import ConfigError
from megatron_ext.quant.config import QuantConfig
from megatron_ext.quant.convert import quant_record
from megatron_ext.quant.numerics import to_e4m3


def resolve_backend(cfg: QuantConfig) -> tuple[str, str]:
    """(backend, why) for ``cfg.backend`` on this machine; :class:`ConfigError` if it cannot run."""
    if cfg.backend == "fake":
        return "fake", "requested"
    if cfg.backend == "scaled_mm":
        if not have_fp8_gemm():
            raise ConfigError(
                "quant.backend: scaled_mm needs a GPU of compute capability >= 8.9 (Hopper); "
                "none here. Use quant.backend=fake or auto"
            )
        return "scaled_mm", "requested"
    if cfg.backend == "te":
        if not have_transformer_engine():
            raise ConfigError("quant.backend: te needs transformer-engine (extra 'gpu')")
        return "te", "requested"
    if cfg.format == "fp8" and have_fp8_gemm():
        return "scaled_mm", "auto: FP8 GEMMs run on this GPU"
    if cfg.format == "nvfp4":
        return "fake", "auto: NVFP4 GEMMs are emulated (fake-quant)"
    return "fake", "auto: no GPU with FP8 GEMMs here (fake-quant)"


@contextlib.contextmanager
def quant_context(backend: str, fmt: str) -> Iterator[None]:
    """The context forward passes of a quantized model run in: TE's autocast for ``te``."""
    if backend != "te":
        yield
        return
    if not have_transformer_engine():
        raise ConfigError("quant.backend: te needs transformer-engine (extra 'gpu')")
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    fp8_recipe = recipe.NVFP4BlockScaling() if fmt == "nvfp4" else recipe.Float8CurrentScaling()
    with te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe):
        yield


@contextlib.contextmanager
def quant_mode(model: nn.Module, mode: str, backend: str, fmt: str) -> Iterator[None]:
    """Forward passes of ``model`` unquantized (``off``), calibrating, or quantized (``quant``).

    Fake-quant and ``scaled_mm`` models switch their :class:`QuantController`; under ``te``
    the quantized mode is TE's autocast and calibration is TE's own (nothing to do here).
    """
    if backend == "te":
        with quant_context(backend, fmt) if mode == "quant" else contextlib.nullcontext():
            yield
        return
    with quant_record(model).controller.at(mode):
        yield


class _ScaledMMLinear(torch.autograd.Function):
    """``x @ w.T`` on E4M3 operands with per-tensor scales; straight-through backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor) -> Tensor:  # type: ignore[override]
        """The FP8 GEMM (FP32 accumulation), in ``x``'s dtype."""
        rows = x.reshape(-1, x.shape[-1])
        xq = to_e4m3(rows.float() / x_scale.clamp_min(torch.finfo(torch.float32).tiny))
        wq = to_e4m3(w.float() / w_scale.clamp_min(torch.finfo(torch.float32).tiny))
        out = torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
        ctx.save_for_backward(xq, wq, x_scale, w_scale)
        return out.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        """Gradients through the dequantized operands (straight-through)."""
        xq, wq, x_scale, w_scale = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        w = (wq.float() * w_scale).to(grad.dtype)
        x = (xq.float() * x_scale).to(grad.dtype)
        grad_x = (g @ w).reshape(*grad.shape[:-1], w.shape[1])
        return grad_x, (g.t() @ x).to(grad.dtype), None, None


def scaled_mm_forward(
    x: Tensor, weight: Tensor, x_scale: Tensor, w_scale: Tensor, kwargs: dict[str, Any]
) -> Tensor | None:
    """The FP8 ``_scaled_mm`` GEMM of a megatron linear's ``_forward_impl``, or ``None`` when
    it must fall back (CPU tensors, or communication inside the GEMM under TP)."""
    if x.device.type == "cpu" or kwargs.get("sequence_parallel") or kwargs.get("allreduce_dgrad"):
        return None
    out = _ScaledMMLinear.apply(x, weight, x_scale, w_scale)
    bias = kwargs.get("bias")
    return out if bias is None else out + bias
