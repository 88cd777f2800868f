"""A budget distilled on its own, with the tokens, loss and optimizer an elastic run gave it.

The elastic run trains every budget in one model; budget ``i`` gets only the steps whose
curriculum draw picked it. :func:`budget_stages` recounts those steps by recomputing every
draw (``sample_budget(stage.probs, curriculum.seed, stage, step)``, as the trainer does);
:func:`distill` trains a plain model by knowledge distillation from a frozen teacher on
exactly those steps' batches (each stage's iterator rebuilt with the trainer's seeds, the
other budgets' batches drawn and skipped) with the run's loss (``kd_loss``, its temperature,
``ce_weight``), the training engine's optimizer and the per-stage lr with linear warm-up
over its own steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_ext.data.config import DataConfig
from megatron_ext.distill_chunked import hidden_states_only, output_head
from megatron_ext.elastic.curriculum import CurriculumConfig, sample_budget
from megatron_ext.elastic.step import elastic_loss
from megatron_ext.elastic.train_config import ElasticTrainConfig
from megatron_ext.models.builder import attention_mask
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.data import build_batches
from megatron_ext.training.engine import Engine
from megatron_ext.training.engine_config import EngineConfig

STAGE_SEED_STRIDE = 101  # the trainer seeds stage i's data iterator with run.seed + 101 * (i + 1)


@dataclass
class StageShare:
    """One curriculum stage, and which of its steps drew the budget."""

    name: str
    seq_length: int
    batch: int
    lr: float
    seed: int
    chosen: list[bool] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Steps of this stage that trained the budget."""
        return sum(self.chosen)

    def as_dict(self) -> dict[str, Any]:
        """The stage's figures for a summary (without the per-step draws)."""
        return {
            "name": self.name,
            "steps": self.steps,
            "of": len(self.chosen),
            "seq_length": self.seq_length,
            "batch": self.batch,
            "lr": self.lr,
            "seed": self.seed,
        }


def budget_stages(
    curriculum: CurriculumConfig,
    train: ElasticTrainConfig,
    dp: int,
    num_budgets: int,
    index: int,
    seed: int,
) -> list[StageShare]:
    """Per stage, the steps of an elastic run whose budget draw was budget ``index`` (its
    place in ``elastic.budgets``); ``seed`` is the run's ``run.seed``."""
    shares = []
    for i, st in enumerate(curriculum.resolve(train.micro_batch_size * dp, num_budgets)):
        chosen = [
            sample_budget(st.budget_probs, curriculum.seed, i, st.start_step + k) == index
            for k in range(st.steps)
        ]
        batch = (st.micro_batch_size or train.micro_batch_size) * dp
        shares.append(
            StageShare(
                st.name, st.seq_length, batch, st.lr, seed + STAGE_SEED_STRIDE * (i + 1), chosen
            )
        )
    return shares


def share_tokens(stages: list[StageShare]) -> int:
    """Tokens the budget trained on over ``stages``."""
    return sum(s.steps * s.batch * s.seq_length for s in stages)


class KDStep:
    """The elastic run's loss (KD, plus CE when configured) without router or cost term:
    teacher and student to their final hidden states, the output layers and KD chunked
    along the sequence (:func:`~megatron_ext.elastic.step.elastic_loss`), at TP=1."""

    def __init__(self, teacher: torch.nn.Module, train: ElasticTrainConfig, pgs) -> None:
        self.teacher, self.train, self.pgs = teacher, train, pgs

    def forward(self, model, batch):
        """Teacher hidden states (no grad), the student's, and the loss function."""
        tokens, pos = batch["tokens"], batch["position_ids"]
        with torch.no_grad(), hidden_states_only(self.teacher):
            target = self.teacher(tokens, pos, attention_mask(self.teacher, tokens.shape[1]))
        with hidden_states_only(model):
            hidden = model(tokens, pos, attention_mask(model, tokens.shape[1]))
        loss = functools.partial(
            elastic_loss,
            teacher_hidden=target,
            heads=(output_head(model), output_head(self.teacher)),
            batch=batch,
            cost_penalty=torch.zeros(()),
            cfg=self.train,
            tp_group=self.pgs.tp,
            tp_size=1,
        )
        return hidden, lambda h: loss(h)


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    stages: list[StageShare],
    data: DataConfig,
    train: ElasticTrainConfig,
    pgs,
) -> int:
    """Train ``student`` by KD on the chosen steps' batches of each stage; returns steps."""
    settings = EngineConfig.of(train, "elastic_train", lr=stages[0].lr, global_batch_size=0)
    engine = Engine([student], settings, pgs)
    step = KDStep(teacher, train, pgs)
    engine.train()
    done = 0
    for st in stages:
        tc = TrainConfig(
            steps=len(st.chosen),
            micro_batch_size=st.batch,
            seq_length=st.seq_length,
            eval_batches=1,
            warmup_steps=0,
        )
        batches = build_batches(data, tc, pgs, seed=st.seed)[0]
        for chosen in st.chosen:
            batch = next(batches)  # every step's batch is drawn, as in the elastic run
            if not chosen:
                continue
            warm = min(1.0, (done + 1) / train.warmup_steps) if train.warmup_steps else 1.0
            engine.step(step, [batch], st.lr * warm)
            done += 1
    return done
