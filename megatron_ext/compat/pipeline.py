"""What megatron-core 0.16.1's pipeline parallelism needs on a machine without CUDA.

Two upstream sites hard-code the CUDA device on a path that only pipeline parallelism takes:

- ``pipeline_parallel/schedules.py`` lines 596, 983 and 2138 (the no-pipelining, interleaved
  and 1F1B schedules) build their token counter with ``torch.zeros([], dtype=torch.int,
  device="cuda")``. :func:`cpu_schedule_tensors` hands the schedules module a view of
  ``torch`` whose ``zeros`` places a ``device="cuda"`` tensor on the CPU; every other name is
  torch's own.
- ``models/common/language_module/language_module.py`` line 244: with tied embeddings and
  ``pp > 1`` the first and the last stage all-reduce the word-embedding copy after
  ``weight.data.cuda()``. :func:`host_tensor_cuda` makes ``Tensor.cuda()`` return the tensor
  itself, since there is no device to move it to.

Both are applied by :func:`apply_pipeline_cpu_shims` (from
:func:`megatron_ext.compat.ensure_compat`, only without CUDA). Neither changes numerics.

:func:`sum_over_pipeline_stages` marks parameters that every stage holds a copy of and uses
(the elastic router) so that megatron-core's own ``finalize_model_grads`` sums their
gradients over the pipeline group: upstream's ``_allreduce_conditional_embedding_grads``
(``distributed/finalize_model_grads.py`` lines 89-130, 0.16.1) reduces every parameter marked
``pipeline_parallel`` when the config says ``has_cond_embedder``. megatron-core 0.18 adds the
same reduction for its Flextron router (``flextron_router_pp_sync``).
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch


class _TorchOnHost(types.ModuleType):
    """``torch`` as the schedules module sees it: ``zeros(device="cuda")`` lands on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        """``torch.zeros`` with a ``"cuda"`` device replaced by the CPU."""
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def cpu_schedule_tensors() -> None:
    """Let megatron-core's pipeline schedules build their token counter on the CPU."""
    from megatron.core.pipeline_parallel import schedules

    if not isinstance(schedules.torch, _TorchOnHost):
        schedules.torch = _TorchOnHost()  # type: ignore[assignment]


def host_tensor_cuda() -> None:
    """Make ``Tensor.cuda()`` a no-op that returns the tensor (there is no device)."""

    def _stay_on_host(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    torch.Tensor.cuda = _stay_on_host  # type: ignore[method-assign,assignment]


def apply_pipeline_cpu_shims() -> None:
    """Apply both shims above (idempotent)."""
    cpu_schedule_tensors()
    host_tensor_cuda()


def sum_over_pipeline_stages(params: Iterable[torch.nn.Parameter], config: Any) -> int:
    """Have ``finalize_model_grads`` sum these parameters' gradients over the PP group.

    ``params`` must belong to the model chunks passed to ``finalize_model_grads`` (megatron
    DDP: their gradients are the ``main_grad`` it reduces); ``config`` is those chunks'
    ``TransformerConfig``. Returns how many parameters were marked.
    """
    count = 0
    for param in params:
        param.pipeline_parallel = True  # type: ignore[attr-defined]
        count += 1
    config.has_cond_embedder = True
    return count
