"""``star-elastic plan [train-elastic|train-parent] [overrides...]``: will the run fit?

Composes the training recipe's config with the same overrides, prints per curriculum stage and
pipeline stage the bytes per rank of every component (:mod:`megatron_ext.plan.budget`), the
tokens per step and the steps, and refuses (exit code 2, the component named) a run whose peak
exceeds ``cluster.gpu_memory_gb``. Nothing is built, allocated or written.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from omegaconf import DictConfig

from megatron_ext.config.compose import section
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.plan.budget import (
    COMPONENTS,
    GIB,
    PlanInputs,
    StageLength,
    StagePlan,
    check_fits,
    plan_memory,
)

SECTIONS = {"train-elastic": "elastic_train", "train-parent": "train"}


def plan_inputs(cfg: DictConfig, recipe: str) -> PlanInputs:
    """The planner's inputs from a composed ``recipe`` config (engine fields where present)."""
    if recipe not in SECTIONS:
        raise ValueError(f"plan: {recipe!r} is not one of {sorted(SECTIONS)}")
    name = SECTIONS[recipe]
    model = section(cfg, "model", HybridModelConfig)
    train: Any = cfg[name]
    par: Any = cfg.parallel
    if recipe == "train-elastic":
        stages = [
            StageLength(
                s.name,
                int(s.seq_length),
                int(s.get("steps", 0)),
                int(s.get("tokens", 0)),
                int(s.get("micro_batch_size", 0)),
            )
            for s in cfg.curriculum.stages
        ]
    else:
        stages = [StageLength("parent", int(train.seq_length), int(train.steps))]
    default_precision = "bf16" if model.params_dtype == "bfloat16" else "fp32"
    return PlanInputs(
        model=model,
        stages=stages,
        nproc=int(par.nproc),
        tp=int(par.tp),
        ep=int(par.ep),
        pp=int(par.get("pp", 1)),
        cp=int(par.get("cp", 1)),
        micro_batch_size=int(train.micro_batch_size),
        global_batch_size=int(train.get("global_batch_size", 0)),
        precision=str(train.get("precision", default_precision)),
        recompute=str(train.get("recompute", "none")),
        distributed_optimizer=bool(train.get("distributed_optimizer", False)),
        teacher=recipe == "train-elastic",
        kd_chunk_size=int(train.get("kd_chunk_size", 0)),
        ce_weight=float(train.get("ce_weight", 0.0)),
        gpu_memory_gb=float(cfg.cluster.get("gpu_memory_gb", 0.0)),
        section=name,
    )


def _unit(plans: list[StagePlan]) -> tuple[str, float]:
    """GiB, or MiB when every peak is under one GiB."""
    peak = max(p.total(i) for p in plans for i in range(len(p.per_pp_stage)))
    return ("GiB", GIB) if peak >= GIB else ("MiB", 1024.0**2)


def render(inp: PlanInputs, plans: list[StagePlan]) -> str:
    """The plan as text: one table per curriculum stage, GiB per rank of each pipeline stage."""
    budget = f"{inp.gpu_memory_gb:g} GiB" if inp.gpu_memory_gb else "unknown"
    lines = [
        f"plan: {inp.model.name}, {inp.nproc} ranks = TP {inp.tp} x PP {inp.pp} x CP {inp.cp} "
        f"x DP {inp.dp} (EP {inp.ep}), precision {inp.precision}, recompute {inp.recompute}, "
        f"distributed optimizer {'on' if inp.distributed_optimizer else 'off'}, "
        f"KD chunk {inp.kd_chunk_size or 'whole'}; GPU memory {budget}"
    ]
    unit, scale = _unit(plans)
    for plan in plans:
        heads = [f"pp stage {i}" for i in range(len(plan.per_pp_stage))]
        lines += [
            "",
            f"stage {plan.name}: seq {plan.seq_length}, micro-batch {plan.micro_batch_size}, "
            f"{plan.tokens_per_step:,} tokens/step, {plan.steps:,} steps",
        ]
        width = max(12, *(len(h) for h in heads))
        lines.append(f"  {unit + ' per rank':<14}" + "".join(f"{h:>{width + 2}}" for h in heads))
        for comp in COMPONENTS:
            row = "".join(f"{p[comp] / scale:>{width + 2},.2f}" for p in plan.per_pp_stage)
            lines.append(f"  {comp:<14}{row}")
        totals = "".join(f"{plan.total(i) / scale:>{width + 2},.2f}" for i in range(len(heads)))
        lines.append(f"  {'peak':<14}{totals}")
    lines.append("")
    lines.append("peak = weights + grads + optimizer + teacher + activations + the larger of")
    lines.append("backward and kd_chunk (never alive together)")
    return "\n".join(lines)


def run(cfg: DictConfig, recipe: str = "train-elastic", stream: TextIO | None = None):
    """Print the plan of ``recipe`` under ``cfg``; raise ``ConfigError`` if it cannot fit.

    ``stream`` defaults to stdout; the Slurm submission prints it to stderr, as its stdout
    carries the rendered script of a dry run.
    """
    inp = plan_inputs(cfg, recipe)
    plans = plan_memory(inp)
    print(render(inp, plans), file=stream or sys.stdout)
    check_fits(inp, plans)
    return plans
