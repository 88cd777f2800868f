"""GPU tier (marker ``gpu``, run by ``make test-gpu``): the FP8 GEMM backend.

``torch._scaled_mm`` on E4M3 operands must equal the fake-quant GEMM it replaces: both
quantize the same values with the same per-tensor scales; the only difference is the GEMM's
accumulation order (fp32 on both sides), hence the relative tolerance of 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.compat.optional import default_device, have_fp8_gemm
from megatron_ext.quant.backends import scaled_mm_forward
from megatron_ext.quant.formats import fake_quantize, scale_from_amax

pytestmark = pytest.mark.gpu


def test_scaled_mm_gemm_equals_the_fake_quant_gemm():
    if not have_fp8_gemm():
        pytest.fail("the gpu tier needs a GPU with FP8 GEMMs (compute capability >= 8.9)")
    device = default_device()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 256, generator=gen).to(device)
    w = (torch.randn(128, 256, generator=gen) * 0.05).to(device)
    xs, ws = scale_from_amax(x.abs().max(), "fp8").to(device), scale_from_amax(w.abs().max(), "fp8")
    out = scaled_mm_forward(x, w, xs, ws.to(device), {})
    assert out is not None
    ref = fake_quantize(x, xs, "fp8") @ fake_quantize(w, ws.to(device), "fp8").t()
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
