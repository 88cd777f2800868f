"""Measured peak memory of one train-elastic step, for checking the planner's prediction.

:func:`measure_elastic_step` builds a student and a frozen teacher of the same shape, runs one
warm-up step (so Adam's state exists, as in every step after the first) and then measures one
step with :class:`~megatron_ext.plan.meter.LiveTensorMeter`: the student's forward to its final
hidden states, the teacher's under ``no_grad``, the chunked KD
(:func:`~megatron_ext.distill_chunked.chunked_distill_loss`), the backward and Adam's update.
Gradients are zeroed in place, not freed, as megatron's DDP keeps its gradient buffer. The
peak counts every live tensor: parameters, teacher, gradients, optimizer state, activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_ext.distill_chunked import chunked_distill_loss, hidden_states_only, output_head
from megatron_ext.models.builder import attention_mask, build_model
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, set_seed
from megatron_ext.plan.meter import LiveTensorMeter


def measure_elastic_step(
    cfg: HybridModelConfig,
    seq: int,
    micro_batch: int,
    kd_chunk_size: int,
    pgs,
    recompute: Callable[[torch.nn.Module], None] | None = None,
) -> int:
    """Peak live tensor bytes of one measured step at TP=PP=1 (module docstring)."""
    parallel = ParallelConfig()
    set_seed(0)
    student = build_model(cfg, parallel, pgs)
    teacher = build_model(cfg, parallel, pgs).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if recompute is not None:
        recompute(student)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4, foreach=False)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq), generator=gen)
    pos = torch.arange(seq)[None].expand(micro_batch, seq)
    mask = attention_mask(student, seq)

    def step() -> None:
        for p in student.parameters():
            if p.grad is not None:
                p.grad.zero_()
        with hidden_states_only(student):
            hidden = student(tokens, pos, mask)
        with torch.no_grad(), hidden_states_only(teacher):
            t_hidden = teacher(tokens, pos, mask)
        loss, _, _ = chunked_distill_loss(
            hidden, t_hidden, output_head(student), output_head(teacher), chunk_size=kd_chunk_size
        )
        del hidden, t_hidden
        loss.backward()
        opt.step()

    step()
    meter = LiveTensorMeter()
    meter.add_existing(student.parameters())
    meter.add_existing(p.grad for p in student.parameters() if p.grad is not None)
    meter.add_existing(teacher.parameters())
    meter.add_existing(
        v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )
    with meter:
        step()
    return meter.peak
