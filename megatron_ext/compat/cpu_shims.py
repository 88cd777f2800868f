"""Shims that let megatron-core 0.16.1 run on a machine without CUDA.

Each function below covers one upstream site that assumes CUDA. They are applied together,
once, by :func:`megatron_ext.compat.ensure_compat`, and only when CUDA is unavailable (the
triton stub also applies on a GPU machine without triton). None of them changes numerics:
they redirect device queries and stream handling to their CPU equivalents. megatron-core is
pinned exactly because some of them touch private internals.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types

import torch


def redirect_current_device() -> None:
    """Map ``torch.cuda.current_device()`` to the CPU device.

    Upstream sites: about 175 calls of the form ``device=torch.cuda.current_device()``
    (``GlobalMemoryBuffer``, rotary ``inv_freq``, ``tensor_parallel/mappings.py``, the MoE
    router and dispatchers, ``MambaMixer.__init__``).
    """
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment,return-value]


def noop_cuda_synchronize() -> None:
    """Make ``torch.cuda.synchronize()`` a no-op; with no device there is nothing to wait for.

    Upstream site: ``dist_checkpointing/strategies/filesystem_async.py`` (before writing).
    """
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]


class _HostStream:
    """Stand-in for ``torch.cuda.Stream``: work on the host is already ordered."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def wait_stream(self, other: object) -> None:
        """Nothing to wait for on the host."""

    def synchronize(self) -> None:
        """Nothing to synchronise on the host."""


def host_streams() -> None:
    """Replace CUDA streams with host no-ops.

    Upstream site: ``transformer/moe/token_dispatcher.py`` ``MoEAlltoAllTokenDispatcher``
    creates ``torch.cuda.Stream()`` for its device-to-host copies and enters
    ``torch.cuda.stream(...)``.
    """
    torch.cuda.Stream = _HostStream  # type: ignore[assignment,misc]
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda device=None: _HostStream()  # type: ignore[assignment,return-value]


def cpu_rng_tracker() -> None:
    """Make megatron-core build its RNG tracker on the CPU generator.

    Upstream site: ``tensor_parallel/random.py`` ``initialize_rng_tracker`` instantiates
    ``CudaRNGStatesTracker``, whose ``add``/``fork`` use ``torch.cuda`` generator states.
    ``model_parallel_cuda_manual_seed`` also calls ``torch.cuda.manual_seed``, a silent no-op
    here, so the training code seeds the CPU generator itself.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    from megatron_ext.compat.rng import CpuRNGStatesTracker

    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker  # type: ignore[misc]
    mcore_random.initialize_rng_tracker(force_reset=True)


def disable_te_router_gemm() -> None:
    """Define the missing ``te_general_gemm`` name as ``None``.

    Upstream site: ``transformer/moe/moe_utils.py`` — without Transformer Engine, 0.16.1 raises
    ``NameError: te_general_gemm`` on every MoE router forward; ``None`` selects its torch path.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def quiet_rng_warning() -> None:
    """Silence the tracker's 'CPU RNG state changed within GPU RNG context' warning.

    Upstream site: ``tensor_parallel/random.py`` logs it on every fork when the CPU generator
    is the tracked generator, which is always the case here.
    """
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)


def stub_triton_tensor_ops() -> None:
    """Provide ``inference/.../triton/tensor_ops`` when triton is absent.

    Upstream site: ``ssm/mamba_mixer.py`` imports ``tensor_get_slice_after``,
    ``tensor_masked_update`` and ``tensor_merge`` from a module that does a hard
    ``import triton``. They are used only by dynamic-batching inference, which the project
    does not use; the stubs raise if they are ever called.
    """
    name = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"
    if name in sys.modules:
        return
    module = types.ModuleType(name)

    def _needs_triton(*args: object, **kwargs: object) -> None:
        raise RuntimeError("megatron-core dynamic-batching inference needs triton")

    for fn in ("tensor_get_slice_after", "tensor_masked_update", "tensor_merge"):
        setattr(module, fn, _needs_triton)
    sys.modules[name] = module


def apply_cpu_shims() -> None:
    """Apply every CPU shim above. Call once, before building any megatron-core module."""
    redirect_current_device()
    noop_cuda_synchronize()
    host_streams()
    quiet_rng_warning()
    cpu_rng_tracker()
    disable_te_router_gemm()
