"""Measured peak memory of one train-elastic step, for checking the planner's prediction.

Two measurements: :func:`measure_elastic_step` on one rank (TP = PP = 1), and
:func:`measure_pipeline_step` on this rank's pipeline stage at PP > 1 (run it on every rank
of the pipeline, e.g. 2 ranks under torchrun over gloo).

:func:`measure_elastic_step` builds a student and a frozen teacher of the same shape, runs one
warm-up step (so Adam's state exists, as in every step after the first) and then measures one
step with :class:`~megatron_ext.plan.meter.LiveTensorMeter`: the teacher's forward to its
final hidden states under ``no_grad`` first (as :class:`megatron_ext.elastic.step.ElasticStep`
runs it), the student's, the chunked KD
(:func:`~megatron_ext.distill_chunked.chunked_distill_loss`), the backward and Adam's update.
Gradients are zeroed in place, not freed, as megatron's DDP keeps its gradient buffer. The
peak counts every live tensor: parameters, teacher, gradients, optimizer state, activations.

At PP > 1 the step is the one ``train-elastic`` runs on a stage: the frozen teacher, staged
like the student, goes forward-only through megatron's schedule first
(:func:`megatron_ext.elastic.step.teacher_hidden_states`: its final hidden states of every
micro-batch stay on the last stage), then the student's micro-batches through the same
schedule (1F1B, p2p over the pipeline group) with the chunked KD on the last stage, then
Adam. Every rank measures its own stage's live tensors, p2p buffers included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_ext.distill_chunked import chunked_distill_loss, hidden_states_only, output_head
from megatron_ext.elastic.step import teacher_hidden_states
from megatron_ext.models.builder import attention_mask, build_model
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, set_seed
from megatron_ext.plan.meter import LiveTensorMeter
from megatron_ext.training.pipeline import is_last_stage, run_schedule


def _student_teacher(
    cfg: HybridModelConfig,
    parallel: ParallelConfig,
    pgs,
    recompute: Callable[[torch.nn.Module], None] | None,
) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """A student (recomputed when asked), a frozen teacher of its shape, and the student's Adam."""
    set_seed(0)
    student = build_model(cfg, parallel, pgs)
    teacher = build_model(cfg, parallel, pgs).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if recompute is not None:
        recompute(student)
    return student, teacher, torch.optim.Adam(student.parameters(), lr=1e-4, foreach=False)


def measure_elastic_step(
    cfg: HybridModelConfig,
    seq: int,
    micro_batch: int,
    kd_chunk_size: int,
    pgs,
    recompute: Callable[[torch.nn.Module], None] | None = None,
) -> int:
    """Peak live tensor bytes of one measured step at TP=PP=1 (module docstring)."""
    student, teacher, opt = _student_teacher(cfg, ParallelConfig(), pgs, recompute)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq), generator=gen)
    pos = torch.arange(seq)[None].expand(micro_batch, seq)
    mask = attention_mask(student, seq)

    def step() -> None:
        for p in student.parameters():
            if p.grad is not None:
                p.grad.zero_()
        with torch.no_grad(), hidden_states_only(teacher):  # first, as the elastic step does
            t_hidden = teacher(tokens, pos, mask)
        with hidden_states_only(student):
            hidden = student(tokens, pos, mask)
        loss, _, _ = chunked_distill_loss(
            hidden, t_hidden, output_head(student), output_head(teacher), chunk_size=kd_chunk_size
        )
        del hidden, t_hidden
        loss.backward()
        opt.step()

    return _metered(step, student, teacher, opt=opt)


def _metered(
    step: Callable[[], None], *modules: torch.nn.Module, opt: torch.optim.Optimizer
) -> int:
    """Run ``step`` once unmetered (Adam's state appears), then once metered; its peak."""
    step()
    meter = LiveTensorMeter()
    for module in modules:
        meter.add_existing(module.parameters())
        meter.add_existing(p.grad for p in module.parameters() if p.grad is not None)
    meter.add_existing(
        v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )
    with meter:
        step()
    return meter.peak


def measure_pipeline_step(
    cfg: HybridModelConfig,
    parallel: ParallelConfig,
    seq: int,
    micro_batch: int,
    microbatches: int,
    kd_chunk_size: int,
    pgs,
    recompute: Callable[[torch.nn.Module], None] | None = None,
) -> int:
    """Peak live tensor bytes of one train-elastic step on this rank's stage (docstring)."""
    student, teacher, opt = _student_teacher(cfg, parallel, pgs, recompute)
    gen = torch.Generator().manual_seed(0)
    pos = torch.arange(seq)[None].expand(micro_batch, seq)
    batches = [
        {"tokens": torch.randint(0, cfg.vocab_size, (micro_batch, seq), generator=gen)}
        for _ in range(microbatches)
    ]
    last = is_last_stage(pgs)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        with hidden_states_only(model):
            hidden = model(batch["tokens"], pos, attention_mask(model, seq))
        if not last:
            return hidden, None

        def loss_func(h: torch.Tensor):
            loss, _, _ = chunked_distill_loss(
                h,
                batch.pop("teacher_hidden"),
                output_head(model),
                output_head(teacher),
                chunk_size=kd_chunk_size,
            )
            return loss, {"kd": loss.detach()}

        return hidden, loss_func

    def step() -> None:
        for p in student.parameters():
            if p.grad is not None:
                p.grad.zero_()
        micro = [dict(b, position_ids=pos) for b in batches]
        teacher_hidden_states(teacher, micro, pgs, seq_length=seq)
        run_schedule(student, micro, forward_step, pgs, seq_length=seq)
        opt.step()

    return _metered(step, student, teacher, opt=opt)
