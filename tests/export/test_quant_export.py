"""The quantized Hugging Face export (ModelOpt layout), FP8 and NVFP4, budgets L and S.

The model is the export round trip's: the tiny hybrid without RoPE, seeded weights striped
for TP=2 / EP=2, made elastic, quantized and calibrated on real text at both budgets.

Tolerances. The loader rebuilds every quantized weight from the stored codes and scales with
the same float32 operations the fake quantizer of the slice uses, loads the other tensors
unchanged, and quantizes inputs with the stored input scales: the loaded model holds the
same numbers in the same places and runs the same code, so its logits are bit-identical to
the quantized slice's (compared exactly).
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.export.hf import read_safetensors
from megatron_ext.export.quantized import HF_QUANT_CONFIG, export_quantized_hf, load_quantized_hf
from megatron_ext.quant.config import QuantConfig
from megatron_ext.quant.convert import convert_to_quantized
from megatron_ext.quant.formats import NVFP4_BLOCK
from megatron_ext.quant.numerics import pack_e2m1
from megatron_ext.quant.ptq import calibrate
from megatron_ext.quant.slicing import build_quantized_slice, slice_quantized, sliced_qtensors
from tests.export.test_export_roundtrip import (
    BATCH,
    BUDGETS,
    SEQ,
    budget_widths,
    build,
    controller,
    logits,
    tokens,
)

FORMATS = ("fp8", "nvfp4")
QKV = "decoder.layers.1.self_attention.linear_qkv"
UP = "backbone.layers.4.mixer.up_proj"  # the dense MLP's linear_fc1


@pytest.fixture(scope="module")
def pgs():
    from megatron_ext.parallel import ParallelConfig, init_distributed

    return init_distributed(ParallelConfig())


@pytest.fixture(scope="module", params=FORMATS)
def exported(request, pgs, tmp_path_factory):
    """(format, quantized elastic model, its controller, {budget: export dir})."""
    fmt = request.param
    model = build(pgs)
    ctrl = controller()
    convert_to_elastic(model, ctrl)
    budgets = {name: budget_widths(name) for name in BUDGETS}
    convert_to_quantized(model, QuantConfig(format=fmt), controller=ctrl, budgets=budgets)
    pos = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    calibrate(model, [{"tokens": tokens(), "position_ids": pos}], ctrl, budgets)
    root = tmp_path_factory.mktemp(f"hf_{fmt}")
    for name, widths in budgets.items():
        export_quantized_hf(
            model, widths, root / name, budget=name, controller=ctrl, tokenizer=ByteTokenizer()
        )
    return fmt, model, ctrl, root


@pytest.mark.parametrize("budget", BUDGETS)
def test_loaded_quantized_export_has_the_logits_of_the_quantized_slice(exported, pgs, budget):
    fmt, model, _, root = exported
    cfg, state, qstate = slice_quantized(model, budget_widths(budget))
    expected = logits(build_quantized_slice(cfg, state, qstate, pgs).eval())
    loaded = load_quantized_hf(root / budget, pgs).eval()
    assert torch.equal(logits(loaded), expected)
    with torch.no_grad():  # and the stored numbers are the quantized ones, not the floats
        up = loaded.decoder.layers[4].mlp.linear_fc1.weight
        assert not torch.equal(up, state["decoder.layers.4.mlp.linear_fc1.weight"])


@pytest.mark.parametrize("budget", BUDGETS)
def test_export_follows_the_modelopt_layout(exported, budget):
    fmt, _, _, root = exported
    quant = json.loads((root / budget / HF_QUANT_CONFIG).read_text())["quantization"]
    assert quant["quant_algo"] == {"fp8": "FP8", "nvfp4": "NVFP4"}[fmt]
    assert quant["exclude_modules"] == ["lm_head"]
    assert quant.get("group_size") == (NVFP4_BLOCK if fmt == "nvfp4" else None)
    config = json.loads((root / budget / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    tensors = read_safetensors(root / budget)
    rows, cols = config["intermediate_size"], config["hidden_size"]
    assert tensors["lm_head.weight"].dtype == torch.float32
    assert tensors[f"{UP}.input_scale"].dtype == torch.float32
    assert tensors[f"{UP}.input_scale"].shape == ()
    if fmt == "fp8":
        assert tensors[f"{UP}.weight"].dtype == torch.float8_e4m3fn
        assert tensors[f"{UP}.weight"].shape == (rows, cols)
        assert tensors[f"{UP}.weight_scale"].shape == ()
        assert f"{UP}.weight_scale_2" not in tensors
    else:
        assert tensors[f"{UP}.weight"].dtype == torch.uint8
        assert tensors[f"{UP}.weight"].shape == (rows, cols // 2)
        assert tensors[f"{UP}.weight_scale"].dtype == torch.float8_e4m3fn
        assert tensors[f"{UP}.weight_scale"].shape == (rows, cols // NVFP4_BLOCK)
        assert tensors[f"{UP}.weight_scale_2"].dtype == torch.float32


def test_stored_tensors_are_the_sliced_quantized_tensors_with_qkv_split(exported):
    fmt, model, _, root = exported
    sliced = sliced_qtensors(model, budget_widths("S"))
    tensors = read_safetensors(root / "S")
    mlp = sliced["decoder.layers.4.mlp.linear_fc1"]
    stored = mlp.data if fmt == "fp8" else pack_e2m1(mlp.data)
    assert torch.equal(tensors[f"{UP}.weight"].view(torch.uint8), stored.view(torch.uint8))
    qkv = sliced[QKV]
    q, k, v = (tensors[f"backbone.layers.1.mixer.{p}_proj.weight"] for p in "qkv")
    assert q.shape[0] + k.shape[0] + v.shape[0] == qkv.data.shape[0]
    for part in ("q", "k", "v"):  # the fused projection's per-tensor scales, shared
        scale = "weight_scale" if fmt == "fp8" else "weight_scale_2"
        stored_scale = tensors[f"backbone.layers.1.mixer.{part}_proj.{scale}"]
        assert torch.equal(stored_scale, qkv.scale)
