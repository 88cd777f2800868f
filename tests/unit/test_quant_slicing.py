"""Quantized elastic models: conversion keeps upstream keys, and slicing stays exact.

The tiny hybrid with seeded random weights, striped for TP=2 / EP=2 (slicing then selects
non-prefix FFN channels and experts), made elastic, then quantized (FP8 or NVFP4) and
calibrated on real text at every budget.

Tolerances.
* Quantized tensors and scales: slicing the elastic model's quantized tensors and quantizing
  the slice (with the inherited per-tensor scales) perform the same float32 operations on
  the same numbers: bit-identical, compared exactly.
* Logits of the masked quantized elastic model against the quantized slice: the unquantized
  models agree to rounding (~4e-7, see test_slicing). Quantization is a step function of
  its input, so a rounding difference can move an activation across a rounding boundary:
  one value changes by up to one grid step (1/8 relative in FP8, up to 1/3 in NVFP4). Such
  flips are rare, so the mean difference stays at rounding level: bound 1e-4 on the mean
  absolute logit difference, and 1e-5 on the median (measured: no flip, max 1.8e-7, mean
  6e-9). Quantization itself moves the logits by a mean 1e-2 (FP8) to 3e-2 (NVFP4), so a
  wrongly sliced tensor or scale fails the bound by two orders of magnitude.
* A quant state saved and applied again gives the same numbers: identical logits.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic, export
from megatron_ext.models.config import ConfigError
from megatron_ext.quant.config import QuantConfig
from megatron_ext.quant.convert import convert_to_quantized, export_quantized
from megatron_ext.quant.formats import QTensor, quantize, scale_from_amax
from megatron_ext.quant.ptq import calibrate
from megatron_ext.quant.slicing import (
    build_quantized_slice,
    inherited_scales,
    quantize_weights,
    slice_qtensor,
    slice_quantized,
    sliced_qtensors,
)
from megatron_ext.quant.state import apply_quant_state, quant_state
from tests.unit.test_elastic_layers import CHOICES, MODEL, SMALL, batch, build, logits, make_world

ALIGNED = {"embedding": 96, "attn_heads": 2, "mamba_heads": 4, "ffn": 128, "moe_experts": 4}
BUDGETS = {"L": {}, "aligned": ALIGNED, "small": SMALL}
FORMATS = ("fp8", "nvfp4")


@pytest.fixture(scope="module")
def world():
    return make_world()


def calib_batches() -> list[dict[str, torch.Tensor]]:
    tokens, pos, _ = batch()
    return [{"tokens": tokens, "position_ids": pos}]


def quantized_elastic(world, fmt: str, **cfg):
    model = build(world, seed=21)
    ctrl = ElasticController(MODEL, StripeLayout(tp=2, ep=2))
    convert_to_elastic(model, ctrl)
    record = convert_to_quantized(
        model, QuantConfig(format=fmt, **cfg), controller=ctrl, budgets=BUDGETS
    )
    calibrate(model, calib_batches(), ctrl, BUDGETS)
    return model, ctrl, record


@pytest.fixture(scope="module", params=FORMATS)
def quantized(world, request):
    return quantized_elastic(world, request.param)


def same(a: QTensor, b: QTensor) -> bool:
    """Bit-identical stored values and scales."""
    if a.data.dtype != b.data.dtype or a.data.shape != b.data.shape:
        return False
    bits = torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    blocks = (a.block_scale is None) == (b.block_scale is None)
    if a.block_scale is not None and b.block_scale is not None:
        blocks = torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
    return bits and blocks and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("widths", [ALIGNED, SMALL], ids=["aligned", "small"])
def test_slicing_quantized_tensors_equals_quantizing_the_slice(quantized, widths):
    model, ctrl, record = quantized
    sliced = sliced_qtensors(model, widths)
    _, state, qstate = slice_quantized(model, widths)
    requantized = quantize_weights(state, qstate)
    assert sliced.keys() == requantized.keys() == qstate["modules"].keys()
    assert len(sliced) >= 29  # 32 linears at these widths, less 3 NVFP4 out_proj kept
    different = [name for name in sliced if not same(sliced[name], requantized[name])]
    assert not different


def test_slices_inherit_the_elastic_per_tensor_weight_scale(quantized):
    model, _, record = quantized
    _, state, qstate = slice_quantized(model, ALIGNED)
    fmt = record.config.format
    name = "decoder.layers.0.mixer.in_proj"  # rows and inputs both sliced
    full = record.modules[name].weight
    assert qstate["modules"][name]["weight_scale"] == float(scale_from_amax(full.abs().max(), fmt))
    own = float(scale_from_amax(state[name + ".weight"].abs().max(), fmt))
    assert own < qstate["modules"][name]["weight_scale"]  # the slice alone would rescale
    assert qstate["modules"] == inherited_scales(model, ALIGNED)


def test_nvfp4_keeps_linears_whose_budget_splits_blocks_unquantized(world):
    _, _, record = quantized_elastic(world, "nvfp4")
    # mamba_head_dim 8 keeps 8 of every head's 16 out_proj inputs: blocks of 16 split
    split = {n for n, why in record.high_precision.items() if "split 16-element blocks" in why}
    assert split == {f"decoder.layers.{i}.mixer.out_proj" for i in (0, 2, 5)}
    _, _, fp8 = quantized_elastic(world, "fp8")
    assert set(fp8.high_precision) == {"output_layer"}  # per-tensor scales have no blocks
    with pytest.raises(ConfigError, match="quant.misaligned"):
        quantized_elastic(world, "nvfp4", misaligned="error")


def test_attention_policy_keeps_attention_and_the_mamba_layer_feeding_it_unquantized(world):
    model = build(world, seed=4)
    record = convert_to_quantized(model, QuantConfig(format="nvfp4", attention_high_precision=True))
    kept = {n for n, why in record.high_precision.items() if "attention" in why}
    # pattern M*ME-M*E: attention layers 1 and 6, fed by the Mamba layers 0 and 5
    layers = {int(n.split(".")[2]) for n in kept}
    assert layers == {0, 1, 5, 6}
    assert "decoder.layers.2.mixer.in_proj" in record.modules  # a Mamba layer feeding an MoE


def test_slicing_a_block_in_two_is_refused():
    q = quantize(torch.randn(4, 32), torch.tensor(0.01), "nvfp4")
    cols = torch.zeros(32, dtype=torch.bool)
    cols[:8] = True
    with pytest.raises(ValueError, match="split NVFP4 blocks"):
        slice_qtensor(q, {1: cols}, "w")


@pytest.mark.parametrize("widths", [ALIGNED, SMALL], ids=["aligned", "small"])
def test_quantized_slice_logits_match_the_masked_quantized_elastic_logits(world, quantized, widths):
    model, ctrl, record = quantized
    with ctrl.at(widths, mode="masked"):
        masked = logits(model)
    cfg, state, qstate = slice_quantized(model, widths)
    sliced = logits(build_quantized_slice(cfg, state, qstate, world[1]).eval())
    diff = (sliced - masked).abs()
    assert diff.mean().item() <= 1e-4 and diff.median().item() <= 1e-5
    with record.controller.at("off"):
        assert not torch.allclose(logits(model), masked, atol=1e-3)  # quantization acts


def test_conversion_keeps_upstream_keys_and_round_trips(world):
    model = build(world, seed=3)
    keys = list(model.state_dict())
    classes = {n: type(m) for n, m in model.named_modules()}
    expected = logits(model)
    ctrl = ElasticController(MODEL)
    convert_to_elastic(model, ctrl)
    convert_to_quantized(model, QuantConfig(format="nvfp4"), controller=ctrl, budgets=BUDGETS)
    assert list(model.state_dict()) == keys
    assert "QuantElasticRowParallelLinear" in {type(m).__name__ for m in model.modules()}
    with pytest.raises(TypeError, match="export_quantized"):
        export(model)
    export(export_quantized(model))
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert torch.equal(logits(model), expected)


def test_elastic_conversion_comes_before_quantization(world):
    model = build(world, seed=3)
    convert_to_quantized(model, QuantConfig(format="fp8"))
    with pytest.raises(TypeError, match="convert to elastic first"):
        convert_to_elastic(model, ElasticController(MODEL))


def test_quant_state_applied_to_a_fresh_model_gives_identical_logits(world, quantized):
    model, ctrl, _ = quantized
    state = quant_state(model)
    with ctrl.at(ALIGNED):
        expected = logits(model)
    fresh = build(world, seed=21)
    fresh_ctrl = ElasticController(MODEL, StripeLayout(tp=2, ep=2))
    convert_to_elastic(fresh, fresh_ctrl)
    apply_quant_state(fresh, state)
    with fresh_ctrl.at(ALIGNED):
        assert torch.equal(logits(fresh), expected)


def test_uncalibrated_model_refuses_to_run_quantized(world):
    model = build(world)
    convert_to_quantized(model, QuantConfig(format="fp8"))
    with pytest.raises(RuntimeError, match="not calibrated"):
        logits(model)


def test_choices_used_here_pass_the_elastic_validation():
    assert CHOICES["mamba_head_dim"] == [16, 8]  # the misaligned width the NVFP4 test relies on


@pytest.mark.parametrize("widths", [{"mamba_heads": 4}, {"attn_heads": 2}], ids=str)
def test_narrow_compute_on_a_quantized_model_is_refused(quantized, widths):
    """Narrow compute calls ``F.linear`` itself and would skip the quantized GEMM silently."""
    model, ctrl, _ = quantized
    with ctrl.at(widths, mode="narrow"), pytest.raises(TypeError, match="compute masked"):
        logits(model)
    with ctrl.at(widths, mode="masked"):
        assert torch.isfinite(logits(model)).all()
