"""Gradient reduction and clipping across megatron-core's process groups.

Dense parameters are averaged over the data-parallel group. Routed-expert parameters
(megatron marks them ``allreduce=False``) already hold the sum over every rank's tokens
after the token dispatcher's backward, so they are summed over the expert-data-parallel
group and divided by the same data-parallel size: both then equal the gradient of the mean
loss over the global batch, as at TP=EP=DP=1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_expert_param(param: torch.nn.Parameter) -> bool:
    """Whether megatron-core marks ``param`` as a routed-expert (EP-sharded) parameter."""
    return not getattr(param, "allreduce", True)


def is_tp_sharded(param: torch.nn.Parameter) -> bool:
    """Whether ``param`` is split across the tensor-parallel group."""
    return bool(getattr(param, "tensor_model_parallel", False))


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce_coalesced(grads: list[torch.Tensor], group) -> None:
    if not grads or _size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_gradients(model: torch.nn.Module, pg_collection) -> None:
    """Average gradients over data parallelism (dense) and expert data parallelism (experts).

    Every rank contributes a gradient for every trainable parameter (zeros where autograd
    produced none), so the coalesced buffers have the same size on all ranks. Under sequence
    parallelism, replicated parameters marked ``sequence_parallel`` (norms)
    saw only this rank's part of the sequence: their gradients are first summed over TP.
    """
    dp = _size(pg_collection.dp)
    dense: list[torch.Tensor] = []
    expert: list[torch.Tensor] = []
    seq_parallel: list[torch.Tensor] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:  # e.g. an expert that got no tokens on this rank
            param.grad = torch.zeros_like(param)
        (expert if is_expert_param(param) else dense).append(param.grad)
        if getattr(param, "sequence_parallel", False):
            seq_parallel.append(param.grad)
    _all_reduce_coalesced(seq_parallel, pg_collection.tp)
    _all_reduce_coalesced(dense, pg_collection.dp)
    _all_reduce_coalesced(expert, pg_collection.expt_dp)
    if dp > 1:
        for g in dense + expert:
            g.div_(dp)


def clip_grad_norm(model: torch.nn.Module, max_norm: float, pg_collection) -> float:
    """Clip to ``max_norm`` by the global L2 norm over all shards; return the norm before.

    TP-sharded tensors are summed over the TP group, routed experts over the EP group (and
    expert-TP), and replicated tensors are counted once, so the norm equals the unsharded
    model's. ``max_norm <= 0`` only measures.
    """
    sums = torch.zeros(3, dtype=torch.float64)
    grads = []
    for param in model.parameters():
        if param.grad is None:
            continue
        grads.append(param.grad)
        sq = param.grad.detach().double().pow(2).sum()
        if is_expert_param(param):
            sums[2] += sq
        elif is_tp_sharded(param):
            sums[1] += sq
        else:
            sums[0] += sq
    if _size(pg_collection.tp) > 1:
        dist.all_reduce(sums[1:2], group=pg_collection.tp)
    for group in (pg_collection.ep, pg_collection.expt_tp):
        if _size(group) > 1:
            dist.all_reduce(sums[2:3], group=group)
    norm = float(sums.sum().sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm
