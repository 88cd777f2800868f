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
scales stay those of calibration, the weight scales follow the weights.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from megatron_ext.distill import kd_loss
from megatron_ext.elastic.budget_eval import evaluate_at
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.curriculum import sample_budget
from megatron_ext.models.builder import causal_mask
from megatron_ext.models.config import require
from megatron_ext.quant.config import QADConfig
from megatron_ext.training.grads import clip_grad_norm, reduce_gradients
from megatron_ext.training.optim import set_lr

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


def budget_figures(
    budgets: Budgets,
    ref: Mapping[str, float],
    ptq: Mapping[str, float],
    qad: Mapping[str, float],
    kd: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per budget: widths, unquantized / PTQ / QAD held-out loss, :func:`recovery` (``None``
    without a QAD loss) and, from ``kd`` (``{"ptq": {...}, "qad": {...}}``), the held-out KD
    loss from the teacher after PTQ and after QAD (``ptq_kd``, ``qad_kd``)."""
    out = {}
    for name, widths in budgets.items():
        q = qad.get(name)
        out[name] = {
            "widths": dict(widths),
            "ref_loss": ref[name],
            "ptq_loss": ptq[name],
            "qad_loss": q,
            "recovery": None if q is None else recovery(ref[name], ptq[name], q),
        }
        for stage, values in (kd or {}).items():
            out[name][f"{stage}_kd"] = values.get(name)
    return out


def evaluate_budgets(
    model: nn.Module, controller: ElasticController, budgets: Budgets, valid: list, pgs
) -> dict[str, float]:
    """Held-out loss of the elastic ``model`` at every budget's widths."""
    return {
        name: evaluate_at(model, controller, widths, valid, pgs) for name, widths in budgets.items()
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
    """Per budget, the held-out QAD objective: mean KD loss from the teacher at that budget."""
    out = {}
    student.eval()
    student_ctrl.set_gates(None)
    for name, widths in budgets.items():
        losses = []
        same = teacher_ctrl.at(dict(widths)) if teacher_ctrl is not None else nullcontext()
        with student_ctrl.at(dict(widths)), same:
            for batch in valid:
                tokens, pos = batch["tokens"], batch["position_ids"]
                mask = causal_mask(tokens.shape[1], tokens.device)
                kd = kd_loss(
                    student(tokens, pos, mask),
                    teacher(tokens, pos, mask),
                    temperature=cfg.kd_temperature,
                    tp_group=pgs.tp,
                    loss_mask=batch["loss_mask"],
                )
                losses.append(float(kd))
        out[name] = sum(losses) / max(1, len(losses))
    return out


def train_qad(
    student: nn.Module,
    student_ctrl: ElasticController,
    teacher: nn.Module,
    teacher_ctrl: ElasticController | None,
    budgets: Budgets,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: QADConfig,
    optimizer: torch.optim.Optimizer,
    pgs,
    *,
    progress: bool = True,
) -> QADHistory:
    """Run ``cfg.steps`` QAD steps; ``teacher_ctrl`` is ``None`` for a non-elastic teacher."""
    if teacher.training or any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("the QAD teacher must be frozen: eval mode and requires_grad=False")
    names = list(budgets)
    probs = cfg.budget_probs or [1.0 / len(names)] * len(names)
    require(len(probs) == len(names), "qad_train.budget_probs", f"needs {len(names)} entries")
    history = QADHistory()
    student.train()
    student_ctrl.set_gates(None)
    bar = tqdm(range(cfg.steps), desc="qad", disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        name = names[sample_budget(probs, cfg.seed, 0, step)]
        student_ctrl.set_widths(dict(budgets[name]))
        if teacher_ctrl is not None:
            teacher_ctrl.set_widths(dict(budgets[name]))
        batch = next(batches)
        tokens, pos = batch["tokens"], batch["position_ids"]
        mask = causal_mask(tokens.shape[1], tokens.device)
        set_lr(optimizer, cfg.lr_at(step))
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            target = teacher(tokens, pos, mask)
        loss = kd_loss(
            student(tokens, pos, mask),
            target,
            temperature=cfg.kd_temperature,
            tp_group=pgs.tp,
            loss_mask=batch["loss_mask"],
        )
        loss.backward()
        reduce_gradients(student, pgs)
        grad_norm = clip_grad_norm(student, cfg.grad_clip, pgs)
        optimizer.step()
        history.seconds += time.perf_counter() - t0
        history.tokens += int(tokens.numel())
        kd = float(loss.detach())
        history.steps.append({"step": step + 1, "budget": name, "kd": kd, "grad_norm": grad_norm})
        bar.set_postfix(budget=name, kd=f"{kd:.4f}")
    student_ctrl.set_full()
    if teacher_ctrl is not None:
        teacher_ctrl.set_full()
    student.eval()
    return history
