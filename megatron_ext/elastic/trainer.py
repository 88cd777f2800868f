"""The elastic training loop (Star Elastic / Nemotron Elastic) on the training engine.

Per step: the curriculum stage and the budget are pure functions of (seed, stage, step), so
every rank agrees without communication (invariant 6). :class:`~megatron_ext.elastic.step.
ElasticStep` runs the router, the gates, the frozen parent and the student on every
micro-batch; the loss is the vocab-parallel forward KL from the parent plus the weighted
relative cost error. :class:`~megatron_ext.training.engine.Engine` reduces the gradients of
the student and of the replicated router (megatron-core's DDP and ``finalize_model_grads``),
clips the student's and steps both optimizers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.cost import CostModel
from megatron_ext.elastic.curriculum import sample_budget
from megatron_ext.elastic.feasible import FeasibleSet
from megatron_ext.elastic.router import ElasticRouter
from megatron_ext.elastic.step import ElasticStep, teacher_hidden_states
from megatron_ext.elastic.train_config import ElasticTrainConfig
from megatron_ext.training.engine import Engine
from megatron_ext.training.metrics import IntervalMetrics, progress_bar
from megatron_ext.training.preemption import PreemptionHandler, save_or_stop
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
    microbatches: int = 1  # per step and data-parallel rank (gradient accumulation)


@dataclass
class ElasticHistory:
    """Metrics kept across resumes."""

    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0


def _dp(pg_collection) -> int:
    return dist.get_world_size(pg_collection.dp) if dist.is_initialized() else 1


class ElasticTrainer:
    """Trains an elastic student against a frozen teacher with a budget router."""

    def __init__(
        self,
        engine: Engine,
        teacher: torch.nn.Module,
        router: ElasticRouter,
        controller: ElasticController,
        elastic: ElasticConfig,
        stages: list[StagePlan],
        cost_models: dict[str, CostModel],
        cfg: ElasticTrainConfig,
        pg_collection,
        *,
        seed: int,
        feasible: dict[str, FeasibleSet] | None = None,
    ) -> None:
        """``engine`` holds the converted student and, as its side module, ``router``.

        ``seed`` drives budget sampling and router noise (the curriculum's seed).

        ``feasible`` (budget name → :class:`FeasibleSet`) restricts the router's hard choices
        to configurations within ``router.budget_tolerance`` of each target.
        """
        if teacher.training or any(p.requires_grad for p in teacher.parameters()):
            raise ValueError("the KD teacher must be frozen: eval mode and requires_grad=False")
        if engine.side is None or engine.side.module.module is not router:
            raise ValueError("the engine must hold the router as its side module")
        self.engine, self.teacher, self.router = engine, teacher, router
        self.student = engine.model
        self.ctrl, self.elastic, self.stages = controller, elastic, stages
        self.cost_models, self.cfg, self.pgs = cost_models, cfg, pg_collection
        self.router_opt: Any = engine.side_optimizer
        self.tp_size = dist.get_world_size(pg_collection.tp) if dist.is_initialized() else 1
        pp = getattr(pg_collection, "pp", None)
        self.pp_size = pp.size() if pp is not None and dist.is_initialized() else 1
        self.seed = seed
        self.step_fn = ElasticStep(self)
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
        stage = self.stages[self.stage_of(step)]
        budget = self.elastic.budgets[self.budget_of(step)]
        micro = [next(stage.batches) for _ in range(stage.microbatches)]
        warm = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
        self.step_fn.begin(step)
        self.engine.seq_length = stage.seq_length  # the stages' p2p activations' length
        if self.pp_size > 1:  # the teacher is staged too: its pass first, through the schedule
            micro = [dict(b) for b in micro]  # the teacher's states go in this step's copies
            teacher_hidden_states(self.teacher, micro, self.pgs, seq_length=stage.seq_length)
        result = self.engine.step(self.step_fn, micro, stage.lr * warm)
        self.ctrl.set_gates(None)
        assert self.step_fn.last_cost is not None
        out, (cost, target, rel) = self.step_fn.last, self.step_fn.last_cost
        self.history.tokens += sum(int(b["tokens"].numel()) for b in micro) * _dp(self.pgs)
        return {
            "step": step + 1,
            "stage": stage.name,
            "budget": budget.name,
            "kd": result.metrics["kd"],
            "cost_error": float(rel.detach()),
            "cost": float(cost.detach()),
            "target": target,
            "tau": self.router.tau(step),
            "lr": stage.lr * warm,
            "grad_norm": result.grad_norm,
            "widths": out.widths(),
        }

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
        self.engine.train()
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
                self.engine.train()
            if log is not None and (done % self.cfg.log_interval == 0 or val):
                log(done, {**interval.flush(), **val})  # means over the interval
            save_or_stop(done, end, self.cfg.save_interval, checkpoint, self.state, preemption, bar)
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
