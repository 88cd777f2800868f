"""Elastic training cases of ``cases_engine.py``: the router and KD on the engine at TP=2 (SP)
and EP=2, every axis elastic, and what every rank must then hold identically.

The elastic config is the project's own (``conf/elastic/tiny.yaml`` through Hydra: seven
axes, three budgets); the budgets are drawn per step from (seed, stage, step) as in
``train-elastic``. The teacher is the parent built from the same seed, frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_ext.config.compose import compose_recipe, section
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.cost import CostModel, CostSpec
from megatron_ext.elastic.router import ElasticRouter, RouterConfig, layer_counts
from megatron_ext.elastic.train_config import ElasticTrainConfig
from megatron_ext.elastic.trainer import ElasticTrainer, StagePlan
from megatron_ext.models.builder import build_model
from megatron_ext.parallel import set_seed
from megatron_ext.training.engine import Engine
from megatron_ext.training.engine_config import EngineConfig

STEPS = 6


class RankBatches:
    """This rank's micro-batches in step order (what a ``StagePlan`` reads)."""

    def __init__(self, dp: int, rank: int, per_step: int) -> None:
        self.dp, self.rank, self.per_step, self.next_index = dp, rank, per_step, 0

    def __iter__(self) -> RankBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        from cases_engine import chunk

        step, k = divmod(self.next_index, self.per_step)
        self.next_index += 1
        return chunk((step * self.per_step + k) * self.dp + self.rank)

    def state_dict(self) -> dict[str, int]:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_index = state["next_index"]


def elastic_trainer(tp: int, ep: int, compute: str):
    """A converted elastic student, its frozen teacher and router, on the engine."""
    from cases_engine import MICRO, MODEL, SEED, SEQ, layout

    par, pgs = layout(tp=tp, ep=ep)
    elastic = section(
        compose_recipe("train_elastic", [f"elastic.compute={compute}"]), "elastic", ElasticConfig
    )
    set_seed(SEED)
    teacher = build_model(MODEL, par, pgs).eval().requires_grad_(False)
    set_seed(SEED)
    student = build_model(MODEL, par, pgs)
    ctrl = ElasticController(MODEL, stripes=StripeLayout(tp=tp, ep=ep), mode=elastic.compute)
    convert_to_elastic(student, ctrl)
    router = ElasticRouter(elastic, RouterConfig(), layer_counts(elastic, MODEL))
    costs = {k: CostModel(MODEL, CostSpec(kind=k)) for k in {b.kind for b in elastic.budgets}}
    train_cfg = ElasticTrainConfig(micro_batch_size=MICRO, warmup_steps=2)
    engine = Engine(
        [student],
        EngineConfig.of(train_cfg, "elastic_train", lr=1e-3),
        pgs,
        side=router,
        side_lr=1e-2,
        seq_length=SEQ,
    )
    dp = pgs.dp.size()
    stage = StagePlan("one", 0, STEPS, SEQ, [1 / 3] * 3, 1e-3, RankBatches(dp, pgs.dp.rank(), 1), 1)
    trainer = ElasticTrainer(
        engine, teacher, router, ctrl, elastic, [stage], costs, train_cfg, pgs, seed=7
    )
    return trainer, pgs


def elastic_replicas(tp: int, ep: int, compute: str) -> dict:
    """``STEPS`` elastic steps, then every replicated parameter compared across its ranks."""
    from cases_engine import replica_gaps

    trainer, pgs = elastic_trainer(tp, ep, compute)
    trainer.engine.train()
    metrics = [trainer.step(s) for s in range(STEPS)]
    return {
        "budgets": [m["budget"] for m in metrics],
        "kd": [m["kd"] for m in metrics],
        "replica_gaps": replica_gaps(trainer.engine.model, pgs, trainer.router),
    }


def elastic_resume(work: Path) -> dict:
    """Elastic at TP=2: 6 steps vs 3, checkpoint (student, optimizer, router), 3 more."""
    from cases_engine import fresh_dir

    from megatron_ext.checkpoint import CheckpointManager

    trainer, pgs = elastic_trainer(2, 1, "masked")
    trainer.engine.train()
    whole = [trainer.step(s)["kd"] for s in range(STEPS)]
    half = STEPS // 2
    first, pgs = elastic_trainer(2, 1, "masked")
    first.engine.train()
    for s in range(half):
        first.step(s)
    ckpts = CheckpointManager(fresh_dir(work / "elastic_resume"), pgs)
    ckpts.save(half, first.engine.model, first.engine.optimizer, first.state(half))
    resumed, pgs = elastic_trainer(2, 1, "masked")
    start = resumed.load_state(
        ckpts.load(ckpts.latest_valid(), resumed.engine.model, resumed.engine.optimizer)
    )
    resumed.engine.train()
    after = [resumed.step(s)["kd"] for s in range(start, STEPS)]
    return {
        "step_gap": max(abs(a - b) for a, b in zip(whole[half:], after)),
        "whole": whole,
        "resumed": after,
    }


def elastic_cases(work: Path) -> dict:
    """The elastic cases by name."""
    return {
        "elastic_tp2_sp_masked": lambda: elastic_replicas(2, 1, "masked"),
        "elastic_tp2_sp_narrow": lambda: elastic_replicas(2, 1, "narrow"),
        "elastic_ep2": lambda: elastic_replicas(1, 2, "masked"),
        "elastic_resume_tp2": lambda: elastic_resume(work),
    }
