"""FP8 (E4M3) and NVFP4 (E2M1 + E4M3 block scales) numerics, the fake-quant function, configs.

Tolerances. Rounding to a grid whose spacing is a power of two is exact in float32, so every
comparison here is exact equality (bit-identical), except the ``scaled_mm`` GPU check: the
same E4M3 operands multiplied by a tensor-core GEMM (FP32 accumulation in another order)
and by a float32 GEMM differ by accumulation rounding, ~1e-6 relative per sum of 256
products; bound 1e-4 of the output scale. A wrong scale or rounding is off by >= 1/16.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.compat.optional import (
    have_fp8_gemm,
    have_transformer_engine,
)
from megatron_ext.models.config import ConfigError
from megatron_ext.quant.backends import resolve_backend
from megatron_ext.quant.config import QADConfig, QuantConfig
from megatron_ext.quant.formats import (
    NVFP4_BLOCK,
    fake_quant,
    fake_quantize,
    quantize,
    scale_from_amax,
)
from megatron_ext.quant.numerics import (
    E2M1_VALUES,
    decode_e2m1,
    encode_e2m1,
    pack_e2m1,
    round_e2m1,
    round_e4m3,
    to_e4m3,
    unpack_e2m1,
)


def _all_e4m3() -> torch.Tensor:
    """Every finite E4M3 value (all 256 bit patterns but the two NaNs)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[~values.isnan()]


# ---- element formats -------------------------------------------------------------------------


def test_every_e2m1_value_round_trips_through_rounding_codes_and_packing():
    codes = torch.arange(16, dtype=torch.uint8)
    values = decode_e2m1(codes)
    assert sorted(set(values.abs().tolist())) == list(E2M1_VALUES)
    assert torch.equal(round_e2m1(values), values)  # already representable: unchanged
    assert torch.equal(encode_e2m1(values), codes)  # including -0 (code 8)
    packed = pack_e2m1(codes.view(2, 8))
    assert packed.dtype == torch.uint8 and packed.shape == (2, 4)
    assert packed[0, 0].item() == (1 << 4) | 0  # element 0 low nibble, element 1 high
    assert torch.equal(unpack_e2m1(packed), codes.view(2, 8))


def test_e2m1_rounds_to_nearest_with_ties_to_even_and_saturates_at_6():
    x = torch.tensor([0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, 1e9, -5.0])
    expected = [0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -4.0]
    assert round_e2m1(x).tolist() == expected


def test_every_finite_e4m3_value_round_trips():
    values = _all_e4m3()
    assert values.numel() == 254
    assert torch.equal(round_e4m3(values), values)
    assert torch.equal(to_e4m3(values).float(), values)


def test_e4m3_rounding_equals_torch_float8_e4m3fn_cast():
    grid = _all_e4m3().unique()
    grid = grid[grid >= 0]
    ties = (grid[1:] + grid[:-1]) / 2  # exact midpoints: ties to even decide
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(200_000, generator=gen) * torch.exp2(
        torch.randn(200_000, generator=gen) * 5
    )
    x = torch.cat([ties, -ties, spread.clamp(-448, 448), grid[:20] * 0.75])
    assert torch.equal(round_e4m3(x), x.to(torch.float8_e4m3fn).float())


def test_e4m3_saturates_at_448():
    x = torch.tensor([448.0, 460.0, 464.0, 1e6, float("inf"), -1e6])
    assert round_e4m3(x).tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0]


# ---- per-tensor FP8 and block NVFP4 ----------------------------------------------------------


def test_fp8_scale_maps_the_amax_to_448():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.0]])
    scale = scale_from_amax(x.abs().max(), "fp8")
    q = quantize(x, scale, "fp8")
    assert q.data.dtype == torch.float8_e4m3fn
    assert q.data.float().abs().max().item() == 448.0
    assert q.dequantize()[0, 1].item() == -3.0


def test_nvfp4_block_scale_is_e4m3_of_block_amax_over_6():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, generator=gen) * torch.tensor([0.01, 1.0, 30.0, 5.0]).repeat_interleave(
        16
    )
    scale = scale_from_amax(x.abs().max(), "nvfp4")
    q = quantize(x, scale, "nvfp4")
    assert q.block_scale is not None and q.block_scale.shape == (4, 64 // NVFP4_BLOCK)
    block_amax = x.abs().unflatten(-1, (-1, NVFP4_BLOCK)).amax(-1)
    assert torch.equal(q.block_scale.float(), round_e4m3(block_amax / (6 * scale)))
    assert q.scale.item() == (x.abs().max() / (6 * 448)).item()  # FP32, as stored


def test_nvfp4_block_saturates_when_its_scale_rounds_down():
    # scale 1: block amax 6.36 -> block scale e4m3(1.06) = 1.0 (rounds down) -> 6.36 / 1 > 6
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1], x[0, 2] = 6.36, -6.2, 2.9
    out = fake_quantize(x, torch.tensor(1.0), "nvfp4")
    assert out[0, :3].tolist() == [6.0, -6.0, 3.0]


def test_nvfp4_block_scale_saturates_at_448_for_inputs_beyond_the_calibrated_range():
    scale = torch.tensor(1.0 / (6 * 448))  # calibrated amax 1
    x = torch.full((1, 16), 10.0)  # ten times what calibration saw
    q = quantize(x, scale, "nvfp4")
    assert q.block_scale is not None and q.block_scale.float().max().item() == 448.0
    assert q.dequantize().max().item() == pytest.approx(1.0)  # clamped at the calibrated amax


def test_zero_blocks_and_zero_scales_quantize_to_zero():
    x = torch.zeros(2, 32)
    x[1, 16:] = torch.linspace(-1, 1, 16)
    assert torch.equal(fake_quantize(x, torch.tensor(0.0), "nvfp4"), torch.zeros(2, 32))
    assert torch.equal(fake_quantize(x, torch.tensor(0.0), "fp8"), torch.zeros(2, 32))
    out = fake_quantize(x, scale_from_amax(1.0, "nvfp4"), "nvfp4")
    assert torch.equal(out[0], torch.zeros(32)) and torch.equal(out[1, :16], torch.zeros(16))


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_fake_quantize_is_bit_identical_to_the_dequantized_quantized_tensor(fmt):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 64, generator=gen) * 3
    scale = scale_from_amax(x.abs().max(), fmt)
    assert torch.equal(fake_quantize(x, scale, fmt), quantize(x, scale, fmt).dequantize())
    assert not torch.equal(fake_quantize(x, scale, fmt), x)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_fake_quant_gradient_is_straight_through(fmt):
    x = torch.randn(4, 32, requires_grad=True)
    upstream = torch.randn(4, 32)
    (fake_quant(x, scale_from_amax(4.0, fmt), fmt) * upstream).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, upstream)


def test_nvfp4_needs_the_input_dimension_in_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize(torch.ones(2, 24), torch.tensor(1.0), "nvfp4")


# ---- configs and backends --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"format": "int4"}, "quant.format"),
        ({"backend": "cuda"}, "quant.backend"),
        ({"format": "nvfp4", "backend": "scaled_mm"}, "quant.backend"),
        ({"calib_batches": 0}, "quant.calib_batches"),
        ({"misaligned": "ignore"}, "quant.misaligned"),
        ({"skip": [""]}, "quant.skip"),
    ],
)
def test_quant_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"teacher": "self"}, "qad_train.teacher"),
        ({"budget_probs": [0.5, 0.2]}, "qad_train.budget_probs"),
        ({"lr": 0.0}, "qad_train.lr"),
        ({"eval_batches": 0}, "qad_train.eval_batches"),
    ],
)
def test_qad_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        QADConfig(**kwargs)


def test_qad_lr_warms_up_then_decays_to_its_floor():
    cfg = QADConfig(steps=20, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(2.5e-4) and cfg.lr_at(3) == pytest.approx(1e-3)
    assert cfg.lr_at(20) == pytest.approx(1e-4)


@pytest.mark.skipif(have_fp8_gemm(), reason="this machine runs FP8 GEMMs")
def test_auto_backend_falls_back_to_fake_quant_and_scaled_mm_is_refused_without_fp8_gemms():
    assert resolve_backend(QuantConfig(format="fp8"))[0] == "fake"
    assert resolve_backend(QuantConfig(format="nvfp4"))[0] == "fake"
    with pytest.raises(ConfigError, match="quant.backend"):
        resolve_backend(QuantConfig(format="fp8", backend="scaled_mm"))


@pytest.mark.skipif(have_transformer_engine(), reason="Transformer Engine is installed")
def test_te_backend_is_refused_without_transformer_engine():
    with pytest.raises(ConfigError, match="quant.backend: te needs transformer-engine"):
        resolve_backend(QuantConfig(format="fp8", backend="te"))
