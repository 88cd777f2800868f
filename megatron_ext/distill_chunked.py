"""Distillation in bounded memory: the output layer and the KD loss, chunk by chunk.

:func:`chunked_distill_loss` takes the final hidden states of student and teacher (``[s, b, h]``,
megatron's layout; ``[s/tp, b, h]`` with sequence parallelism) and their output layers, and
returns ``KD + ce_weight * CE`` exactly as :func:`megatron_ext.distill.kd_loss` (plus
megatron's vocab-parallel cross entropy) would on the whole logits. The logits are never whole:
the sequence is cut into chunks of ``chunk_size`` positions and, per chunk, the student's and
the teacher's output layers run, the vocab-parallel KL (and CE) of those tokens is computed and
the chunk's gradient w.r.t. the student hidden states and the output layer's parameters is
taken at once, inside the forward (the fused linear + loss design of Liger's kernels). Only one
chunk's logits, and their gradient, are alive at any time; the backward only scales the
gradients kept from the forward by the incoming one, so nothing is recomputed.

The output layers are called as modules (:func:`output_head`), so a converted (elastic,
quantized) output layer and megatron's ``ColumnParallelLinear`` communication (copy to the TP
region, or the sequence-parallel all-gather) are upstream's, per chunk. With sequence
parallelism a chunk of the local shard gathers the same positions of every rank's shard; the
loss mask and labels are gathered the same way. The teacher runs under ``no_grad`` and may be
kept in bfloat16: its chunk logits are cast to float32 inside the KL.

Every rank of the TP group runs the same chunks in the same order, so the collectives inside
(output layer, KL sums, cross entropy) match. The result equals the unchunked loss up to the
order of the float64 per-token sums (chunks add their partial sums; see the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ext.distill import kd_per_token


@dataclass(frozen=True)
class OutputHead:
    """An output layer as a function of hidden states, and the parameters it trains."""

    forward: Callable[[Tensor], Tensor]  # hidden [c, b, h] -> logits [c * sp, b, V/tp]
    params: tuple[Tensor, ...]
    sequence_parallel: bool = False


def unwrap(model: torch.nn.Module) -> Any:
    """The model inside DDP / Float16Module wrappers (their ``.module``)."""
    inner: Any = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    return inner


def output_head(model: torch.nn.Module) -> OutputHead:
    """``model.output_layer`` (tied to the embedding when the model ties them) as a head."""
    inner = unwrap(model)
    layer = inner.output_layer
    tied = getattr(inner, "share_embeddings_and_output_weights", False)
    weight = inner.shared_embedding_or_output_weight() if tied else None

    def forward(hidden: Tensor) -> Tensor:
        return layer(hidden, weight=weight)[0]

    params = [p for p in layer.parameters() if p.requires_grad]
    if weight is not None and weight.requires_grad and all(p is not weight for p in params):
        params.append(weight)
    return OutputHead(forward, tuple(params), bool(getattr(layer, "sequence_parallel", False)))


class hidden_states_only:
    """Context manager: the model's forward returns its final hidden states, not logits.

    Sets megatron's ``post_process`` flag of the model (not of its decoder, whose final norm
    still runs) to ``False`` for the duration, the way a pipeline stage that is not the last
    one returns its hidden states (``MambaModel.forward``/``GPTModel.forward``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = unwrap(model)
        self.saved = getattr(self.model, "post_process", True)

    def __enter__(self) -> Any:
        self.model.post_process = False
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.post_process = self.saved


@dataclass
class _Setup:
    student: OutputHead
    teacher: OutputHead
    chunk_size: int
    temperature: float
    tp_group: object
    mask: Tensor  # [s, b] float64, full sequence
    labels: Tensor | None  # [s, b] long, full sequence
    ce_weight: float


def _sp_size(head: OutputHead, group) -> int:
    if not head.sequence_parallel or group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _positions(c0: int, c1: int, local: int, sp: int, device) -> Tensor:
    """Full-sequence positions of local chunk [c0, c1) after the sequence-parallel gather."""
    base = torch.arange(c0, c1, device=device)
    return torch.cat([base + r * local for r in range(sp)])


def _chunk_grads(setup: _Setup, h_s: Tensor, h_t: Tensor, rows: Tensor, denom: Tensor, params):
    """(kd, ce, grad of the hidden chunk, grads of the params) of one chunk's share."""
    h = h_s.detach().requires_grad_(True)
    with torch.no_grad():
        t_logits = setup.teacher.forward(h_t)
    with torch.enable_grad():
        logits = setup.student.forward(h)
        kl = kd_per_token(logits, t_logits, temperature=setup.temperature, tp_group=setup.tp_group)
        del t_logits
        m = setup.mask.index_select(0, rows)
        kd = (kl * m).sum() / denom
        total = kd
        ce = torch.zeros((), dtype=torch.float64, device=kd.device)
        if setup.ce_weight > 0:
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

            assert setup.labels is not None
            per_token = vocab_parallel_cross_entropy(
                logits.float(), setup.labels.index_select(0, rows)
            )
            ce = (per_token.double() * m).sum() / denom
            total = kd + setup.ce_weight * ce
        grads = torch.autograd.grad(total, [h, *params], allow_unused=True)
    return kd.detach(), ce.detach(), grads[0], grads[1:]


class _ChunkedDistill(torch.autograd.Function):
    """Forward computes loss and gradients chunk by chunk; backward scales the gradients."""

    @staticmethod
    def forward(ctx, student_hidden: Tensor, teacher_hidden: Tensor, setup: _Setup, *params):
        local = student_hidden.shape[0]
        sp = _sp_size(setup.student, setup.tp_group)
        denom = setup.mask.sum().clamp_min(torch.finfo(torch.float64).tiny)
        grad_h = torch.empty_like(student_hidden)
        acc = [
            torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params
        ]
        kd_sum = torch.zeros((), dtype=torch.float64, device=student_hidden.device)
        ce_sum = torch.zeros_like(kd_sum)
        used = [False] * len(params)
        for c0 in range(0, local, setup.chunk_size):
            c1 = min(c0 + setup.chunk_size, local)
            rows = _positions(c0, c1, local, sp, setup.mask.device)
            kd, ce, g_h, g_p = _chunk_grads(
                setup, student_hidden[c0:c1], teacher_hidden[c0:c1], rows, denom, params
            )
            kd_sum += kd
            ce_sum += ce
            grad_h[c0:c1] = g_h
            for i, g in enumerate(g_p):
                if g is not None:
                    acc[i] += g
                    used[i] = True
        ctx.used = used  # a parameter the head never touched gets no gradient, not zeros
        ctx.save_for_backward(grad_h, *acc)
        loss = kd_sum + setup.ce_weight * ce_sum
        dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        kd_out, ce_out = kd_sum.to(dtype), ce_sum.to(dtype)
        ctx.mark_non_differentiable(kd_out, ce_out)
        return loss.to(dtype), kd_out, ce_out

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_):
        grad_h, *acc = ctx.saved_tensors
        scale = grad_loss.to(grad_h.dtype)
        grads = [a * grad_loss.to(a.dtype) if u else None for a, u in zip(acc, ctx.used)]
        return (grad_h * scale, None, None, *grads)


def chunked_distill_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    tp_group=None,
    loss_mask: Tensor | None = None,
    labels: Tensor | None = None,
    ce_weight: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(KD + ce_weight * CE, KD, CE)`` computed chunk by chunk (module docstring).

    ``student_hidden`` / ``teacher_hidden``: final hidden states ``[s, b, h]`` (``s`` local
    under sequence parallelism); ``loss_mask`` and ``labels``: ``[b, s]`` over the full
    sequence, as in a batch. ``chunk_size`` positions of the local sequence per chunk (the
    last chunk may be shorter). Only the first value is differentiable; its gradient reaches
    ``student_hidden`` and ``student_head.params``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
            f"{tuple(teacher_hidden.shape)} must cover the same [sequence, batch]"
        )
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    local, batch = student_hidden.shape[:2]
    full = local * _sp_size(student_head, tp_group)
    mask = torch.ones(batch, full) if loss_mask is None else loss_mask
    if tuple(mask.shape) != (batch, full):
        raise ValueError(
            f"loss_mask {tuple(mask.shape)} must be [batch, sequence] = {(batch, full)}"
        )
    mask_sb = mask.to(device=student_hidden.device, dtype=torch.float64).t().contiguous()
    labels_sb = None if labels is None else labels.to(student_hidden.device).t().contiguous()
    setup = _Setup(
        student_head, teacher_head, chunk_size, temperature, tp_group, mask_sb, labels_sb, ce_weight
    )
    return _ChunkedDistill.apply(
        student_hidden, teacher_hidden.detach(), setup, *student_head.params
    )
