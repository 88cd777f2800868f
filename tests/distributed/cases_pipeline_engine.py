"""The engine's elastic trainer at PP=2 (staged teacher) against PP=1, and a PP=2 resume.

One case of ``cases_pipeline.py`` (run in its torchrun launch, same models and micro-batches).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.cost import CostModel, CostSpec
from megatron_ext.elastic.router import ElasticRouter, RouterConfig
from megatron_ext.elastic.train_config import ElasticTrainConfig
from tests.distributed.cases_parallel_equivalence import (
    all_ranks,
    fresh_dir,
    load_weights,
    save_weights,
)
from tests.distributed.cases_pipeline import (
    ELASTIC_DEPTH,
    MICRO,
    MICROBATCHES,
    MODEL,
    ORDER,
    SEED,
    SEQ,
    build,
    layout,
    microbatches,
)


class StepBatches:
    """The micro-batches of ``microbatches(0), microbatches(1), ...`` as a resumable iterator."""

    def __init__(self) -> None:
        self.position = 0

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = microbatches(self.position // MICROBATCHES)[self.position % MICROBATCHES]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def engine_elastic_run(pp: int, weights: Path, steps: range, load_from=None):
    """The engine's elastic trainer (staged teacher at pp > 1) on ``weights``; its metrics.

    ``load_from``: a (manager, checkpoint) to resume from before the steps (weights, both
    optimizers, router, RNG)."""
    from megatron_ext.elastic.trainer import ElasticTrainer, StagePlan
    from megatron_ext.training.engine import Engine
    from megatron_ext.training.engine_config import EngineConfig

    par, pgs = layout(pp=pp)
    teacher = build(par, pgs, seed=SEED + 51)
    load_weights(teacher, weights)
    teacher.eval().requires_grad_(False)
    student = build(par, pgs, seed=SEED + 52)
    load_weights(student, weights)
    ctrl = ElasticController(MODEL, StripeLayout(layer_order=ORDER), mode="masked")
    convert_to_elastic(student, ctrl)
    router = ElasticRouter(ELASTIC_DEPTH, RouterConfig(hidden=32, seed=3))
    cfg = EngineConfig(micro_batch_size=MICRO, global_batch_size=MICRO * MICROBATCHES, lr=1e-3)
    engine = Engine([student], cfg, pgs, side=router, side_lr=1e-2, seq_length=SEQ)
    engine.reload_model_params()
    stage = StagePlan("s", 0, 8, SEQ, [0.5, 0.5], 1e-3, StepBatches(), MICROBATCHES)
    costs = {"params": CostModel(MODEL, CostSpec(kind="params"), ORDER)}
    train_cfg = ElasticTrainConfig(ce_weight=0.5, cost_weight=1.0, warmup_steps=0, kd_chunk_size=16)
    trainer = ElasticTrainer(
        engine, teacher, router, ctrl, ELASTIC_DEPTH, [stage], costs, train_cfg, pgs, seed=11
    )
    if load_from is not None:
        manager, path = load_from
        trainer.load_state(manager.load(path, engine.model, engine.optimizer))
    out = []
    for step in steps:
        m = trainer.step(step)
        out.append([m["kd"], m["cost_error"], m["grad_norm"], m["budget"], m["widths"]])
    return out, trainer, engine, pgs


def case_engine_elastic(work: Path) -> dict:
    """The engine's elastic step (router, staged teacher, chunked KD) at PP=2 against PP=1,
    then a PP=2 resume: save after 2 steps, 2 more steps from the load."""
    par, pgs = layout(pp=1)
    weights = save_weights(build(par, pgs, seed=SEED + 50), work / "engine_elastic_weights")
    ref, *_ = engine_elastic_run(1, weights, range(3))
    first, trainer, engine, pgs = engine_elastic_run(2, weights, range(2))
    manager = CheckpointManager(fresh_dir(work / "engine_elastic_ckpt"), pgs)
    manager.save(2, engine.model, engine.optimizer, trainer.state(2))
    cont = [trainer.step(s) for s in range(2, 4)]
    continued = [[m["kd"], m["cost_error"], m["grad_norm"], m["budget"], m["widths"]] for m in cont]
    resumed, *_ = engine_elastic_run(
        2, weights, range(2, 4), load_from=(manager, manager.latest_valid())
    )
    return {
        "pp1": ref,
        "pp2": first + continued[:1],
        "pp2_continued": continued,
        "pp2_resumed": resumed,
        "ranks_agree": all_ranks(first),  # type: ignore[arg-type]
    }
