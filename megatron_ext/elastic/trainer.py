"""One elastic training step and the loop around it (Star Elastic / Nemotron Elastic).

Per step: the curriculum stage and the budget are pure functions of (seed, stage, step), so
every rank agrees without communication (invariant 6). The router maps the budget to a hard
straight-through choice per axis; the controller applies the widths and the gates; the loss is
the vocab-parallel forward KL from the frozen parent plus the weighted relative cost error.

Router gradients: the router is replicated on every rank. The task-loss part of its gradient
is partial on each rank (TP shards, sequence-parallel slices, EP-local experts, each DP
replica's own tokens), so it is summed over the world and divided by the DP size, like a
replicated parameter's. The cost part is identical on every rank and is added once after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_ext.distill import kd_loss
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.cost import CostModel
from megatron_ext.elastic.curriculum import sample_budget, step_generator
from megatron_ext.elastic.feasible import FeasibleSet
from megatron_ext.elastic.router import ElasticRouter
from megatron_ext.elastic.train_config import ElasticTrainConfig
from megatron_ext.models.builder import causal_mask
from megatron_ext.training.grads import clip_grad_norm, reduce_gradients
from megatron_ext.training.metrics import IntervalMetrics, progress_bar
from megatron_ext.training.optim import set_lr
from megatron_ext.training.preemption import Preempted, PreemptionHandler
from megatron_ext.training.state import capture_rng, restore_rng

Batch = dict[str, torch.Tensor]


@dataclass
class StagePlan:
    """A resolved curriculum stage: its steps, budget probabilities, lr and batches."""

    name: str
    start: int
    steps: int
    seq_length: int
    probs: list[float]
    lr: float
    batches: Any  # a resumable iterator (state_dict / load_state_dict)


@dataclass
class ElasticHistory:
    """Metrics kept across resumes."""

    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _dp(pg_collection) -> int:
    return dist.get_world_size(pg_collection.dp) if dist.is_initialized() else 1


class ElasticTrainer:
    """Trains an elastic student against a frozen teacher with a budget router."""

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        router: ElasticRouter,
        controller: ElasticController,
        elastic: ElasticConfig,
        stages: list[StagePlan],
        cost_models: dict[str, CostModel],
        cfg: ElasticTrainConfig,
        pg_collection,
        *,
        model_optimizer: torch.optim.Optimizer,
        router_optimizer: torch.optim.Optimizer,
        seed: int,
        feasible: dict[str, FeasibleSet] | None = None,
    ) -> None:
        """``seed`` drives budget sampling and router noise (the curriculum's seed).

        ``feasible`` (budget name → :class:`FeasibleSet`) restricts the router's hard choices
        to configurations within ``router.budget_tolerance`` of each target.
        """
        if teacher.training or any(p.requires_grad for p in teacher.parameters()):
            raise ValueError("the KD teacher must be frozen: eval mode and requires_grad=False")
        self.student, self.teacher, self.router = student, teacher, router
        self.ctrl, self.elastic, self.stages = controller, elastic, stages
        self.cost_models, self.cfg, self.pgs = cost_models, cfg, pg_collection
        self.model_opt, self.router_opt = model_optimizer, router_optimizer
        self.seed = seed
        self.feasible = dict(feasible or {})
        self.history = ElasticHistory()

    @property
    def total_steps(self) -> int:
        """Steps of the whole curriculum."""
        return self.stages[-1].start + self.stages[-1].steps

    def stage_of(self, step: int) -> int:
        """Index of the curriculum stage that ``step`` belongs to."""
        for i, stage in enumerate(self.stages):
            if step < stage.start + stage.steps:
                return i
        return len(self.stages) - 1

    def budget_of(self, step: int) -> int:
        """The budget index of ``step``: a pure function of (seed, stage, step)."""
        stage = self.stage_of(step)
        return sample_budget(self.stages[stage].probs, self.seed, stage, step)

    def choices(self) -> dict[str, dict[str, int]]:
        """The router's deterministic widths per budget (feasible-restricted when configured)."""
        return {
            b.name: self.router.select_homogeneous(b.name, self.feasible.get(b.name))
            for b in self.elastic.budgets
        }

    def cost_terms(self, budget_index: int, expected: dict[str, torch.Tensor]):
        """(cost, target cost, relative error) of a choice, differentiable in the widths."""
        budget = self.elastic.budgets[budget_index]
        model = self.cost_models[budget.kind]
        target = budget.target * model.full()
        cost = model(expected)
        return cost, target, (cost - target).abs() / target

    # ---- one step --------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step of student and router; returns the step's metrics."""
        stage_index = self.stage_of(step)
        stage = self.stages[stage_index]
        budget_index = self.budget_of(step)
        budget = self.elastic.budgets[budget_index]
        batch = next(stage.batches)
        noise = step_generator(self.seed, stage_index, step)  # the same on every rank
        out = self.router(
            budget.name, step, generator=noise, feasible=self.feasible.get(budget.name)
        )
        self.ctrl.set_widths(out.widths())
        self.ctrl.set_gates({a: (out[a].onehot, self.router.choices[a]) for a in out.axes})
        warm = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
        set_lr(self.model_opt, stage.lr * warm)
        self.model_opt.zero_grad(set_to_none=True)
        self.router_opt.zero_grad(set_to_none=True)

        tokens, pos = batch["tokens"], batch["position_ids"]
        mask = causal_mask(tokens.shape[1], tokens.device)
        with torch.no_grad():
            teacher_logits = self.teacher(tokens, pos, mask)
        student_logits = self.student(tokens, pos, mask)
        kd = kd_loss(
            student_logits,
            teacher_logits,
            temperature=self.cfg.kd_temperature,
            tp_group=self.pgs.tp,
            loss_mask=batch["loss_mask"],
        )
        loss = kd
        if self.cfg.ce_weight > 0:  # the trainable-teacher variant's next-token term
            per_token = vocab_parallel_cross_entropy(student_logits.float(), batch["labels"])
            m = batch["loss_mask"]
            loss = loss + self.cfg.ce_weight * (per_token * m).sum() / m.sum().clamp(min=1)
        cost, target, rel = self.cost_terms(budget_index, out.expected_widths())
        router_params = [p for p in self.router.parameters() if p.requires_grad]
        penalty = rel.square() if self.cfg.cost_loss == "squared" else rel
        cost_grads = torch.autograd.grad(  # keeps only the router's tiny graph for the KD pass
            self.cfg.cost_weight * penalty, router_params, retain_graph=True, allow_unused=True
        )
        loss.backward()
        self.ctrl.set_gates(None)
        reduce_gradients(self.student, self.pgs)
        self._reduce_router_grads()
        for p, g in zip(router_params, cost_grads):
            if g is not None:
                p.grad.add_(g.to(p.grad.dtype))  # type: ignore[union-attr]
        grad_norm = clip_grad_norm(self.student, self.cfg.grad_clip, self.pgs)
        self.model_opt.step()
        self.router_opt.step()
        kd_value = float(kd.detach())
        if dist.is_initialized() and _dp(self.pgs) > 1:
            t = torch.tensor([kd_value], dtype=torch.float64)
            dist.all_reduce(t, group=self.pgs.dp)
            kd_value = float(t) / _dp(self.pgs)
        self.history.tokens += int(tokens.numel()) * _dp(self.pgs)
        return {
            "step": step + 1,
            "stage": stage.name,
            "budget": budget.name,
            "kd": kd_value,
            "cost_error": float(rel.detach()),
            "cost": float(cost.detach()),
            "target": target,
            "tau": self.router.tau(step),
            "lr": stage.lr * warm,
            "grad_norm": grad_norm,
            "widths": out.widths(),
        }

    def _reduce_router_grads(self) -> None:
        params = [p for p in self.router.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if _world() == 1:
            for p in params:
                p.grad.mul_(self.cfg.router_task_weight)  # type: ignore[union-attr]
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        dist.all_reduce(flat)
        flat *= self.cfg.router_task_weight / _dp(self.pgs)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))  # type: ignore[union-attr]
            offset += n

    # ---- the loop --------------------------------------------------------------------------

    def state(self, step: int) -> dict[str, Any]:
        """Everything a bit-identical resume needs besides the student and its optimizer."""
        return {
            "step": step,
            "rng": capture_rng(),
            "data": [s.batches.state_dict() for s in self.stages],
            "router": self.router.state_dict(),
            "router_optimizer": self.router_opt.state_dict(),
            "history": self.history,
        }

    def load_state(self, state: dict[str, Any]) -> int:
        """Restore :meth:`state`; returns the step to continue from."""
        restore_rng(state["rng"])
        for stage, data in zip(self.stages, state["data"]):
            stage.batches.load_state_dict(data)
        self.router.load_state_dict(state["router"])
        self.router_opt.load_state_dict(state["router_optimizer"])
        self.history = state["history"]
        return int(state["step"])

    def train(
        self,
        start: int,
        *,
        evaluate: Callable[[int], dict[str, Any]],
        checkpoint: Callable[[int, dict[str, Any]], object] | None = None,
        log: Callable[[int, dict[str, Any]], None] | None = None,
        progress: bool = True,
        preemption: PreemptionHandler | None = None,
    ) -> ElasticHistory:
        """Run from ``start`` to the end of the curriculum (or ``cfg.stop_at``).

        With ``preemption``, a signal on any rank (agreed after every step) saves a checkpoint
        and raises :class:`Preempted` with the step reached (unless it is the last step).
        """
        end = self.cfg.stop_at or self.total_steps
        main = not dist.is_initialized() or dist.get_rank() == 0
        bar = progress_bar(
            total=end, initial=start, desc="elastic", disable=not (progress and main)
        )
        interval = IntervalMetrics()
        self.student.train()
        for step in range(start, end):
            t0 = time.perf_counter()
            tokens = self.history.tokens
            metrics = self.step(step)
            self.history.train_seconds += time.perf_counter() - t0
            flat = {k: v for k, v in _flat(metrics).items() if k != "step"}
            interval.add(
                flat, tokens=self.history.tokens - tokens, seconds=time.perf_counter() - t0
            )
            self.history.train.append(metrics)
            bar.update(1)
            bar.set_postfix(
                stage=metrics["stage"],
                budget=metrics["budget"],
                kd=f"{metrics['kd']:.3f}",
                refresh=False,
            )
            done = step + 1
            val: dict[str, Any] = {}
            if done % self.cfg.eval_interval == 0 or done == end:
                val = evaluate(done)
                self.history.val.append({"step": done, **val})
                self.student.train()
            if log is not None and (done % self.cfg.log_interval == 0 or val):
                log(done, {**interval.flush(), **val})  # means over the interval
            saved = done % self.cfg.save_interval == 0 or done == end
            if checkpoint is not None and saved:
                checkpoint(done, self.state(done))
            if preemption is not None and preemption.requested() and done < end:
                if checkpoint is not None and not saved:
                    checkpoint(done, self.state(done))
                bar.close()
                raise Preempted(done, preemption.signum)
        bar.close()
        return self.history


def _flat(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    budget = metrics["budget"]
    out[f"kd/{budget}"] = metrics["kd"]
    out[f"cost_error/{budget}"] = metrics["cost_error"]
    for axis, width in metrics["widths"].items():
        out[f"router/{budget}/{axis}"] = width
    return out
