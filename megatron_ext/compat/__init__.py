"""Compatibility layer between megatron-core and the machine it runs on.

:func:`ensure_compat` is the single entry point. It is idempotent and is called once,
explicitly, by the entry points (``recipes/cli.py``, ``tests/conftest.py``, the bench and
torchrun case scripts) before any megatron-core model module is imported; no library module
applies it on import. What it applies depends on the machine:

- no CUDA: the CPU shims of :mod:`.cpu_shims` and of :mod:`.pipeline`;
- no triton: a stub for the triton-only inference tensor ops;
- no mamba-ssm: the pure-PyTorch Mamba kernels of :mod:`.mamba`;
- no Transformer Engine: torch norms where upstream hard-codes ``TENorm``.
"""

from __future__ import annotations

from megatron_ext.compat.optional import (
    backend_report,
    collective_device,
    cuda_available,
    default_device,
    have_mamba_ssm,
    have_transformer_engine,
    have_triton,
)

_APPLIED: list[str] = []


def ensure_compat() -> list[str]:
    """Apply the shims this machine needs (once) and return their names."""
    if _APPLIED:
        return list(_APPLIED)
    from megatron_ext.compat import cpu_shims, mamba, pipeline

    if not have_triton():
        cpu_shims.stub_triton_tensor_ops()
        _APPLIED.append("triton_tensor_ops_stub")
    if not cuda_available():
        cpu_shims.apply_cpu_shims()
        _APPLIED.append("cpu_shims")
        pipeline.apply_pipeline_cpu_shims()
        _APPLIED.append("pipeline_cpu_shims")
    if not have_mamba_ssm():
        mamba.install_torch_mamba_kernels()
        _APPLIED.append("torch_mamba_kernels")
    if not have_transformer_engine():
        mamba.torch_final_norm()
        _APPLIED.append("torch_final_norm")
    return list(_APPLIED)


__all__ = [
    "backend_report",
    "collective_device",
    "cuda_available",
    "default_device",
    "ensure_compat",
    "have_mamba_ssm",
    "have_transformer_engine",
    "have_triton",
]
