"""Training-step benchmarks: plain megatron-core steps vs elastic steps at pinned budgets.

The plain step is the parent's: one :class:`~megatron_ext.training.engine.Engine` step with
the next-token loss (megatron-core's DDP, distributed optimizer, forward-backward schedule,
clipping). The legacy step is the same step written as a plain torch loop (backward,
``clip_grad_norm_``, ``torch.optim.AdamW``): what the project's loop did before the engine, at
one rank. The elastic step is ``ElasticTrainer.step`` itself: router forward, gates on every
axis, KD loss, cost term, router and student updates on the engine. All see the same batch.

The router's hard choice is pinned to one width combination per budget with a one-row
:class:`FeasibleSet`, so every timed step runs the budget it is meant to; the router still
runs and still gets its straight-through gradient. The KD teacher is either the real frozen
parent or :class:`ReplayTeacher`, which returns the parent's final hidden states for the batch
computed once beforehand: the elastic step without its teacher's decoder forward (the
teacher's output layer still runs inside the chunked distillation loss).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from suite_profile import layer_kind_timer

from megatron_ext.distill_chunked import hidden_states_only
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.cost import CostModel, CostSpec
from megatron_ext.elastic.feasible import FeasibleSet
from megatron_ext.elastic.router import ElasticRouter, RouterConfig
from megatron_ext.elastic.slicing import sliced_config
from megatron_ext.elastic.train_config import ElasticTrainConfig
from megatron_ext.elastic.trainer import ElasticTrainer, StagePlan
from megatron_ext.models.builder import build_model, causal_mask
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, set_seed
from megatron_ext.training.engine import Engine, LMStep
from megatron_ext.training.engine_config import EngineConfig
from megatron_ext.training.loop import lm_loss

Batch = dict[str, torch.Tensor]
STAGE_SPAN = 10**6  # steps per pinned-budget stage: stage i covers [i * SPAN, (i + 1) * SPAN)
LR = 1e-4


class ReplayTeacher(torch.nn.Module):
    """A frozen "teacher" that replays its decoder's output computed once: the KD step minus
    the teacher's decoder forward.

    The elastic step reads the teacher's final hidden states and runs its output layer chunk
    by chunk inside the distillation loss (``megatron_ext.distill_chunked``), so the replay
    keeps the parent's output layer (and, when tied, its embedding weight) and returns the
    stored hidden states whatever the input.
    """

    def __init__(self, parent: torch.nn.Module, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden
        self.output_layer = parent.output_layer
        self.share_embeddings_and_output_weights = parent.share_embeddings_and_output_weights
        self._shared = parent.shared_embedding_or_output_weight() if parent.pre_process else None
        self.post_process = True
        self.requires_grad_(False)
        self.eval()

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The parent's tied embedding weight (``output_head`` reads it when tied)."""
        return self._shared

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The stored final hidden states, whatever the input."""
        return self.hidden


class Repeat:
    """An endless iterator over one batch (what a ``StagePlan`` reads)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def __iter__(self) -> Repeat:
        return self

    def __next__(self) -> Batch:
        return self.batch


def build(cfg: HybridModelConfig, pgs, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The plain model of ``cfg`` with seeded random weights, on ``device``."""
    set_seed(seed)
    return build_model(cfg, ParallelConfig(), pgs).to(device)


def engine_config(cfg: HybridModelConfig, batch: Batch, **overrides) -> EngineConfig:
    """The engine settings every benchmarked step uses (bf16 when the model is bf16)."""
    values = dict(
        micro_batch_size=int(batch["tokens"].shape[0]),
        precision="bf16" if cfg.params_dtype == "bfloat16" else "fp32",
        lr=LR,
        weight_decay=0.1,
        adam_beta2=0.95,
        grad_clip=1.0,
    )
    values.update(overrides)
    return EngineConfig(**values)


def plain_step(
    model: torch.nn.Module, batch: Batch, pgs, cfg: HybridModelConfig
) -> Callable[[], None]:
    """One parent training step on the engine (the body of ``megatron_ext.training.loop``)."""
    engine = Engine([model], engine_config(cfg, batch), pgs)
    engine.train()
    step = LMStep()

    def run() -> None:
        engine.step(step, [batch], LR)

    return run


def legacy_step(model: torch.nn.Module, batch: Batch) -> Callable[[], None]:
    """The same step as a plain torch loop at one rank: loss, backward, clip, AdamW."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)
    model.train()

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        lm_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return run


def pinned(elastic: ElasticConfig, cfg: HybridModelConfig, budget: str) -> FeasibleSet:
    """A feasible set of exactly one combination: the widths of ``budget``."""
    widths = elastic.widths_for(budget, cfg)
    row = [elastic.axes[axis].index(widths[axis]) for axis in elastic.axes]
    zero = torch.zeros(1, dtype=torch.float64)
    return FeasibleSet(tuple(elastic.axes), torch.tensor([row]), zero)


@dataclass
class ElasticBench:
    """An elastic student with its router and controller, and trainers over one batch."""

    student: torch.nn.Module
    ctrl: ElasticController
    trainers: dict[str, ElasticTrainer]  # "replay" (no teacher forward), "teacher"
    elastic: ElasticConfig
    cfg: HybridModelConfig
    steps: dict[str, int]

    def step(self, budget: str, mode: str, teacher: str = "replay") -> Callable[[], None]:
        """A closure running one trainer step at ``budget`` in compute ``mode``."""
        names = [b.name for b in self.elastic.budgets]
        index = names.index(budget)
        want = self.elastic.widths_for(budget, self.cfg)

        def run() -> None:
            self.steps[budget] += 1
            self.ctrl.set_mode(mode)
            metrics = self.trainers[teacher].step(index * STAGE_SPAN + self.steps[budget])
            got = {a: w for a, w in metrics["widths"].items() if w != want[a]}
            if metrics["budget"] != budget or got:
                raise RuntimeError(f"step ran {metrics['budget']} {got}, not {budget}")

        return run


def elastic_bench(
    cfg: HybridModelConfig,
    elastic: ElasticConfig,
    batch: Batch,
    pgs,
    device: torch.device,
    *,
    teacher: torch.nn.Module | None,
) -> ElasticBench:
    """The student (the parent's weights, converted), router and trainers at every budget.

    ``teacher`` is the frozen parent, or ``None`` to build only the replay trainer (whose
    hidden states come from a parent built here, which only its output layer outlives).
    """
    parent = teacher if teacher is not None else build(cfg, pgs, device).eval()
    tokens, pos = batch["tokens"], batch["position_ids"]
    with torch.no_grad(), hidden_states_only(parent):
        hidden = parent(tokens, pos, causal_mask(tokens.shape[1], tokens.device))
    if teacher is not None:
        teacher.requires_grad_(False)
    replay = ReplayTeacher(parent, hidden)
    del parent
    student = build(cfg, pgs, device)
    ctrl = ElasticController(cfg, StripeLayout(), mode=elastic.compute)
    convert_to_elastic(student, ctrl)
    router = ElasticRouter(elastic, RouterConfig(hidden=elastic.router_hidden)).to(device)
    costs = {k: CostModel(cfg, CostSpec(kind=k)) for k in {b.kind for b in elastic.budgets}}
    n = len(elastic.budgets)
    stages = [
        StagePlan(
            b.name, i * STAGE_SPAN, STAGE_SPAN, tokens.shape[1], onehot(i, n), LR, Repeat(batch)
        )
        for i, b in enumerate(elastic.budgets)
    ]
    train_cfg = ElasticTrainConfig(warmup_steps=0)
    settings = engine_config(cfg, batch, prefix="elastic_train")
    engine = Engine([student], settings, pgs, side=router, side_lr=1e-2)
    feasible = {b.name: pinned(elastic, cfg, b.name) for b in elastic.budgets}
    teachers: dict[str, torch.nn.Module] = {"replay": replay}
    if teacher is not None:
        teachers["teacher"] = teacher
    trainers = {
        name: ElasticTrainer(
            engine,
            t,
            router,
            ctrl,
            elastic,
            stages,
            costs,
            train_cfg,
            pgs,
            seed=0,
            feasible=feasible,
        )
        for name, t in teachers.items()
    }
    engine.train()
    steps = {b.name: 0 for b in elastic.budgets}
    return ElasticBench(student, ctrl, trainers, elastic, cfg, steps)


def onehot(index: int, n: int) -> list[float]:
    """Budget probabilities that always draw budget ``index``."""
    return [1.0 if i == index else 0.0 for i in range(n)]


@dataclass
class TrainSetup:
    """The timed training-step closures of ratios 1 and 2, and the models behind them."""

    cases: dict[str, Callable[[], None]]
    bench: ElasticBench
    mid_slice: torch.nn.Module


def step_cases(
    cfg: HybridModelConfig, elastic: ElasticConfig, batch: Batch, pgs, device: torch.device
) -> TrainSetup:
    """Every timed training step of ratios 1 and 2, by name."""
    teacher = build(cfg, pgs, device).eval()
    bench = elastic_bench(cfg, elastic, batch, pgs, device, teacher=teacher)
    full, mid = (b.name for b in elastic.budgets[:2])
    mid_widths = elastic.widths_for(mid, cfg)
    mid_slice = build(sliced_config(cfg, mid_widths), pgs, device)
    cases = {
        "plain": plain_step(build(cfg, pgs, device), batch, pgs, cfg),
        "legacy": legacy_step(build(cfg, pgs, device), batch),
        "elastic_full": bench.step(full, "narrow"),
        "elastic_full_teacher": bench.step(full, "narrow", "teacher"),
        "elastic_mid_narrow": bench.step(mid, "narrow"),
        "elastic_mid_masked": bench.step(mid, "masked"),
        "plain_mid_slice": plain_step(mid_slice, batch, pgs, sliced_config(cfg, mid_widths)),
    }
    return TrainSetup(cases, bench, mid_slice)


@torch.no_grad()
def forward_breakdown(setup: TrainSetup, batch: Batch, reps: int) -> dict[str, dict[str, float]]:
    """Median forward seconds per layer kind: elastic at full and mid widths, and the slice."""
    bench, cfg = setup.bench, setup.bench.cfg
    mid = bench.elastic.widths_for(bench.elastic.budgets[1].name, cfg)
    tokens, pos = batch["tokens"], batch["position_ids"]
    mask = causal_mask(tokens.shape[1], tokens.device)
    runs = {
        "elastic_full": (bench.student, {}, "narrow"),
        "elastic_mid_narrow": (bench.student, mid, "narrow"),
        "elastic_mid_masked": (bench.student, mid, "masked"),
        "plain_mid_slice": (setup.mid_slice, None, None),
    }
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
    for _ in range(reps):
        for name, (model, widths, mode) in runs.items():
            with layer_kind_timer(model, cfg.pattern) as seconds:
                start = time.perf_counter()
                if widths is None:
                    model(tokens, pos, mask)
                else:
                    with bench.ctrl.at(widths, mode=mode):
                        model(tokens, pos, mask)
                seconds["total"] = time.perf_counter() - start
            for kind, value in seconds.items():
                samples[name].setdefault(kind, []).append(value)
    return {
        name: {kind: statistics.median(v) for kind, v in kinds.items()}
        for name, kinds in samples.items()
    }
