"""The quantized Hugging Face export, in the ModelOpt layout (FP8 or NVFP4).

A budget's slice of a quantized elastic model is written as the Nemotron-H checkpoint of
:mod:`megatron_ext.export.hf` (same tensor names, same ``config.json``), except that every
quantized linear ``<module>`` stores, instead of a float ``<module>.weight``:

=========  ======================================================================
format     tensors
=========  ======================================================================
FP8        ``weight`` ``float8_e4m3fn``; ``weight_scale``, ``input_scale`` FP32 scalars
NVFP4      ``weight`` ``uint8`` ``[N, K/2]`` (two E2M1 codes per byte, even index in
           the low nibble); ``weight_scale`` ``float8_e4m3fn`` ``[N, K/16]`` (one per 16
           inputs); ``weight_scale_2`` and ``input_scale`` FP32 scalars
=========  ======================================================================

Dequantized weight = stored values × ``weight_scale`` (× ``weight_scale_2``). Inputs are
quantized with the static ``input_scale`` (and, for NVFP4, dynamic E4M3 block scales).
megatron's fused ``linear_qkv`` becomes ``q_proj`` / ``k_proj`` / ``v_proj``: its rows (and
their block scales) are split, and the three share its per-tensor scales.

``hf_quant_config.json`` (ModelOpt's) and ``config.json``'s ``quantization_config`` name
the algorithm, the group size and the modules left unquantized (``exclude_modules``).
:func:`load_quantized_hf` reads it all back into a megatron-core model whose weights are
the dequantized values and whose inputs are quantized with the stored scales: the same
logits as the quantized slice it was exported from (``tests/export/test_quant_export``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from megatron_ext.data.tokenizer import Tokenizer
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.export import ExportError, ExportResult
from megatron_ext.export.hf import (
    CONFIG_FILE,
    check_hf_compatible,
    conv_kernel,
    family_for_config,
    hf_config,
    hf_names,
    hf_to_megatron,
    megatron_to_hf,
    model_config_from_hf,
    read_safetensors,
    split_qkv,
    write_hf_dir,
)
from megatron_ext.models.config import (
    HybridModelConfig,
    load_model_config,
)
from megatron_ext.quant.formats import NVFP4_BLOCK, QTensor, quantize
from megatron_ext.quant.numerics import pack_e2m1, unpack_e2m1
from megatron_ext.quant.slicing import slice_quantized
from megatron_ext.quant.state import apply_quant_state
from megatron_ext.run_format import MODEL_CONFIG, QUANT_STATE, write_json

HF_QUANT_CONFIG = "hf_quant_config.json"
PRODUCER = "star-elastic"
_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}
_FORMAT = {v: k for k, v in _ALGO.items()}
_W = ".weight"


def _stored(q: QTensor) -> dict[str, Tensor]:
    """The suffix -> tensor entries of one quantized weight (input scale added by the caller)."""
    if q.fmt == "fp8":
        return {"weight": q.data, "weight_scale": q.scale.clone()}
    assert q.block_scale is not None
    return {
        "weight": pack_e2m1(q.data),
        "weight_scale": q.block_scale,
        "weight_scale_2": q.scale.clone(),
    }


def _rows(q: QTensor, cfg: HybridModelConfig) -> tuple[QTensor, ...]:
    """``linear_qkv``'s quantized weight split into q / k / v rows, scales shared."""
    data = split_qkv(q.data.view(torch.uint8), cfg)
    blocks = (
        (None,) * 3 if q.block_scale is None else split_qkv(q.block_scale.view(torch.uint8), cfg)
    )
    dtype = q.data.dtype
    return tuple(
        QTensor(
            q.fmt,
            d.view(dtype),
            q.scale,
            None if b is None else b.view(torch.float8_e4m3fn),
        )
        for d, b in zip(data, blocks)
    )


def check_quantized_hf_compatible(cfg: HybridModelConfig) -> None:
    """:func:`check_hf_compatible`, and the quantized layout is written for Nemotron-H only
    (a gated MLP's fused ``linear_fc1`` would need its quantized rows split in two)."""
    check_hf_compatible(cfg)
    if family_for_config(cfg).name != "nemotron_h":
        raise ExportError(
            f"the quantized Hugging Face export writes Nemotron-H only, not "
            f"{family_for_config(cfg).architecture(cfg)[0]}; export this model unquantized"
        )


def quantized_hf_tensors(
    cfg: HybridModelConfig, state: dict[str, Any], qstate: dict[str, Any]
) -> dict[str, Tensor]:
    """Nemotron-H tensors of a sliced ``state`` with the quantized linears of ``qstate``."""
    check_quantized_hf_compatible(cfg)
    fmt = qstate["format"]
    modules = qstate["modules"]
    plain = {k: v for k, v in state.items() if k[: -len(_W)] not in modules}
    out = megatron_to_hf(plain, cfg)
    for name, scales in modules.items():
        if not scales.get("quant_weight", True):
            raise ExportError(f"{name}: its weights were loaded pre-quantized; export the source")
        q = quantize(state[name + _W], torch.tensor(scales["weight_scale"]), fmt)
        names = hf_names(name + _W, cfg)
        parts = _rows(q, cfg) if len(names) == 3 else (q,)
        for hf_weight, part in zip(names, parts):
            module = hf_weight[: -len(_W)]
            for suffix, tensor in _stored(part).items():
                out[f"{module}.{suffix}"] = tensor.contiguous()
            out[f"{module}.input_scale"] = torch.tensor(scales["input_scale"], dtype=torch.float32)
    return out


def _excluded(cfg: HybridModelConfig, qstate: dict[str, Any]) -> list[str]:
    """Hugging Face names of the linears left unquantized."""
    names = []
    for name in qstate.get("high_precision", {}):
        names += [n[: -len(_W)] for n in hf_names(name + _W, cfg)]
    return sorted(set(names))


def quant_config_json(cfg: HybridModelConfig, qstate: dict[str, Any]) -> dict[str, Any]:
    """The ``hf_quant_config.json`` content (ModelOpt's layout)."""
    fmt = qstate["format"]
    quant: dict[str, Any] = {
        "quant_algo": _ALGO[fmt],
        "kv_cache_quant_algo": None,
        "exclude_modules": _excluded(cfg, qstate),
    }
    if fmt == "nvfp4":
        quant["group_size"] = NVFP4_BLOCK
    return {"producer": {"name": PRODUCER}, "quantization": quant}


def save_quantized_hf(
    cfg: HybridModelConfig,
    state: dict[str, Any],
    qstate: dict[str, Any],
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write a sliced, quantized model as a quantized Nemotron-H checkpoint in ``directory``."""
    config = hf_config(cfg, tokenizer, conv_kernel(state))
    quant = quant_config_json(cfg, qstate)
    config["quantization_config"] = {"quant_method": "modelopt", **quant["quantization"]}
    tensors = quantized_hf_tensors(cfg, state, qstate)
    directory = write_hf_dir(directory, tensors, config, cfg, tokenizer)
    (directory / HF_QUANT_CONFIG).write_text(json.dumps(quant, indent=1) + "\n")
    write_json(directory / QUANT_STATE, qstate, indent=1)
    return directory


def export_quantized_hf(
    model: nn.Module,
    widths: dict[str, int],
    out_dir: str | Path,
    *,
    budget: str = "",
    controller: ElasticController | None = None,
    tokenizer: Tokenizer | None = None,
) -> ExportResult:
    """Slice a quantized elastic ``model`` (TP=1) at ``widths`` and write it quantized."""
    if controller is not None:
        check_quantized_hf_compatible(controller.model)
    cfg, state, qstate = slice_quantized(model, widths, controller)
    path = save_quantized_hf(cfg, state, qstate, out_dir, tokenizer)
    return ExportResult.of("hf_quantized", budget, path, quant_algo=_ALGO[qstate["format"]])


def _dequantized(tensors: dict[str, Tensor], module: str, fmt: str) -> tuple[Tensor, float]:
    """(dequantized float32 weight, input scale) of one quantized HF module."""
    weight = tensors[f"{module}.weight"]
    if fmt == "fp8":
        q = QTensor(fmt, weight, tensors[f"{module}.weight_scale"].float())
    else:
        q = QTensor(
            fmt,
            unpack_e2m1(weight),
            tensors[f"{module}.weight_scale_2"].float(),
            tensors[f"{module}.weight_scale"],
        )
    return q.dequantize(), float(tensors[f"{module}.input_scale"])


def load_quantized_hf(
    directory: str | Path, pg_collection=None, backend: str = "fake"
) -> nn.Module:
    """The megatron-core model of a quantized export: dequantized weights, quantized inputs."""
    from megatron_ext.models.builder import build_model
    from megatron_ext.parallel import ParallelConfig

    directory = Path(directory)
    quant = json.loads((directory / HF_QUANT_CONFIG).read_text())["quantization"]
    fmt = _FORMAT[quant["quant_algo"]]
    hf = json.loads((directory / CONFIG_FILE).read_text())
    if (directory / MODEL_CONFIG).is_file():
        cfg = load_model_config(directory)
    else:
        cfg = model_config_from_hf(hf)
    tensors = read_safetensors(directory)
    modules = sorted({k[: -len(".input_scale")] for k in tensors if k.endswith(".input_scale")})
    floats = {k: v for k, v in tensors.items() if not any(k.startswith(m + ".") for m in modules)}
    input_scales = {}
    for module in modules:
        floats[f"{module}.weight"], input_scales[module] = _dequantized(tensors, module, fmt)
    model = build_model(cfg, ParallelConfig(), pg_collection, initialize=False)
    model.load_state_dict(hf_to_megatron(floats, cfg, model.state_dict()), strict=True)
    scales: dict[str, dict[str, Any]] = {}
    for key in model.state_dict():
        names = hf_names(key, cfg) if key.endswith(_W) else ()
        found = [input_scales[n[: -len(_W)]] for n in names if n[: -len(_W)] in input_scales]
        if found:
            if len(set(found)) != 1:
                raise ExportError(f"{key}: its q/k/v parts have different input scales {found}")
            scales[key[: -len(_W)]] = {
                "input_scale": found[0],
                "weight_scale": None,
                "quant_weight": False,
            }
    qstate = {
        "format": fmt,
        "config": {"format": fmt, "backend": backend},
        "modules": scales,
        "high_precision": {},
    }
    apply_quant_state(model, qstate, backend)
    return model
