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

Module names are those of the unsharded model whatever the layout of the run that wrote the
file (:func:`megatron_ext.quant.parallel.global_names`): a sharded model's state is gathered
from every rank, and ranks that hold the same linear must agree on its scales exactly.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from megatron_ext.checkpoint import CheckpointError
from megatron_ext.quant.config import QuantConfig
from megatron_ext.quant.convert import QuantRecord, convert_to_quantized, quant_record
from megatron_ext.quant.parallel import global_names
from megatron_ext.run_format import QUANT_STATE, read_json, write_json
from megatron_ext.runtime import is_main

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


def quant_state(model: nn.Module, pg_collection=None) -> dict[str, Any]:
    """The JSON-able quantization state of a quantized ``model``.

    With ``pg_collection`` on several ranks: collective, every rank's modules under their
    unsharded names; ``RuntimeError`` names a module whose scales two ranks disagree on.
    """
    record = quant_record(model)
    modules, high = module_scales(model), dict(record.high_precision)
    if pg_collection is not None and dist.is_initialized() and dist.get_world_size() > 1:
        names = global_names(model)
        mine = (
            {names[n]: v for n, v in modules.items()},
            {names.get(n, n): why for n, why in high.items()},
        )
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        modules, high = _merge([m for m, _ in every]), _merge([h for _, h in every])
    return {
        "format": record.config.format,
        "config": dataclasses.asdict(record.config),
        "modules": modules,
        "high_precision": high,
    }


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict of every rank's ``parts``; a name that ranks map to different values raises."""
    out: dict[str, Any] = {}
    for rank, part in enumerate(parts):
        for name, value in part.items():
            if name in out and out[name] != value:
                raise RuntimeError(
                    f"{name}: rank {rank} holds {value}, an earlier rank {out[name]}; ranks "
                    "holding the same linear must agree on its quantization state"
                )
            out[name] = value
    return out


def write_quant_state(state: dict[str, Any], directory: str | Path) -> Path:
    """Write a :func:`quant_state` to ``directory/quant_state.json`` (on rank 0 only)."""
    path = Path(directory) / QUANT_STATE
    if is_main():
        write_json(path, state, indent=1)
    return path


def save_quant_state(model: nn.Module, directory: str | Path, pg_collection=None) -> Path:
    """Write :func:`quant_state` of ``model`` to ``directory/quant_state.json`` (rank 0;
    collective with ``pg_collection``, see :func:`quant_state`)."""
    return write_quant_state(quant_state(model, pg_collection), directory)


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
