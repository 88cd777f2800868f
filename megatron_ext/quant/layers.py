"""Quantized megatron-core linears by conversion: a class swap, upstream state-dict keys.

:func:`make_quantized` swaps the class of a built ``ColumnParallelLinear`` /
``RowParallelLinear`` (or of its elastic subclass, see :mod:`megatron_ext.elastic.layers_base`)
for a generated ``Quant<Class>`` subclass whose ``_forward_impl`` (the GEMM both upstream
forwards funnel into) quantizes the input and the weight first; :func:`make_plain_linear`
swaps it back. The parameters stay as they are, so ``state_dict`` and ``sharded_state_dict``
keys are upstream's. The quantization state lives in non-persistent buffers (not in the
state dict; :mod:`megatron_ext.quant.state` saves it to its own file):

* ``quant_input_scale``: the FP32 per-tensor input scale; NaN until calibrated (the plain
  attribute ``quant_calibrated`` says whether it is);
* ``quant_weight_scale``: the FP32 per-tensor weight scale, or ``None`` while it follows the
  weight (``amax(weight)``, the full tensor's in an elastic model, so every budget shares it).

A layer with ``quant_weight=False`` holds weights that are already dequantized values (a
loaded export); it quantizes its inputs only. Narrow elastic compute (``F.linear`` on a
narrowed weight) would bypass ``_forward_impl``, so it refuses a quantized linear: quantized
elastic models compute masked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_ext.dynamic import converted_class, is_outermost
from megatron_ext.quant.formats import amax, check_format, fake_quant, scale_from_amax

MODES: tuple[str, ...] = ("off", "calibrate", "quant")


class QuantController:
    """What every quantized layer of one model reads: format, backend and mode (no globals).

    ``mode``: ``off`` (unquantized, the reference), ``calibrate`` (unquantized, each layer
    records its input amax), ``quant`` (quantized).
    """

    def __init__(self, fmt: str, backend: str = "fake", mode: str = "quant") -> None:
        check_format(fmt)
        self.fmt, self.backend = fmt, backend
        self.mode = "quant"
        self.set_mode(mode)

    def set_mode(self, mode: str) -> None:
        """Switch mode; ``ValueError`` for an unknown one."""
        if mode not in MODES:
            raise ValueError(f"quantization mode {mode!r} is not one of {MODES}")
        self.mode = mode

    @contextmanager
    def at(self, mode: str) -> Iterator[QuantController]:
        """Run a block in ``mode``, restoring the previous mode afterwards."""
        saved = self.mode
        self.set_mode(mode)
        try:
            yield self
        finally:
            self.mode = saved


def _max_over(value: Tensor, group: Any) -> Tensor:
    """``value`` reduced with MAX over ``group`` (a TP group; unchanged for one rank)."""
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return value


class QuantLinearMixin:
    """Methods of the generated ``Quant<Class>``; upstream's via ``quant_base``."""

    quant_base: ClassVar[Any]
    quant_ctrl: QuantController
    quant_weight: bool
    quant_calibrated: bool
    quant_input_scale: Tensor
    quant_weight_scale: Tensor | None
    tp_group: Any

    def quant_current_weight_scale(self, weight: Tensor) -> Tensor:
        """The per-tensor weight scale: the fixed one, else that of ``weight``'s amax."""
        if self.quant_weight_scale is not None:
            return self.quant_weight_scale
        return scale_from_amax(_max_over(amax(weight), self.tp_group), self.quant_ctrl.fmt)

    def quant_observe(self, x: Tensor) -> None:
        """Calibration: raise the input scale to cover ``x``. An input that is empty (an
        expert no token reached) or all zero leaves it unseen (NaN)."""
        seen = _max_over(amax(x), self.tp_group)
        if bool(seen > 0):
            scale = scale_from_amax(seen, self.quant_ctrl.fmt).to(self.quant_input_scale.device)
            self.quant_input_scale = torch.fmax(self.quant_input_scale, scale)

    def _forward_impl(self, input: Tensor, weight: Tensor, *args, **kwargs):
        """Upstream's GEMM on the quantized input and weight (per the controller's mode)."""
        ctrl = self.quant_ctrl
        if ctrl.mode == "calibrate":
            self.quant_observe(input)
        elif ctrl.mode == "quant":
            in_scale = self.quant_input_scale
            if not self.quant_calibrated:  # a Python flag: no device sync per GEMM
                raise RuntimeError(
                    f"{type(self).__name__}: input scale not calibrated; run calibration "
                    "(megatron_ext.quant.ptq.calibrate) or load a quant state first"
                )
            if self.quant_weight and ctrl.backend == "scaled_mm":
                from megatron_ext.quant.backends import scaled_mm_forward

                out = scaled_mm_forward(
                    input, weight, in_scale, self.quant_current_weight_scale(weight), kwargs
                )
                if out is not None:
                    return out
            input = fake_quant(input, in_scale, ctrl.fmt)
            if self.quant_weight:
                weight = fake_quant(weight, self.quant_current_weight_scale(weight), ctrl.fmt)
        return self.quant_base._forward_impl(self, input, weight, *args, **kwargs)


def is_quantized_module(module: object) -> bool:
    """Whether ``module``'s outermost conversion is the quantized one."""
    return is_outermost(module, "quant")


def quant_class(base: type) -> type:
    """``Quant<base>``: ``base`` with :class:`QuantLinearMixin`'s methods (created once)."""
    return converted_class(base, QuantLinearMixin, "quant", quant_base=base)


def make_quantized(
    module: nn.Module,
    ctrl: QuantController,
    *,
    quant_weight: bool = True,
    input_scale: float | None = None,
    weight_scale: float | None = None,
) -> nn.Module:
    """Swap ``module``'s class for its quantized subclass in place and attach the state."""
    weight = cast(Tensor, module.weight)
    module.__class__ = quant_class(type(module))
    module.__dict__["quant_ctrl"] = ctrl
    module.__dict__["quant_weight"] = quant_weight
    module.__dict__["quant_calibrated"] = input_scale is not None
    nan = float("nan") if input_scale is None else input_scale
    module.register_buffer(
        "quant_input_scale",
        torch.tensor(nan, dtype=torch.float32, device=weight.device),
        persistent=False,
    )
    fixed = None
    if weight_scale is not None:
        fixed = torch.tensor(weight_scale, dtype=torch.float32, device=weight.device)
    module.register_buffer("quant_weight_scale", fixed, persistent=False)
    return module


def make_plain_linear(module: nn.Module) -> nn.Module:
    """Undo :func:`make_quantized`: back to the previous class, state removed."""
    if is_quantized_module(module):
        for name in ("quant_input_scale", "quant_weight_scale"):
            delattr(module, name)
        for name in ("quant_ctrl", "quant_weight", "quant_calibrated"):
            module.__dict__.pop(name, None)
        module.__class__ = cast(Any, type(module)).quant_base
    return module
