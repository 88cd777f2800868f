"""The memory planner: per-rank bytes of a training run, per curriculum stage.

:func:`plan_memory` multiplies out :mod:`.counts` for one rank of every pipeline stage (tensor,
expert, context and data parallel ranks of a stage hold the same amounts):

==============  ===========================================================================
weights         the stage's parameters on this rank, in the training precision
grads           fp32 gradients (megatron's DDP gradient buffer lives through the step)
optimizer       Adam's two fp32 moments, plus fp32 main parameters under bf16; divided by
                the data-parallel size with the distributed optimizer (experts: by the
                expert-data-parallel size)
teacher         the frozen parent's weights (train-elastic) and its final hidden states (at
                ``pp > 1`` those of every micro-batch of the step: its forward-only pass
                through the schedule runs first and they wait on the last stage)
activations     what autograd keeps per layer (:func:`.counts.layer_activations`) for the
                micro-batches in flight (1F1B: ``pp - stage`` on stage ``stage``), with the
                chosen recompute; sequence parallelism and context parallelism split tokens
backward        the gradients one layer's backward holds at its worst point
                (:func:`.counts.backward_working`)
kd_chunk        the distillation's working set on the last stage: 10 fp32 copies of one
                chunk's logits shard (student and teacher logits, their shifted and
                exponentiated forms, the gradient), the output layer's gradient accumulator
                and the hidden-state gradient; for train-parent, the cross entropy's logits
==============  ===========================================================================

The peak: the persistent parts (weights, gradients, optimizer state, teacher) plus the
activations, plus the larger of ``backward`` and ``kd_chunk``, which are never alive together
(the loss's working set is freed before the first layer's backward starts). Under full
recompute, ``activations`` include one layer's whole activations while the backward
recomputes it; that part is not alive during the loss either, so the peak takes the larger
of it (with ``backward``) and ``kd_chunk`` (:attr:`StagePlan.recomputed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_ext.models.config import ConfigError, HybridModelConfig, require
from megatron_ext.plan.counts import (
    LayerParams,
    backward_working,
    embedding_params,
    layer_activations,
    layer_params,
    output_params,
    recomputed_activations,
)

GIB = 1024**3
COMPONENTS = ("weights", "grads", "optimizer", "teacher", "activations", "backward", "kd_chunk")
TRANSIENT = ("backward", "kd_chunk")  # never alive together: the peak takes the larger
KD_LOGIT_COPIES = 10  # fp32 copies of one chunk's logits shard alive at once (measured)
CE_LOGIT_COPIES = 3  # the parent's cross entropy: logits, their fp32 softmax, the gradient


@dataclass(frozen=True)
class StageLength:
    """A curriculum stage as the planner needs it."""

    name: str
    seq_length: int
    steps: int = 0
    tokens: int = 0
    micro_batch_size: int = 0  # 0: the run's


@dataclass
class PlanInputs:
    """Everything the planner reads, gathered from a recipe config (:mod:`recipes.plan`)."""

    model: HybridModelConfig
    stages: list[StageLength]
    nproc: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    cp: int = 1
    micro_batch_size: int = 1
    global_batch_size: int = 0  # 0: micro_batch_size x data-parallel size
    precision: str = "fp32"  # fp32 | bf16 (fp32 main parameters, gradients, optimizer)
    recompute: str = "none"  # none | selective | full
    distributed_optimizer: bool = False
    teacher: bool = True  # train-elastic's frozen parent
    kd_chunk_size: int = 0  # 0: whole logits
    ce_weight: float = 0.0
    gpu_memory_gb: float = 0.0  # 0: unknown, nothing is refused
    section: str = "elastic_train"  # the recipe section the batch fields come from

    def __post_init__(self) -> None:
        require(self.precision in ("fp32", "bf16"), f"{self.section}.precision", "fp32 or bf16")
        require(
            self.recompute in ("none", "selective", "full"),
            f"{self.section}.recompute",
            "none, selective or full",
        )
        require(
            self.nproc % (self.tp * self.pp * self.cp) == 0,
            "parallel.nproc",
            f"must be a multiple of tp*pp*cp = {self.tp * self.pp * self.cp}",
        )
        require(
            self.model.num_layers % self.pp == 0,
            "parallel.pp",
            f"must divide the {self.model.num_layers} layers",
        )

    @property
    def dp(self) -> int:
        """Data-parallel size."""
        return self.nproc // (self.tp * self.pp * self.cp)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.global_batch_size or self.micro_batch_size * self.dp


@dataclass
class StagePlan:
    """One curriculum stage: per pipeline stage, bytes per component on one rank."""

    name: str
    seq_length: int
    micro_batch_size: int
    tokens_per_step: int
    steps: int
    per_pp_stage: list[dict[str, float]] = field(default_factory=list)
    recomputed: list[float] = field(default_factory=list)  # per pp stage; module docstring

    def total(self, pp_stage: int) -> float:
        """Peak bytes of one rank of ``pp_stage`` (the larger of the two transients counts).

        The recomputed layer's activations (part of ``activations``, alive in the backward
        only) and the loss's working set are not alive together either.
        """
        parts = self.per_pp_stage[pp_stage]
        kept = sum(v for k, v in parts.items() if k not in TRANSIENT)
        once = self.recomputed[pp_stage] if self.recomputed else 0.0
        return kept + max(parts["backward"], parts["kd_chunk"] - once)

    @property
    def worst(self) -> int:
        """The pipeline stage with the largest peak."""
        return max(range(len(self.per_pp_stage)), key=self.total)


def _stage_layers(cfg: HybridModelConfig, pp: int, stage: int) -> str:
    per = cfg.num_layers // pp
    return cfg.pattern[stage * per : (stage + 1) * per]


def _stage_params(inp: PlanInputs, stage: int) -> tuple[float, float]:
    """(dense, expert) parameter elements on one rank of pipeline stage ``stage``."""
    cfg = inp.model
    parts: list[LayerParams] = [layer_params(cfg, k) for k in _stage_layers(cfg, inp.pp, stage)]
    if stage == 0:
        parts.append(embedding_params(cfg))
    if stage == inp.pp - 1:
        parts.append(output_params(cfg))
        if cfg.tie_embeddings and inp.pp > 1:
            parts.append(embedding_params(cfg))  # the last stage's copy of the tied weight
    dense = sum(p.tp_sharded / inp.tp + p.replicated for p in parts)
    experts = sum(p.experts / (inp.ep * inp.tp) for p in parts)
    return dense, experts


def _activations(
    inp: PlanInputs, stage: int, seq: int, micro: int, in_flight: int
) -> tuple[float, float]:
    """(activations, the part of them that is one layer recomputed in the backward)."""
    cfg = inp.model
    bytes_per = 4 if inp.precision == "fp32" else 2
    # tensor parallelism splits each layer's width, sequence parallelism the residual stream's
    # tokens: either way one rank keeps about 1/tp of the elements; context parallelism 1/cp
    tokens = micro * seq / (inp.tp * inp.cp)
    kinds = _stage_layers(cfg, inp.pp, stage)
    kept = sum(recomputed_activations(cfg, k, inp.recompute, seq) for k in kinds)
    if inp.recompute == "full":  # one layer's whole activations while it is recomputed
        once = max(layer_activations(cfg, k, seq) for k in kinds)
    else:
        once = 0.0
    # the residual stream: the embedding output on the first, the final norm on the last stage
    edges = cfg.hidden_size * (stage == 0) + (3 * cfg.hidden_size + 1) * (stage == inp.pp - 1)
    per_token = tokens * bytes_per
    return (kept * in_flight + once + edges) * per_token, once * per_token


def _backward(inp: PlanInputs, stage: int, seq: int, micro: int) -> float:
    """The backward's working gradients at the worst layer; under full recompute they sit on
    top of that layer's recomputed activations (megatron's checkpoint runs the layer's
    backward right after recomputing it)."""
    cfg = inp.model
    bytes_per = 4 if inp.precision == "fp32" else 2
    kinds = _stage_layers(cfg, inp.pp, stage)
    worst = max(backward_working(cfg, k, seq) for k in kinds)
    return worst * micro * seq / (inp.tp * inp.cp) * bytes_per


def _loss_working(inp: PlanInputs, seq: int, micro: int) -> float:
    cfg = inp.model
    vocab = cfg.vocab_size / inp.tp
    local = seq / ((inp.tp if inp.tp > 1 else 1) * inp.cp)
    bytes_per = 4 if inp.precision == "fp32" else 2
    if not inp.teacher:
        return CE_LOGIT_COPIES * 4 * micro * seq / inp.cp * vocab
    chunk = min(inp.kd_chunk_size or local, local) * (inp.tp if inp.tp > 1 else 1) * micro
    copies = KD_LOGIT_COPIES + (2 if inp.ce_weight > 0 else 0)
    grad_out = vocab * cfg.hidden_size * 4
    grad_hidden = micro * local * cfg.hidden_size * bytes_per
    return copies * 4 * chunk * vocab + grad_out + grad_hidden


def plan_memory(inp: PlanInputs) -> list[StagePlan]:
    """Per curriculum stage and pipeline stage, the bytes of each component on one rank."""
    weight_bytes = 4 if inp.precision == "fp32" else 2
    opt_bytes = 8 + (4 if inp.precision == "bf16" else 0)
    edp = max(1, inp.nproc // (inp.pp * inp.ep * inp.tp))
    plans = []
    for st in inp.stages:
        micro = st.micro_batch_size or inp.micro_batch_size
        global_batch = inp.global_batch_size or micro * inp.dp
        if global_batch % (micro * inp.dp):
            raise ConfigError(
                f"{inp.section}.global_batch_size: {global_batch} is not a multiple of "
                f"micro_batch_size x data-parallel size = {micro} x {inp.dp}"
            )
        microbatches = global_batch // (micro * inp.dp)
        steps = st.steps or math.ceil(st.tokens / (global_batch * st.seq_length))
        plan = StagePlan(st.name, st.seq_length, micro, global_batch * st.seq_length, steps)
        for stage in range(inp.pp):
            dense, experts = _stage_params(inp, stage)
            params = dense + experts
            in_flight = min(inp.pp - stage, microbatches)
            last = stage == inp.pp - 1
            teacher = 0.0
            if inp.teacher:
                teacher = params * weight_bytes
                if last:  # its final hidden states: one micro-batch's, or the step's at pp > 1
                    tokens = micro * st.seq_length / ((inp.tp if inp.tp > 1 else 1) * inp.cp)
                    held = microbatches if inp.pp > 1 else 1
                    teacher += held * tokens * inp.model.hidden_size * weight_bytes
            dp_div = inp.dp if inp.distributed_optimizer else 1
            activations, recomputed = _activations(inp, stage, st.seq_length, micro, in_flight)
            plan.recomputed.append(recomputed)
            edp_div = edp if inp.distributed_optimizer else 1
            plan.per_pp_stage.append(
                {
                    "weights": params * weight_bytes,
                    "grads": params * 4,
                    "optimizer": (dense / dp_div + experts / edp_div) * opt_bytes,
                    "teacher": teacher,
                    "activations": activations,
                    "backward": _backward(inp, stage, st.seq_length, micro),
                    "kd_chunk": _loss_working(inp, st.seq_length, micro) if last else 0.0,
                }
            )
        plans.append(plan)
    return plans


_ADVICE = {
    "weights": "raise parallel.tp, parallel.pp or parallel.ep, or train in {s}.precision=bf16",
    "grads": "raise parallel.tp, parallel.pp or parallel.ep",
    "optimizer": "set {s}.distributed_optimizer=true, or raise the data-parallel size "
    "(parallel.nproc)",
    "optimizer_sharded": "raise the data-parallel size (parallel.nproc) or parallel.ep, so "
    "the distributed optimizer shards over more ranks",
    "teacher": "raise parallel.tp or parallel.pp, or keep the teacher in bf16 ({s}.precision=bf16)",
    "activations": "set {s}.recompute=full, lower the micro-batch size or the micro-batches "
    "in flight ({s}.global_batch_size), or raise parallel.tp (sequence parallel)",
    "activations_no_full_recompute": "lower the micro-batch size or the micro-batches in flight "
    "({s}.global_batch_size), or raise parallel.tp (sequence parallel) "
    "({s}.recompute=full is refused: it would run the router's gates through a nested backward)",
    "backward": "raise parallel.tp (sequence parallel) or parallel.cp, or lower the micro-batch "
    "size",
    "kd_chunk": "lower {s}.kd_chunk_size (0 = whole logits), or raise parallel.tp",
}


def check_fits(inp: PlanInputs, plans: list[StagePlan]) -> None:
    """Raise :class:`ConfigError` naming the largest component of a stage over the GPU memory."""
    if inp.gpu_memory_gb <= 0:
        return
    budget = inp.gpu_memory_gb * GIB
    for plan in plans:
        worst = plan.worst
        total = plan.total(worst)
        if total <= budget:
            continue
        parts = dict(plan.per_pp_stage[worst])
        smaller = min(TRANSIENT, key=lambda k: parts[k])
        parts.pop(smaller)  # not part of the peak
        big = max(parts, key=lambda k: parts[k])
        advice = big
        if big == "optimizer" and inp.distributed_optimizer:
            advice = "optimizer_sharded"
        if big == "activations" and inp.section == "elastic_train":
            advice = "activations_no_full_recompute"
        raise ConfigError(
            f"cluster.gpu_memory_gb: stage {plan.name!r} (seq {plan.seq_length}) needs "
            f"{total / GIB:.1f} GiB per rank on pipeline stage {worst}, over the "
            f"{inp.gpu_memory_gb:g} GiB of a GPU; the largest part is {big} "
            f"({parts[big] / GIB:.1f} GiB): " + _ADVICE[advice].format(s=inp.section)
        )
