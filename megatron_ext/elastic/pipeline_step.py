"""One elastic training step as megatron forward-step functions, for any pipeline layout.

megatron's schedule calls the forward step once per micro-batch on every stage. Each call
asks the router for the step's choice: the router is replicated, its weights are equal on
every rank and its Gumbel noise comes from a fresh generator seeded by (seed, stage, step)
(:func:`megatron_ext.elastic.curriculum.step_generator`), so every stage and every
micro-batch of the step applies the same widths and gates, with no communication. Each
stage's layers then send the router a gradient through their own gates; megatron's
``finalize_model_grads`` sums those over the stages (the router is a replicated chunk, see
:func:`megatron_ext.training.pipeline.replicated_chunk`).

The last stage computes the loss: the vocab-parallel KD from the teacher's logits of the
same micro-batch (``batch["teacher_logits"]``, from
:func:`megatron_ext.training.pipeline.teacher_logits`), optionally plus ``ce_weight`` times
the next-token cross entropy, plus ``cost_weight`` times the relative cost error. The cost
term depends on the router alone and is the same on every rank, so it enters the loss on one
rank of each tensor- and pipeline-parallel group only (the last stage's TP rank 0): the sums
over TP and PP then count it once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import Tensor

from megatron_ext.distill import kd_loss
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.curriculum import step_generator
from megatron_ext.elastic.feasible import FeasibleSet
from megatron_ext.elastic.router import ElasticRouter, RouterOutput
from megatron_ext.elastic.train_config import ElasticTrainConfig
from megatron_ext.models.builder import attention_mask
from megatron_ext.training.pipeline import is_last_stage, masked_mean

CostError = Callable[[dict[str, Tensor]], Tensor]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


class ElasticForwardStep:
    """The forward step of one elastic training step at ``budget`` (megatron's signature).

    ``cost_error(expected_widths)`` is the differentiable relative cost error of a choice
    (``ElasticTrainer.cost_terms``' third term). :attr:`choices` records the widths applied
    in every micro-batch on this rank.
    """

    def __init__(
        self,
        router: ElasticRouter,
        ctrl: ElasticController,
        cfg: ElasticTrainConfig,
        pg_collection,
        *,
        budget: str,
        seed: int,
        stage: int,
        step: int,
        cost_error: CostError,
        feasible: FeasibleSet | None = None,
    ) -> None:
        self.router, self.ctrl, self.cfg, self.pgs = router, ctrl, cfg, pg_collection
        self.budget, self.seed, self.stage, self.step = budget, seed, stage, step
        self.cost_error, self.feasible = cost_error, feasible
        self.choices: list[dict[str, Any]] = []
        tp = getattr(pg_collection, "tp", None)
        self.counts_cost = is_last_stage(pg_collection) and (tp is None or tp.rank() == 0)

    def route(self) -> RouterOutput:
        """The step's choice (the same on every rank and micro-batch), applied to the model."""
        noise = step_generator(self.seed, self.stage, self.step)
        out = self.router(self.budget, self.step, generator=noise, feasible=self.feasible)
        gates = {}
        for axis in out.axes:
            onehot = out[axis].onehot
            if self.cfg.router_task_weight != 1.0:
                onehot = _ScaleGrad.apply(onehot, self.cfg.router_task_weight)
            gates[axis] = (onehot, self.router.choices[axis])
        self.ctrl.set_widths(out.widths())  # type: ignore[arg-type]
        self.ctrl.set_gates(gates)
        self.choices.append(out.widths())
        return out

    def finish(self) -> None:
        """Clear the gates after the schedule (the widths stay)."""
        self.ctrl.set_gates(None)

    def __call__(self, data_iterator, model: torch.nn.Module):
        """megatron's forward step: (output tensor, loss function of the last stage)."""
        batch = next(data_iterator)
        out = self.route()
        tokens = batch["tokens"]
        mask = attention_mask(model, tokens.shape[1], tokens.device)
        logits = model(tokens, batch["position_ids"], mask)

        def loss_func(student_logits: Tensor):
            loss_mask = batch["loss_mask"]
            kd = kd_loss(
                student_logits,
                batch["teacher_logits"],
                temperature=self.cfg.kd_temperature,
                tp_group=self.pgs.tp,
                loss_mask=loss_mask,
            )
            loss = kd
            if self.cfg.ce_weight > 0:
                ce = vocab_parallel_cross_entropy(student_logits.float(), batch["labels"])
                loss = loss + self.cfg.ce_weight * masked_mean(ce, loss_mask)
            rel = self.cost_error(out.expected_widths())
            if self.counts_cost:
                penalty = rel.square() if self.cfg.cost_loss == "squared" else rel
                loss = loss + self.cfg.cost_weight * penalty
            # clones: the schedule divides the returned loss in place (it may be ``kd``)
            return loss, {"kd": kd.detach().clone(), "cost_error": rel.detach().clone()}

        return logits, loss_func
