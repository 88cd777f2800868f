"""Slicing a quantized elastic model: slice, then quantize, equals quantize, then slice.

The per-tensor scales (FP8 ``weight_scale`` / ``input_scale``, NVFP4 ``weight_scale_2`` /
``input_scale``) are those of the elastic model, calibrated once and inherited by every
slice: a slice quantizes its (sliced) weights with the full tensor's weight scale, not with
one of its own. Everything else is elementwise, or blockwise along the input dimension with
blocks that slicing keeps whole (every elastic width along a GEMM input is a multiple of 16,
docs/design.md invariant 5, checked per linear by :func:`megatron_ext.quant.convert.plan`). So:

* :func:`slice_quantized` gives a budget's standalone config, its (unquantized) weights and
  its quantization state (inherited scales): a slice that quantizes itself;
* :func:`sliced_qtensors` quantizes the elastic model's full tensors and slices the stored
  values and block scales;

and the two give bit-identical quantized tensors and scales (``tests/unit/test_quant_slicing``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.convert import elastic_controller
from megatron_ext.elastic.slicing import build_slice, slice_key_map, slice_model, slice_rules
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.quant.convert import quant_record
from megatron_ext.quant.formats import NVFP4_BLOCK, QTensor, quantize
from megatron_ext.quant.state import ModuleScales, apply_quant_state, quant_state

_W = ".weight"


def _rename(names: list[str], widths: Mapping[str, int], ctrl: ElasticController) -> dict[str, str]:
    keys = slice_key_map([n + _W for n in names], dict(widths), ctrl)
    return {k[: -len(_W)]: v[: -len(_W)] for k, v in keys.items()}


@torch.no_grad()
def inherited_scales(
    model: nn.Module, widths: Mapping[str, int], controller: ElasticController | None = None
) -> ModuleScales:
    """The quantization state of the slice at ``widths``: each module (renamed as slicing
    renames it) with the elastic model's input scale and full-tensor weight scale."""
    ctrl = controller or elastic_controller(model)
    record = quant_record(model)
    names = _rename(list(record.modules), widths, ctrl)
    out: ModuleScales = {}
    for name, new in names.items():
        m: Any = record.modules[name]
        out[new] = {
            "input_scale": float(m.quant_input_scale),
            "weight_scale": float(m.quant_current_weight_scale(m.weight)),
            "quant_weight": bool(m.quant_weight),
        }
    return out


def slice_quantized(
    model: nn.Module, widths: Mapping[str, int], controller: ElasticController | None = None
) -> tuple[HybridModelConfig, dict[str, Any], dict[str, Any]]:
    """(smaller config, its unquantized state dict, its quant state) of a quantized elastic
    model at ``widths``; the quant state holds the inherited per-tensor scales."""
    cfg, state = slice_model(model, dict(widths), controller)
    qstate = quant_state(model)
    qstate["modules"] = inherited_scales(model, widths, controller)
    qstate["high_precision"] = {
        new: qstate["high_precision"][old]
        for old, new in _rename(
            list(qstate["high_precision"]), widths, controller or elastic_controller(model)
        ).items()
    }
    return cfg, state, qstate


def build_quantized_slice(
    config: HybridModelConfig,
    state_dict: dict[str, Any],
    qstate: dict[str, Any],
    pg_collection=None,
    backend: str = "fake",
) -> nn.Module:
    """The plain megatron-core model of the slice, weights loaded and quantized per ``qstate``."""
    model = build_slice(config, state_dict, pg_collection=pg_collection)
    apply_quant_state(model, qstate, backend)
    return model


def quantize_weights(
    state_dict: Mapping[str, Any], qstate: Mapping[str, Any]
) -> dict[str, QTensor]:
    """Each quantized module's weight in ``state_dict`` quantized with its ``qstate`` scale."""
    fmt = qstate["format"]
    out = {}
    for name, scales in qstate["modules"].items():
        weight = state_dict[name + _W]
        out[name] = quantize(weight, torch.tensor(scales["weight_scale"]), fmt)
    return out


def slice_qtensor(q: QTensor, rules: Mapping[int, Tensor], where: str = "") -> QTensor:
    """``q`` (a ``[rows, K]`` weight) with the rows and input columns that ``rules`` keep.

    NVFP4 block scales follow their blocks; ``ValueError`` if a kept column set splits one.
    """
    data, block = q.data, q.block_scale
    rows, cols = rules.get(0), rules.get(1)
    if rows is not None:
        keep = rows.nonzero().flatten().to(data.device)
        data = data.index_select(0, keep)
        block = None if block is None else block.index_select(0, keep)
    if cols is not None:
        data = data.index_select(1, cols.nonzero().flatten().to(data.device))
        if block is not None:
            per_block = cols.view(-1, NVFP4_BLOCK)
            whole = per_block.all(dim=1)
            if not bool((whole | ~per_block.any(dim=1)).all()):
                raise ValueError(f"{where}: the kept input channels split NVFP4 blocks")
            block = block.index_select(1, whole.nonzero().flatten().to(block.device))
    return QTensor(q.fmt, data, q.scale, block)


@torch.no_grad()
def sliced_qtensors(
    model: nn.Module, widths: Mapping[str, int], controller: ElasticController | None = None
) -> dict[str, QTensor]:
    """Quantize the elastic model's full weights, then slice them (renamed like the slice)."""
    ctrl = controller or elastic_controller(model)
    record = quant_record(model)
    rules = slice_rules(ctrl, dict(widths))
    names = _rename(list(record.modules), widths, ctrl)
    out = {}
    for name, new in names.items():
        m: Any = record.modules[name]
        full = quantize(m.weight, m.quant_current_weight_scale(m.weight), record.config.format)
        out[new] = slice_qtensor(full, rules(new + _W), new)
    return out
