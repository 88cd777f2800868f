"""FP8 and NVFP4 quantization of elastic models: formats, conversion, PTQ, QAD, slicing.

* :mod:`.numerics`, :mod:`.formats`: E4M3 / E2M1 rounding, FP8 and NVFP4 quantization, the
  straight-through fake-quant autograd function;
* :mod:`.layers`, :mod:`.convert`: quantized megatron-core linears by class swap (after the
  elastic conversion), and which linears stay in high precision;
* :mod:`.backends`: fake-quant, ``torch._scaled_mm`` FP8 GEMMs, Transformer Engine;
* :mod:`.ptq`, :mod:`.qad`: amax calibration, and quantization-aware distillation over the
  budgets;
* :mod:`.state`, :mod:`.slicing`: the quantization state file, and exact quantized slicing.

The quantized Hugging Face export is :mod:`megatron_ext.export.quantized`.
"""

from megatron_ext.quant.config import QADConfig, QuantConfig
from megatron_ext.quant.convert import convert_to_quantized, export_quantized, is_quantized

__all__ = [
    "QADConfig",
    "QuantConfig",
    "convert_to_quantized",
    "export_quantized",
    "is_quantized",
]
