"""Knowledge distillation on logits, vocab-parallel (docs/design.md, "Router and losses").

:func:`kd_loss` is the forward KL ``KL(p_teacher || p_student)`` per token over the full
vocabulary, where under tensor parallelism every rank holds one vocabulary shard
``[..., V/tp]`` of both logits (megatron's parallel output layer). The vocabulary is never
gathered: each rank reduces its shard to per-token numbers (a max, two sums of
exponentials, one weighted sum), and only those are all-reduced over the TP group.

With ``t``, ``s`` the teacher and student logits divided by the temperature ``T``,
``m_t``, ``m_s`` their global maxima and ``Z_t = sum exp(t - m_t)``, ``Z_s = sum exp(s - m_s)``
over the full vocabulary, and ``p_t = exp(t - m_t) / Z_t`` (which sums to one)::

    KL = sum_v p_t[v] * (log p_t[v] - log p_s[v])
       = sum_v p_t[v] * ((t[v] - m_t) - (s[v] - m_s)) - log Z_t + log Z_s

The first sum is computed per shard as ``sum exp(t - m_t) * (...)`` and divided by the
all-reduced ``Z_t`` afterwards; equal logits give exactly zero. The loss
is ``T**2 * KL`` (so gradients keep their scale across temperatures) averaged over tokens
weighted by ``loss_mask``.

Gradients. Every all-reduced number is then used identically on every rank, so the loss is
the same replicated scalar on each rank and its gradient w.r.t. each reduced number is too.
The sums therefore go through megatron-core's ``reduce_from_tensor_model_parallel_region``
(all-reduce forward, identity backward): each rank receives ``T * (p_s - p_t) / tokens`` for
its own shard, the gradient of the full-vocabulary loss. The max only shifts the logits; its
gradient cancels, so it is detached. The teacher is detached (docs/design.md invariant 7).

Cross entropy. The trainable-teacher variant (``L = KD + alpha * CE``) needs no code here:
megatron-core's model returns the per-token vocab-parallel cross entropy
(``tensor_parallel.vocab_parallel_cross_entropy``, also over vocabulary shards) when its
forward is given ``labels``; average that with the same ``loss_mask`` and add ``alpha`` times
it to :func:`kd_loss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _group_size(group) -> int:
    """Ranks in ``group``; ``None`` (or no process group at all) is a single rank."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _sum(x: Tensor, group) -> Tensor:
    """Sum over the TP group: all-reduce forward, identity backward (replicated use)."""
    if _group_size(group) == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x.contiguous(), group=group)


def _max(x: Tensor, group) -> Tensor:
    """Per-token max over the last dimension and the TP group (no gradient)."""
    out = x.detach().amax(dim=-1)
    if _group_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def kd_per_token(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, tp_group=None
) -> Tensor:
    """Per-token ``T**2 * KL(p_teacher || p_student)`` in float64, shape ``logits.shape[:-1]``.

    The vocabulary-parallel core of :func:`kd_loss` (module docstring); shapes and dtypes as
    there. :mod:`megatron_ext.distill_chunked` calls it on one sequence chunk at a time.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (same vocabulary shard)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype) / temperature
    t = teacher_logits.detach().to(dtype) / temperature

    s_shift = s - _max(s, tp_group).unsqueeze(-1)
    t_shift = t - _max(t, tp_group).unsqueeze(-1)
    t_exp = t_shift.exp()
    # vocabulary-sized tensors stay in ``dtype``; the per-token sums accumulate in float64
    acc = torch.float64
    z_t = _sum(t_exp.sum(dim=-1, dtype=acc), tp_group)
    z_s = _sum(s_shift.exp().sum(dim=-1, dtype=acc), tp_group)
    cross = _sum((t_exp * (t_shift - s_shift)).sum(dim=-1, dtype=acc), tp_group) / z_t
    return (cross - z_t.log() + z_s.log()) * temperature**2


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    tp_group=None,
    loss_mask: Tensor | None = None,
) -> Tensor:
    """``T**2 * KL(p_teacher || p_student)``, the mean over tokens weighted by ``loss_mask``.

    ``student_logits`` and ``teacher_logits`` have the same shape ``[..., V/tp]``: this rank's
    vocabulary shard (the whole vocabulary when ``tp_group`` is ``None`` or has one rank).
    ``loss_mask`` has the shape of the leading dimensions (default: every token weighs one);
    an all-zero mask gives zero. Vocabulary-sized work is in float32 (float64 inputs stay
    float64), per-token sums accumulate in float64, and the result has the compute dtype. The
    result is the same 0-dim tensor on every rank of ``tp_group``; gradients reach the
    student shard only (module docstring).
    """
    kl = kd_per_token(student_logits, teacher_logits, temperature=temperature, tp_group=tp_group)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    acc = torch.float64
    if loss_mask is None:
        return kl.mean().to(dtype)
    mask = loss_mask.to(device=kl.device, dtype=acc)
    if mask.shape != kl.shape:
        raise ValueError(
            f"loss_mask {tuple(mask.shape)} must have the logits' leading shape {tuple(kl.shape)}"
        )
    return ((kl * mask).sum() / mask.sum().clamp_min(torch.finfo(acc).tiny)).to(dtype)
