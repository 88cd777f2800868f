"""Shims that let megatron-core 0.16.1's training engine (DDP, optimizer, schedules) run on CPU.

Applied once by :func:`apply_engine_shims`, which the entry points call explicitly (the
command line, the test configuration, the benchmarks, the distributed test scripts); nothing
applies them on import. Each shim names its upstream site (megatron-core 0.16.1). None
changes numerics: they move tensors that upstream creates with ``device="cuda"`` to the CPU,
answer CUDA type-name checks for CPU tensors, skip a CUDA RNG state, fix two
distributed-optimizer checkpoint problems of torch's (non-Apex) Adam, and turn a bucket
collective over a group of one rank into the copy it amounts to.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

_APPLIED: list[str] = []

_FACTORIES = frozenset({"tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like"})


def _host(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _HostTorch(types.ModuleType):
    """The ``torch`` module as one upstream module sees it: factories given ``device="cuda"``
    build on the CPU; everything else is torch's own attribute."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        @functools.wraps(attr)
        def on_host(*args: Any, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _host(kwargs["device"])
            return attr(*args, **kwargs)

        return on_host


def host_device_literals() -> None:
    """Shim A: tensors upstream builds with a hard-coded ``device="cuda"`` go to the CPU.

    Upstream sites: ``optimizer/optimizer.py`` 481 / 485 / 907 (``_dummy_overflow_buf``,
    ``_scale_one``, ``FP32Optimizer._scale``), ``optimizer/clip_grads.py`` 90 / 103 / 115 /
    174 / 207, ``utils.py`` 1207 (``local_multi_tensor_l2_norm``). Each of these modules gets
    a ``torch`` name whose tensor factories map a CUDA device to the CPU; model code is
    untouched (a global ``TorchFunctionMode`` would tax every op). The schedules' token
    counters (``pipeline_parallel/schedules.py`` 596 / 983 / 2138) are
    :func:`megatron_ext.compat.pipeline.cpu_schedule_tensors`'.
    """
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    proxy = _HostTorch()
    for module in (optimizer, clip_grads, utils):
        module.torch = proxy  # type: ignore[attr-defined]


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """Within the block, ``Tensor.type()`` of a CPU tensor reads ``torch.cuda.<T>Tensor``."""
    original = torch.Tensor.type

    def cuda_named(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original(self, *args, **kwargs)
        if not args and not kwargs and self.device.type == "cpu":
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = cuda_named  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _with_cuda_type_names(owner: Any, name: str) -> None:
    raw = getattr(owner, name)

    @functools.wraps(raw)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return raw(*args, **kwargs)

    setattr(owner, name, wrapped)


def cuda_type_name_checks() -> None:
    """Shim B: upstream asserts ``param.type() == "torch.cuda.FloatTensor"`` (and the half
    types) to pick main-parameter handling; CPU tensors answer with the CUDA names there.

    Upstream sites: ``optimizer/distrib_optimizer.py`` 361 / 420
    (``_build_model_and_main_param_groups``, called from ``__init__``) and 582 (``__init__``),
    ``optimizer/optimizer.py`` 671 / 690
    (``Float16OptimizerWithFloat16Params.__init__``), ``optimizer/clip_grads.py`` 167
    (``clip_grad_by_total_norm_fp32``). Only inside these functions.
    """
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    dist_opt = distrib_optimizer.DistributedOptimizer
    _with_cuda_type_names(dist_opt, "__init__")
    _with_cuda_type_names(optimizer.Float16OptimizerWithFloat16Params, "__init__")
    _with_cuda_type_names(clip_grads, "clip_grad_by_total_norm_fp32")
    # optimizer.py imports the function by name.
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


def host_recompute_rng() -> None:
    """Shim C: activation recomputation saves and restores no CUDA generator state on CPU.

    Upstream site: ``tensor_parallel/random.py`` 41 / 72 (``_get_cuda_rng_state``,
    ``_set_cuda_rng_state``), called by ``CheckpointFunction`` and the RNG tracker's fork. The
    CPU generator and the tracker's named states are still saved and restored by upstream.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None


def _prime_adam_state(dist_opt: Any) -> None:
    """Give every main parameter zero ``step`` / ``exp_avg`` / ``exp_avg_sq`` state."""
    inner = dist_opt.optimizer
    for group in inner.param_groups:
        for param in group["params"]:
            if not inner.state.get(param):
                inner.state[param] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(param),
                    "exp_avg_sq": torch.zeros_like(param),
                }


def distributed_optimizer_checkpoints() -> None:
    """Shim D: the distributed optimizer's torch_dist checkpoints with torch's Adam.

    Upstream sites, ``optimizer/distrib_optimizer.py``:

    - 1175 ``sharded_state_dict(is_loading=True)`` calls ``state_dict()``, which asserts one
      ``step`` over a state that a fresh optimizer has not created: the state is primed with
      zeros first (the load overwrites it);
    - 911 ``_set_main_param_and_optimizer_states`` copies every key of the destination
      state, ``step`` included, from the loaded tensors, which hold no ``step``: keys that were
      not loaded keep their value;
    - 690 ``load_state_dict`` puts ONE ``step`` tensor into every parameter's state, and
      torch's Adam increments it once per parameter, so a resumed run silently diverges:
      every parameter gets its own copy.
    """
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    sharded_state_dict = cls.sharded_state_dict
    set_states = cls._set_main_param_and_optimizer_states
    load_state_dict = cls.load_state_dict

    @functools.wraps(sharded_state_dict)
    def primed_sharded_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("is_loading", len(args) > 1 and args[1]):
            _prime_adam_state(self)
        return sharded_state_dict(self, *args, **kwargs)

    @functools.wraps(set_states)
    def set_loaded_states(self, model_param: Any, tensors: dict[str, Any]) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        kept = {k: v for k, v in self.optimizer.state[main_param].items() if k not in tensors}
        set_states(self, model_param, {**kept, **tensors})

    @functools.wraps(load_state_dict)
    def load_with_own_steps(self, state_dict: Any) -> None:
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().clone()

    cls.sharded_state_dict = primed_sharded_state_dict  # type: ignore[method-assign]
    cls._set_main_param_and_optimizer_states = set_loaded_states  # type: ignore[method-assign]
    cls.load_state_dict = load_with_own_steps  # type: ignore[method-assign]


def _identity_over_one_rank(collective: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(collective)
    def call(output: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group")
        if group is not None and not kwargs.get("async_op", False) and group.size() == 1:
            if output.data_ptr() != input.data_ptr() or output.numel() != input.numel():
                output.copy_(input)
            return None
        return collective(output, input, *args, **kwargs)

    return call


def single_rank_bucket_collectives() -> None:
    """Shim E: a bucket's reduce-scatter and all-gather over a group of ONE rank are copies.

    Upstream site: ``distributed/param_and_grad_buffer.py`` 35-36 (``dist_all_gather_func``,
    ``dist_reduce_scatter_func``), called by ``start_grad_sync`` (443) and
    ``start_param_sync`` (277) when the distributed optimizer is on. Over a data-parallel group
    of one rank each is the identity on the bucket (its shard is the whole bucket), yet gloo
    runs it as a coalesced collective: about 6% of a 1-rank step at hidden 256. A synchronous
    call over such a group copies (or, when the shard is the bucket itself, does nothing) and
    returns; an asynchronous one (``overlap_grad_reduce``), or any group of more ranks, goes to
    upstream's collective. The gradient scaling before the call is upstream's either way.
    """
    from megatron.core.distributed import param_and_grad_buffer as buffers

    buffers.dist_reduce_scatter_func = _identity_over_one_rank(buffers.dist_reduce_scatter_func)
    buffers.dist_all_gather_func = _identity_over_one_rank(buffers.dist_all_gather_func)


def gloo_optimizer_groups(optimizer: Any) -> None:
    """On gloo, the distributed optimizer's data-parallel group is its gloo group too.

    Upstream site: ``optimizer/distrib_optimizer.py`` 1444-1450 and 1077-1089: the
    ``fully_reshardable`` checkpoint gathers its state over ``data_parallel_group_gloo``, or
    else moves it with ``.cuda()``. Upstream builds no gloo group when process groups are
    passed explicitly (``get_megatron_optimizer(pg_collection=...)``); when the data-parallel
    group is itself a gloo group, it is the one to use.
    """
    import torch.distributed as dist

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        group = getattr(opt, "data_parallel_group", None)
        no_gloo = getattr(opt, "data_parallel_group_gloo", 0) is None
        if group is not None and no_gloo and dist.get_backend(group) == "gloo":
            opt.data_parallel_group_gloo = group


def distributed_optimizer_metadata() -> dict[str, Any]:
    """The ``metadata`` of the distributed optimizer's ``sharded_state_dict`` on this backend.

    ``fully_reshardable``: the default layout cannot be saved with torch's Adam
    (``ShardedTensor.flattened_range is not supported``). Over gloo also its memory-efficient
    variant (upstream site: ``optimizer/distrib_optimizer.py`` 1443), whose gathers go through
    the gloo group (see :func:`gloo_optimizer_groups`) instead of ``.cuda()`` copies.
    """
    import torch.distributed as dist

    metadata: dict[str, Any] = {"distrib_optim_sharding_type": "fully_reshardable"}
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
    return metadata


def p2p_settings(config: Any, backend: str) -> None:
    """Pipeline p2p settings a backend needs, set on a ``TransformerConfig``.

    Upstream site: ``pipeline_parallel/p2p_communication.py`` ``_batched_p2p_ops`` (taken with
    the default ``batch_p2p_comm=True``) posts ``torch.distributed.batch_isend_irecv``; over
    gloo the interleaved (virtual-stage) schedule then exchanges the wrong tensors silently
    (a different step-0 loss, a growing grad norm). gloo gets the unbatched send/recv path.
    """
    if backend == "gloo":
        config.batch_p2p_comm = False


_SHIMS: dict[str, Callable[[], None]] = {
    "host_device_literals": host_device_literals,
    "cuda_type_name_checks": cuda_type_name_checks,
    "host_recompute_rng": host_recompute_rng,
    "single_rank_bucket_collectives": single_rank_bucket_collectives,
}


def apply_engine_shims() -> list[str]:
    """Apply the engine shims this machine needs, once; return their names.

    Without CUDA: A, B, C and E. D wherever upstream runs torch's own Adam (no Apex or TE): it is
    about that optimizer, not the device.
    """
    if _APPLIED:
        return list(_APPLIED)
    from megatron_ext.compat import ensure_compat

    ensure_compat()  # the model-level shims first: upstream's optimizer imports its layers
    from megatron.core.optimizer import distrib_optimizer

    from megatron_ext.compat.optional import cuda_available

    if not cuda_available():
        for name, shim in _SHIMS.items():
            shim()
            _APPLIED.append(name)
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        distributed_optimizer_checkpoints()
        _APPLIED.append("distributed_optimizer_checkpoints")
    return list(_APPLIED)
