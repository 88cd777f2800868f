"""Pipeline-parallel steps on megatron-core's own schedules.

:func:`run_schedule` runs micro-batches through ``get_forward_backward_func`` (1F1B at
``pp > 1``, no pipelining at ``pp = 1``) with the process groups passed in explicitly. A
forward-step function is megatron's ``(data_iterator, model) -> (output, loss_func)``.

:func:`lm_forward_step` is the parent's (next-token cross entropy). :func:`teacher_logits`
runs a frozen model forward-only through the same schedule and returns its logits per
micro-batch on the last stage, where a distillation loss reads them.

Parameters that every stage holds and uses (the elastic router) live in a megatron DDP chunk
of their own (:func:`replicated_chunk`); :func:`finalize_with` makes the schedule's
``finalize_model_grads`` hook finalize that chunk too, where megatron-core sums their
gradients over the pipeline stages (:func:`megatron_ext.compat.pipeline.sum_over_pipeline_stages`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from megatron_ext.models.builder import attention_mask

Batch = dict[str, torch.Tensor]
ForwardStep = Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Callable]]


def pipeline_stages(pg_collection) -> int:
    """How many pipeline stages ``pg_collection`` splits the model into (1 for ``None``)."""
    group = getattr(pg_collection, "pp", None)
    return 1 if group is None else group.size()


def is_last_stage(pg_collection) -> bool:
    """Whether this rank holds the model's last pipeline stage (its loss)."""
    group = getattr(pg_collection, "pp", None)
    return group is None or group.rank() == group.size() - 1


def schedule_groups(pg_collection):
    """The process groups megatron's schedules and ``finalize_model_grads`` expect.

    ``pg_collection`` itself when it has them all (megatron's ``use_mpu_process_groups()``
    does); otherwise a copy with the embedding groups set to ``None`` (one stage: no second
    copy of the word embedding to reduce).
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    if all(hasattr(pg_collection, name) for name in ("embd", "pos_embd", "dp_cp")):
        return pg_collection
    if pipeline_stages(pg_collection) > 1:
        raise ValueError("pipeline stages need pg_collection.embd (the first and last stage)")
    out = ProcessGroupCollection()
    for name in ("tp", "pp", "cp", "dp", "dp_cp", "ep", "expt_dp", "tp_ep", "expt_tp"):
        if hasattr(pg_collection, name):
            setattr(out, name, getattr(pg_collection, name))
    out.embd = out.pos_embd = None
    if not hasattr(out, "dp_cp"):
        out.dp_cp = out.dp
    return out


def run_schedule(
    model: torch.nn.Module,
    microbatches: Sequence[Batch],
    forward_step: ForwardStep,
    pg_collection,
    *,
    seq_length: int,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
) -> list[Any]:
    """Run ``microbatches`` through megatron's schedule for this layout; returns its outputs.

    On the last stage the list holds each micro-batch's loss-function metrics (or, with
    ``collect_non_loss_data``, what the loss function returned); on other stages it is empty.
    ``seq_length`` is the full sequence length (megatron divides it under sequence
    parallelism).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.utils import get_model_config

    pgs = schedule_groups(pg_collection)
    config = get_model_config(model)
    schedule = get_forward_backward_func(pp_size=pipeline_stages(pgs))
    micro = int(microbatches[0]["tokens"].shape[0])
    return schedule(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
        p2p_communicator=P2PCommunicator(pp_group=pgs.pp, config=config),
        pg_collection=pgs,
    )


def metrics_on_every_stage(
    model: torch.nn.Module,
    microbatches: Sequence[Batch],
    forward_step: ForwardStep,
    pg_collection,
    *,
    seq_length: int,
) -> list[dict[str, float]]:
    """Forward only through the schedule; each micro-batch's loss-function metrics (floats),
    computed on the last stage and broadcast over the pipeline group to every stage."""
    import torch.distributed as dist

    out = run_schedule(
        model, microbatches, forward_step, pg_collection, seq_length=seq_length, forward_only=True
    )
    box = [[{name: float(value) for name, value in o.items()} for o in out]]
    group: Any = getattr(pg_collection, "pp", None)
    if pipeline_stages(pg_collection) > 1:
        last = dist.get_global_rank(group, group.size() - 1)
        dist.broadcast_object_list(box, src=last, group=group)
    return box[0]


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_token`` over the tokens where ``mask`` is 1."""
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


def lm_forward_step(data_iterator, model: torch.nn.Module):
    """The parent's forward step: next-token cross entropy over the loss mask."""
    batch = next(data_iterator)
    tokens = batch["tokens"]
    out = model(
        tokens,
        batch["position_ids"],
        attention_mask(model, tokens.shape[1], tokens.device),
        labels=batch["labels"],
    )

    def loss_func(per_token: torch.Tensor):
        loss = masked_mean(per_token, batch["loss_mask"])
        return loss, {"loss": loss.detach().clone()}  # the schedule scales ``loss`` in place

    return out, loss_func


def _logits_step(data_iterator, model: torch.nn.Module):
    batch = next(data_iterator)
    tokens = batch["tokens"]
    out = model(
        tokens, batch["position_ids"], attention_mask(model, tokens.shape[1], tokens.device)
    )

    def keep(logits: torch.Tensor, non_loss_data: bool = True):
        return logits.detach()

    return out, keep


@torch.no_grad()
def teacher_logits(
    teacher: torch.nn.Module, microbatches: Sequence[Batch], pg_collection, *, seq_length: int
) -> list[torch.Tensor]:
    """The frozen ``teacher``'s logits per micro-batch (last stage; ``[]`` elsewhere).

    The teacher is pipelined like the student; its forward-only pass goes through megatron's
    schedule so every stage computes its own layers.
    """
    return run_schedule(
        teacher,
        microbatches,
        _logits_step,
        pg_collection,
        seq_length=seq_length,
        forward_only=True,
        collect_non_loss_data=True,
    )


class ReplicatedChunk(torch.nn.Module):
    """A module every rank holds whole, as a model chunk megatron's finalize accepts.

    It holds no stage's embedding or output layer (``pre_process`` / ``post_process`` false,
    nothing shared), so ``finalize_model_grads`` skips the word-embedding reduction for it.
    """

    pre_process = False
    post_process = False
    share_embeddings_and_output_weights = False

    def __init__(self, module: torch.nn.Module, config: Any) -> None:
        super().__init__()
        self.module = module
        self.config = config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's forward."""
        return self.module(*args, **kwargs)


def replicated_chunk(module: torch.nn.Module, config: Any, pg_collection, ddp_config=None):
    """``module`` (replicated on every rank) as a megatron DDP chunk of its own.

    Its gradients are then averaged over data parallelism by megatron's DDP, summed over
    tensor parallelism under sequence parallelism (its parameters are marked
    ``sequence_parallel``: every TP rank holds a part of the tokens and channels it gates)
    and summed over the pipeline stages, all inside
    megatron's ``finalize_model_grads`` (see :func:`finalize_with`). ``config`` is the model's
    ``TransformerConfig``; the chunk gets its own copy, so the markings do not reach the
    model's. The result's ``.module.module`` is ``module``.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_ext.compat.pipeline import sum_over_pipeline_stages

    own = dataclasses.replace(config)
    params = [p for p in module.parameters() if p.requires_grad]
    for param in params:
        param.sequence_parallel = True  # type: ignore[attr-defined]
    sum_over_pipeline_stages(params, own)
    ddp = ddp_config or DistributedDataParallelConfig()
    chunk = ReplicatedChunk(module, own)
    return DistributedDataParallel(own, ddp, chunk, pg_collection=pg_collection)


def finalize_with(chunks: Iterable[torch.nn.Module], pg_collection) -> Callable[..., None]:
    """A ``finalize_model_grads_func`` that also finalizes the replicated ``chunks``."""
    from megatron.core.distributed import finalize_model_grads

    extra = list(chunks)
    groups = schedule_groups(pg_collection)

    def finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False) -> None:
        finalize_model_grads(model, num_tokens, pg_collection, force_all_reduce)
        if extra:
            finalize_model_grads(extra, None, groups, force_all_reduce)

    return finalize
