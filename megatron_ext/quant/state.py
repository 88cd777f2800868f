"""The quantization state of a model, kept apart from its weights: ``quant_state.json``.

The checkpoint's weights keep upstream's state-dict keys; the quantization state is a small
JSON file beside them::

    {"format": "nvfp4", "config": {...QuantConfig...},
     "modules": {"decoder.layers.0.mixer.in_proj": {"input_scale": 0.0123,
                                                    "weight_scale": null,
                                                    "quant_weight": true}, ...},
     "high_precision": {"output_layer": "quant.skip pattern 'output_layer'", ...}}

``input_scale`` / ``weight_scale`` are the FP32 per-tensor scales (see
:mod:`megatron_ext.quant.formats`); ``weight_scale`` ``null`` means "the weight's own
amax". A float32 number written as a JSON float reads back as the same float32 exactly.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from torch import nn

from megatron_ext.checkpoint import CheckpointError
from megatron_ext.quant.config import QuantConfig
from megatron_ext.quant.convert import QuantRecord, convert_to_quantized, quant_record
from megatron_ext.run_format import QUANT_STATE, read_json, write_json

ModuleScales = dict[str, dict[str, Any]]


def module_scales(model: nn.Module) -> ModuleScales:
    """Per quantized module: its input scale, fixed weight scale (or None) and quant_weight."""
    out: ModuleScales = {}
    for name, m in quant_record(model).modules.items():
        scale = float(m.quant_input_scale)
        fixed = m.quant_weight_scale
        out[name] = {
            "input_scale": None if math.isnan(scale) else scale,
            "weight_scale": None if fixed is None else float(fixed),
            "quant_weight": bool(m.quant_weight),
        }
    return out


def quant_state(model: nn.Module) -> dict[str, Any]:
    """The JSON-able quantization state of a quantized ``model``."""
    record = quant_record(model)
    return {
        "format": record.config.format,
        "config": dataclasses.asdict(record.config),
        "modules": module_scales(model),
        "high_precision": dict(record.high_precision),
    }


def save_quant_state(model: nn.Module, directory: str | Path) -> Path:
    """Write :func:`quant_state` of ``model`` to ``directory/quant_state.json``."""
    return write_json(Path(directory) / QUANT_STATE, quant_state(model), indent=1)


def read_quant_state(directory: str | Path) -> dict[str, Any]:
    """The state :func:`save_quant_state` wrote into ``directory``."""
    path = Path(directory) / QUANT_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no quantization state (is this a qad run dir?)")
    try:
        state = read_json(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    if not isinstance(state, dict) or not {"config", "modules"} <= state.keys():
        raise CheckpointError(f"{path} is corrupt: it needs a 'config' and a 'modules' entry")
    return state


def apply_quant_state(
    model: nn.Module, state: dict[str, Any], backend: str = "fake"
) -> QuantRecord:
    """Quantize ``model`` (plain or elastic) exactly as ``state`` describes."""
    cfg = QuantConfig(**state["config"])
    modules = state["modules"]
    record = convert_to_quantized(
        model,
        cfg,
        backend=backend,
        scales=modules,
        prequantized=[n for n, m in modules.items() if not m.get("quant_weight", True)],
    )
    record.high_precision = dict(state.get("high_precision", record.high_precision))
    return record
