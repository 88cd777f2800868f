"""Guarded imports of the optional GPU backends.

Transformer Engine and mamba-ssm cannot be installed on CPU-only machines, and importing
them there can fail with ``ImportError``, ``RuntimeError`` (TE's meta package) or
``OSError`` (a missing CUDA shared library). Every optional backend is probed here, once,
and the rest of the project asks these flags instead of importing the backend itself.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch

_IMPORT_FAILURES = (ImportError, RuntimeError, OSError)


@cache
def _probe(module: str) -> bool:
    try:
        importlib.import_module(module)
    except _IMPORT_FAILURES:
        return False
    return True


def have_transformer_engine() -> bool:
    """Whether ``transformer_engine.pytorch`` imports on this machine."""
    return _probe("transformer_engine.pytorch")


def have_mamba_ssm() -> bool:
    """Whether the fused mamba-ssm Triton kernels import on this machine."""
    return _probe("mamba_ssm.ops.triton.ssd_combined")


def have_triton() -> bool:
    """Whether ``triton`` imports on this machine."""
    return _probe("triton")


def cuda_available() -> bool:
    """Whether a CUDA device can be used."""
    return torch.cuda.is_available()


def have_fp8_gemm() -> bool:
    """Whether FP8 GEMMs (``torch._scaled_mm``) run here: a CUDA GPU of compute capability
    8.9 or newer (Ada, Hopper, Blackwell)."""
    if not cuda_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability() >= (8, 9)


def default_device() -> torch.device:
    """The device the project computes on: the current CUDA device if any, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_device(group=None) -> torch.device:
    """The device ``torch.distributed`` collectives on ``group`` take their tensors on: the
    current CUDA device for NCCL, else the CPU (gloo)."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_report() -> dict[str, bool | str]:
    """A summary of the optional backends, for ``summary.json`` and logs."""
    return {
        "device": str(default_device()),
        "transformer_engine": have_transformer_engine(),
        "mamba_ssm": have_mamba_ssm(),
        "triton": have_triton(),
    }
