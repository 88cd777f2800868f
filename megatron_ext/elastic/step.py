"""The elastic training step as the engine runs it: router, gates, teacher, student, loss.

:class:`ElasticStep` is a :class:`~megatron_ext.training.engine.TrainStep`. For every
micro-batch it runs the router (its Gumbel noise comes from a generator seeded by (seed,
stage, step) only, so every rank, micro-batch and pipeline stage picks the same widths), sets
the controller's widths and straight-through gates, runs the frozen teacher and the student to
their final hidden states, and returns :func:`elastic_loss` (output layers + KD chunk by chunk).

Router gradient (the router is replicated; see :class:`~megatron_ext.training.engine.Engine`):
the engine sums it over TP and averages it over DP, like a sequence-parallel norm. The KD
part is partial on every TP rank (its sequence slice, its heads, channels and experts), so the
sum is its whole. The cost term is the same on every rank: it enters the loss divided by the
TP size, so that the TP sum counts it once (exactly, for a power-of-two TP). The KD share of
the router gradient is scaled by ``router_task_weight`` at the gates.

Pipeline parallelism: the teacher is staged like the student. :func:`teacher_hidden_states`
runs it forward-only through megatron's schedule before the step (its activations flow stage
to stage) and leaves its final hidden states in ``batch["teacher_hidden"]`` on the last
stage, where the loss function reads them. Only the last stage calls the loss function, so
the cost term is counted once over the stages; each stage's gates send the router their part
of its gradient and ``finalize_model_grads`` sums them over the stages.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from megatron_ext.distill_chunked import (
    OutputHead,
    chunked_distill_loss,
    hidden_states_only,
    output_head,
)
from megatron_ext.elastic.curriculum import step_generator
from megatron_ext.models.builder import attention_mask
from megatron_ext.training.pipeline import is_last_stage, teacher_logits

Batch = dict[str, torch.Tensor]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged, its gradient times ``scale`` (1.0: ``x`` itself)."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def elastic_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    batch: Batch,
    cost_penalty: torch.Tensor,
    *,
    heads: tuple[OutputHead, OutputHead],
    cfg: Any,
    tp_group: Any,
    tp_size: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KD (vocab-parallel forward KL) + ``ce_weight`` x CE + the cost penalty (over TP size).

    The output layers (``heads``: student's, teacher's) and the KD run chunk by chunk along the
    sequence (:func:`~megatron_ext.distill_chunked.chunked_distill_loss`,
    ``elastic_train.kd_chunk_size`` positions at a time) on the models' final hidden states.
    Returns the micro-batch loss and its metrics ``kd``.
    """
    loss, kd, _ = chunked_distill_loss(
        student_hidden,
        teacher_hidden,
        *heads,
        chunk_size=cfg.kd_chunk_size or student_hidden.shape[0],
        temperature=cfg.kd_temperature,
        tp_group=tp_group,
        loss_mask=batch["loss_mask"],
        labels=batch["labels"] if cfg.ce_weight > 0 else None,
        ce_weight=cfg.ce_weight,
    )
    loss = loss + cfg.cost_weight * cost_penalty / tp_size
    return loss, {"kd": kd.detach().clone()}


@torch.no_grad()
def teacher_hidden_states(
    teacher: torch.nn.Module, microbatches: list[Batch], pg_collection, *, seq_length: int
) -> None:
    """Put the staged ``teacher``'s final hidden states in each ``batch["teacher_hidden"]``.

    A forward-only pass through megatron's schedule (every stage runs its own layers); the
    hidden states exist on the last stage only, elsewhere the batches are left as they are.
    """
    with hidden_states_only(teacher):
        hidden = teacher_logits(teacher, microbatches, pg_collection, seq_length=seq_length)
    for batch, states in zip(microbatches, hidden):
        batch["teacher_hidden"] = states


def _unused_loss(output: torch.Tensor) -> Any:
    raise RuntimeError("the loss is computed on the last pipeline stage only")


class ElasticStep:
    """The elastic :class:`~megatron_ext.training.engine.TrainStep` of one optimizer step."""

    def __init__(self, trainer: Any) -> None:
        """``trainer``: the :class:`~megatron_ext.elastic.trainer.ElasticTrainer` it serves."""
        self.t = trainer
        self.step = 0
        self.stage_index = 0
        self.budget_index = 0
        self.last: Any = None  # the router output of the last micro-batch
        self.last_cost: tuple[torch.Tensor, float, torch.Tensor] | None = None

    def begin(self, step: int) -> None:
        """Make the next micro-batches those of optimizer step ``step``."""
        self.step = step
        self.stage_index = self.t.stage_of(step)
        self.budget_index = self.t.budget_of(step)

    def route(self) -> Any:
        """The router's output for this step (the same on every call within a step)."""
        t = self.t
        budget = t.elastic.budgets[self.budget_index]
        noise = step_generator(t.seed, self.stage_index, self.step)
        out = t.router(
            budget.name, self.step, generator=noise, feasible=t.feasible.get(budget.name)
        )
        weight = t.cfg.router_task_weight
        t.ctrl.set_widths(out.widths())
        t.ctrl.set_gates(
            {a: (scale_grad(out[a].onehot, weight), t.router.choices[a]) for a in out.axes}
        )
        return out

    def forward(self, model: torch.nn.Module, batch: Batch):
        """Router, teacher (no grad) and student on ``batch``; the loss function of the step."""
        t = self.t
        out = self.route()
        cost, target, rel = t.cost_terms(self.budget_index, out.expected_widths())
        penalty = rel.square() if t.cfg.cost_loss == "squared" else rel
        self.last, self.last_cost = out, (cost, target, rel)
        tokens, pos = batch["tokens"], batch["position_ids"]
        teacher_hidden = batch.get("teacher_hidden")  # the staged teacher's (pp > 1)
        if t.pp_size == 1:
            with torch.no_grad(), hidden_states_only(t.teacher):
                mask = attention_mask(t.teacher, tokens.shape[1])
                teacher_hidden = t.teacher(tokens, pos, mask)
        with hidden_states_only(model):
            student_hidden = model(tokens, pos, attention_mask(model, tokens.shape[1]))
        if not is_last_stage(t.pgs):
            return student_hidden, _unused_loss
        if teacher_hidden is None:
            raise RuntimeError("pipeline stages: run teacher_hidden_states on the batches first")
        loss_func = functools.partial(
            elastic_loss,
            teacher_hidden=teacher_hidden,
            heads=(output_head(model), output_head(t.teacher)),
            batch=batch,
            cost_penalty=penalty,
            cfg=t.cfg,
            tp_group=t.pgs.tp,
            tp_size=t.tp_size,
        )
        return student_hidden, lambda hidden: loss_func(hidden)
