"""Quantization-aware distillation (QAD) of the quantized elastic model, every budget at once.

Per step, as elastic training does (:mod:`megatron_ext.elastic.trainer`): the budget is
:func:`~megatron_ext.elastic.curriculum.sample_budget` of (seed, step), the same on every
rank; the student, the quantized elastic model, runs at that budget's widths (masked
compute, so the nested mask hierarchy is the elastic one, untouched); the loss is the
vocab-parallel forward KL (:func:`megatron_ext.distill.kd_loss`) from a frozen teacher:

* ``teacher=elastic`` (default): the unquantized (BF16) elastic model at the same budget,
  the model the quantized one should match, so QAD recovers exactly what quantization lost;
* ``teacher=parent``: the non-elastic parent, as in elastic training.

Gradients reach the weights straight through the fake quantizers; the per-tensor input
scales stay those of calibration, the weight scales follow the weights. The steps run on
:class:`~megatron_ext.training.engine.Engine` (megatron-core's DDP, distributed optimizer and
schedules), with checkpoints, a bit-identical resume and preemption like the other loops.

Parallel layouts: the student and the teacher are sharded alike (TP, EP, PP, DP). At
``pp > 1`` the teacher is staged like the student: its forward-only pass goes through
megatron's schedule first (:func:`~megatron_ext.elastic.step.teacher_hidden_states`), its
final hidden states are read on the last stage, where the KD is computed; the budget is a
pure function of (seed, step), so every stage runs the same widths. The held-out KD
(:func:`evaluate_kd`) goes forward only through the same schedule.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from megatron_ext.distill_chunked import (
    OutputHead,
    chunked_distill_loss,
    hidden_states_only,
    output_head,
)
from megatron_ext.elastic.budget_eval import batch_losses_at
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.curriculum import sample_budget
from megatron_ext.elastic.step import teacher_hidden_states
from megatron_ext.models.builder import attention_mask
from megatron_ext.models.config import require
from megatron_ext.quant.config import QADConfig
from megatron_ext.runtime import is_main
from megatron_ext.training.engine import Engine
from megatron_ext.training.loop import mean_loss
from megatron_ext.training.pipeline import is_last_stage, metrics_on_every_stage, pipeline_stages
from megatron_ext.training.preemption import PreemptionHandler, save_or_stop
from megatron_ext.training.state import loop_state, restore_loop_state

Budgets = Mapping[str, Mapping[str, int]]


RECOVERY = "fraction of the quantization loss gap closed: (ptq - qad) / (ptq - ref)"


@dataclass
class QADHistory:
    """Per-step KD losses of a QAD run, and its throughput."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Steps, tokens, tokens/s and the mean KD loss over the first and the last quarter."""
        quarter = max(1, len(self.steps) // 4)
        kd = [s["kd"] for s in self.steps]
        return {
            "steps": len(self.steps),
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "kd_first_quarter": sum(kd[:quarter]) / quarter if kd else None,
            "kd_last_quarter": sum(kd[-quarter:]) / quarter if kd else None,
        }


def recovery(ref: float, ptq: float, qad: float) -> float | None:
    """The fraction of the quantization loss gap that QAD closes.

    ``recovery = (loss_PTQ - loss_QAD) / (loss_PTQ - loss_ref)`` with ``loss_ref`` the
    unquantized (BF16) model's held-out loss at the same budget: 1 means QAD is back at the
    unquantized loss, 0 means no better than PTQ, below 0 worse than PTQ, above 1 better than
    unquantized. ``None`` when PTQ loses nothing to recover (gap below 1e-6 nats).
    """
    gap = ptq - ref
    return None if abs(gap) < 1e-6 else (ptq - qad) / gap


def paired_se(a: list[float], b: list[float]) -> float | None:
    """Standard error of ``mean(a) - mean(b)`` from the per-batch differences of two models
    on the same held-out batches (``None`` with fewer than two batches)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    return (sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) ** 0.5


def budget_figures(
    budgets: Budgets,
    ref: Mapping[str, list[float]],
    ptq: Mapping[str, list[float]],
    qad: Mapping[str, list[float]],
    kd: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per budget, from the per-batch held-out losses of :func:`evaluate_budgets`: widths,
    unquantized / PTQ / QAD held-out loss, :func:`recovery` (``None`` without a QAD loss), the
    paired standard errors of the PTQ gap (``ptq_gap_se``) and of QAD's change
    (``qad_change_se``, of PTQ − QAD) and, from ``kd`` (``{"ptq": {...}, "qad": {...}}``),
    the held-out KD loss from the teacher after PTQ and after QAD (``ptq_kd``, ``qad_kd``)."""
    out = {}
    for name, widths in budgets.items():
        r, p, q = mean_loss(ref[name]), mean_loss(ptq[name]), None
        out[name] = {"widths": dict(widths), "ref_loss": r, "ptq_loss": p, "qad_loss": None}
        out[name]["ptq_gap_se"] = paired_se(ptq[name], ref[name])
        if name in qad:
            q = mean_loss(qad[name])
            out[name] |= {"qad_loss": q, "qad_change_se": paired_se(ptq[name], qad[name])}
        out[name]["recovery"] = None if q is None else recovery(r, p, q)
        for stage, values in (kd or {}).items():
            out[name][f"{stage}_kd"] = values.get(name)
    return out


def evaluate_budgets(
    model: nn.Module, controller: ElasticController, budgets: Budgets, valid: list, pgs
) -> dict[str, list[float]]:
    """Held-out loss of each batch of the elastic ``model`` at every budget's widths."""
    return {
        name: batch_losses_at(model, controller, widths, valid, pgs)
        for name, widths in budgets.items()
    }


@torch.no_grad()
def evaluate_kd(
    student: nn.Module,
    student_ctrl: ElasticController,
    teacher: nn.Module,
    teacher_ctrl: ElasticController | None,
    budgets: Budgets,
    valid: list,
    cfg: QADConfig,
    pgs,
) -> dict[str, float]:
    """Per budget, the held-out QAD objective: mean KD loss from the teacher at that budget.

    Forward only through megatron's schedule (every pipeline stage runs its layers, the
    staged teacher first); the mean over ``valid`` and over data-parallel ranks, the same on
    every rank.
    """
    out = {}
    step = QADStep(teacher, cfg, pgs)
    student.eval()
    student_ctrl.set_gates(None)
    seq = int(valid[0]["tokens"].shape[1])
    for name, widths in budgets.items():
        with ExitStack() as scope:
            scope.enter_context(student_ctrl.at(dict(widths)))
            if teacher_ctrl is not None:
                scope.enter_context(teacher_ctrl.at(dict(widths)))
            batches = step.with_teacher(valid, seq)
            metrics = metrics_on_every_stage(
                student, batches, step.forward_step, pgs, seq_length=seq
            )
        out[name] = _dp_mean(mean_loss([m["kd"] for m in metrics]), pgs)
    return out


def _dp_mean(value: float, pgs) -> float:
    group = getattr(pgs, "dp", None)
    if group is None or not torch.distributed.is_initialized() or group.size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(total, group=group)
    return float(total.item()) / group.size()


def qad_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    batch: dict,
    heads: tuple[OutputHead, OutputHead],
    cfg: QADConfig,
    pgs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The QAD objective of one micro-batch: the KD loss from the teacher; metric ``kd``.

    The output layers (``heads``: student's, teacher's) and the KD run chunk by chunk along the
    sequence on the final hidden states (``qad_train.kd_chunk_size`` positions at a time).
    """
    kd, _, _ = chunked_distill_loss(
        student_hidden,
        teacher_hidden,
        *heads,
        chunk_size=cfg.kd_chunk_size or student_hidden.shape[0],
        temperature=cfg.kd_temperature,
        tp_group=pgs.tp,
        loss_mask=batch["loss_mask"],
    )
    return kd, {"kd": kd.detach().clone()}


def _unused_loss(output: torch.Tensor) -> Any:
    raise RuntimeError("the QAD loss is computed on the last pipeline stage only")


class QADStep:
    """:class:`~megatron_ext.training.engine.TrainStep` of QAD: teacher, then student, KD.

    At ``pp > 1`` the teacher's final hidden states come staged, in
    ``batch["teacher_hidden"]`` (:meth:`with_teacher`); only the last stage has a loss.
    """

    def __init__(self, teacher: nn.Module, cfg: QADConfig, pgs) -> None:
        self.teacher, self.cfg, self.pgs = teacher, cfg, pgs
        self.pp = pipeline_stages(pgs)

    def with_teacher(self, microbatches: list[dict], seq_length: int) -> list[dict]:
        """``microbatches`` for one pass: at ``pp > 1`` copies holding the staged teacher's
        final hidden states (a forward-only pass through the schedule), else as they are."""
        if self.pp == 1:
            return microbatches
        copies = [dict(b) for b in microbatches]
        teacher_hidden_states(self.teacher, copies, self.pgs, seq_length=seq_length)
        return copies

    def forward(self, model: nn.Module, batch: dict):
        """The frozen teacher's and the student's final hidden states on ``batch``; the loss."""
        tokens, pos = batch["tokens"], batch["position_ids"]
        seq = tokens.shape[1]
        target = batch.get("teacher_hidden")
        if self.pp == 1:
            with torch.no_grad(), hidden_states_only(self.teacher):
                target = self.teacher(tokens, pos, attention_mask(self.teacher, seq))
        with hidden_states_only(model):
            hidden = model(tokens, pos, attention_mask(model, seq))
        if not is_last_stage(self.pgs):
            return hidden, _unused_loss
        if target is None:
            raise RuntimeError("pipeline stages: run QADStep.with_teacher on the batches first")
        heads = (output_head(model), output_head(self.teacher))
        loss = functools.partial(
            qad_loss, teacher_hidden=target, batch=batch, heads=heads, cfg=self.cfg
        )
        return hidden, lambda h: loss(h, pgs=self.pgs)

    def forward_step(self, data_iterator, model: nn.Module):
        """megatron's forward-step signature around :meth:`forward`."""
        return self.forward(model, next(data_iterator))


def train_qad(
    engine: Engine,
    student_ctrl: ElasticController,
    teacher: nn.Module,
    teacher_ctrl: ElasticController | None,
    budgets: Budgets,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: QADConfig,
    pgs,
    *,
    progress: bool = True,
    checkpoint: Callable[[int, dict[str, Any]], object] | None = None,
    resume_state: dict[str, Any] | None = None,
    preemption: PreemptionHandler | None = None,
) -> QADHistory:
    """Run QAD up to ``cfg.steps``; ``teacher_ctrl`` is ``None`` for a non-elastic teacher.

    ``checkpoint(step, extra)`` is called every ``cfg.save_interval`` steps and at the end
    with what a bit-identical resume needs (step, RNG, data position, history);
    ``resume_state`` is such an ``extra``. With ``preemption``, a signal on any rank saves a
    checkpoint and raises :class:`Preempted` (unless it came after the last step).
    """
    if teacher.training or any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("the QAD teacher must be frozen: eval mode and requires_grad=False")
    names = list(budgets)
    probs = cfg.budget_probs or [1.0 / len(names)] * len(names)
    require(len(probs) == len(names), "qad_train.budget_probs", f"needs {len(names)} entries")
    start, history = restore_loop_state(resume_state, batches, QADHistory())

    def extra(step: int) -> dict[str, Any]:
        return loop_state(step, batches, history)

    step_fn = QADStep(teacher, cfg, pgs)
    engine.train()
    student_ctrl.set_gates(None)
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc="qad",
        disable=not (progress and is_main()),
    )
    for step in bar:
        t0 = time.perf_counter()
        name = names[sample_budget(probs, cfg.seed, 0, step)]
        student_ctrl.set_widths(dict(budgets[name]))
        if teacher_ctrl is not None:
            teacher_ctrl.set_widths(dict(budgets[name]))
        micro = [next(batches) for _ in range(engine.num_microbatches)]
        # at pp > 1 the staged teacher runs first, at this step's widths, on copies
        result = engine.step(step_fn, step_fn.with_teacher(micro, cfg.seq_length), cfg.lr_at(step))
        history.seconds += time.perf_counter() - t0
        history.tokens += sum(int(b["tokens"].numel()) for b in micro) * engine.dp
        kd = result.metrics["kd"]
        history.steps.append(
            {"step": step + 1, "budget": name, "kd": kd, "grad_norm": result.grad_norm}
        )
        bar.set_postfix(budget=name, kd=f"{kd:.4f}")
        done = step + 1
        save_or_stop(done, cfg.steps, cfg.save_interval, checkpoint, extra, preemption, bar)
    bar.close()
    student_ctrl.set_full()
    if teacher_ctrl is not None:
        teacher_ctrl.set_full()
    for chunk in engine.chunks:
        chunk.eval()
    return history
