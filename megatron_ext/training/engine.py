"""The training engine: megatron-core's DDP, optimizer and forward-backward schedules.

One :class:`Engine` serves train-parent, train-elastic and QAD; each supplies only its
:class:`TrainStep` (the forward pass of one micro-batch and its loss and metrics). Per step:

1. the learning rate is set and the gradient buffers are zeroed;
2. ``get_forward_backward_func()`` runs every micro-batch of the step through the model
   chunks (no pipelining at PP=1, 1F1B / interleaved at PP>1), dividing each micro-batch's
   loss by their number (gradient accumulation);
3. its ``finalize_model_grads`` (set on the model config) reduces gradients with
   ``DistributedDataParallel`` (dense over DP, experts over expert-DP, bucketed, overlapped
   with the backward when ``overlap_grad_reduce``) and sums sequence-parallel replicated
   parameters (norms, the MoE router) over TP;
4. ``get_megatron_optimizer``'s optimizer (ZeRO-1 sharded with ``distributed_optimizer``)
   clips by the global norm and steps.

A *replicated* side module (the elastic budget router: a few kB on every rank) is wrapped in
its own DDP and optimizer; its parameters are marked ``sequence_parallel`` so that the same
``finalize_model_grads`` sums their gradients over TP (each TP rank's gradient is the part of
its own sequence slice and its own heads / channels / experts) and averages them over DP.
EP ranks are data-parallel ranks for every dense parameter (megatron carves EP out of DP), so
that average covers them: as for a norm, each EP rank's router gradient is that of its own
tokens. Without sequence parallelism a TP>1 rank's router gradient would mix partial (heads,
channels) and replicated (residual stream) parts, so train-elastic requires SP at TP>1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_ext.compat.engine import gloo_optimizer_groups
from megatron_ext.parallel import loss_token_share, split_for_context_parallel
from megatron_ext.training.engine_config import EngineConfig
from megatron_ext.training.pipeline import replicated_chunk
from megatron_ext.training.recompute import apply_recompute

Batch = dict[str, torch.Tensor]
LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TrainStep(Protocol):
    """The pluggable part of a step: one micro-batch's forward pass and its loss."""

    def forward(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, LossFunc]:
        """Run ``model`` (one chunk) on ``batch``; return its output and the loss function.

        The loss function maps the output to ``(loss, metrics)``: the micro-batch's scalar
        loss and detached scalar metrics (averaged over micro-batches and DP by the engine).
        """
        ...


@dataclass
class StepResult:
    """What one engine step measured: mean metrics over the global batch, the grad norm."""

    metrics: dict[str, float]
    grad_norm: float
    microbatches: int


def _size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() and group is not None else 1


def _ddp_config(cfg: EngineConfig, *, bucketed: bool = True) -> DistributedDataParallelConfig:
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.overlap_grad_reduce and bucketed,
        use_distributed_optimizer=cfg.distributed_optimizer and bucketed,
        bucket_size=cfg.bucket_size or None,
    )


def _optimizer_config(cfg: EngineConfig, *, lr: float, **overrides: Any) -> OptimizerConfig:
    bf16 = cfg.precision == "bf16"
    values: dict[str, Any] = dict(
        optimizer="adam",
        lr=lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.grad_clip,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.distributed_optimizer,
    )
    values.update(overrides)
    return OptimizerConfig(**values)


def set_lr(optimizer: Any, lr: float) -> None:
    """Set the learning rate of every parameter group of a (megatron) optimizer."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class Engine:
    """megatron-core's training machinery around a list of model chunks (one per virtual
    pipeline stage; one at PP=1) and, optionally, a replicated side module."""

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        cfg: EngineConfig,
        pg_collection,
        *,
        side: torch.nn.Module | None = None,
        side_lr: float = 0.0,
        seq_length: int = 0,
    ) -> None:
        """Wrap ``chunks`` (built, converted, not yet wrapped) and build the optimizers.

        ``side`` (with ``side_lr``) gets its own DDP and a non-sharded Adam without weight
        decay or clipping; its gradient is reduced by the same ``finalize_model_grads`` call.
        """
        if not chunks:
            raise ValueError("the engine needs at least one model chunk")
        self.cfg, self.pgs = cfg, pg_collection
        self.seq_length = seq_length
        self.dp = _size(pg_collection.dp)
        self.num_microbatches = cfg.microbatches(self.dp)
        self.config: Any = chunks[0].config
        self.chunks: list[DistributedDataParallel] = []
        for index, chunk in enumerate(chunks):
            apply_recompute(chunk, cfg.recompute)
            config: Any = chunk.config
            if cfg.precision == "bf16":  # megatron's convention: both, as when built in bf16
                config.bf16, config.params_dtype = True, torch.bfloat16
                chunk = Float16Module(config, chunk)
            self.chunks.append(
                DistributedDataParallel(
                    config,
                    _ddp_config(cfg),
                    chunk,
                    disable_bucketing=index > 0,
                    pg_collection=pg_collection,
                )
            )
        self.optimizer = get_megatron_optimizer(
            _optimizer_config(cfg, lr=cfg.lr),
            self.chunks,
            use_gloo_process_groups=False,
            pg_collection=pg_collection,
        )
        gloo_optimizer_groups(self.optimizer)
        self.side: DistributedDataParallel | None = None
        self.side_optimizer = None
        if side is not None:
            # its own DDP chunk: TP sum (sequence_parallel marks), DP average and, at pp > 1,
            # the sum over the stages whose gates it feeds, all in finalize_model_grads
            self.side = replicated_chunk(
                side, self.config, pg_collection, _ddp_config(cfg, bucketed=False)
            )
            side_cfg = _optimizer_config(
                cfg,
                lr=side_lr,
                weight_decay=0.0,
                adam_beta2=0.999,
                clip_grad=0.0,
                bf16=False,
                params_dtype=torch.float32,
                use_distributed_optimizer=False,
            )
            self.side_optimizer = get_megatron_optimizer(
                side_cfg, [self.side], use_gloo_process_groups=False, pg_collection=pg_collection
            )
        self._wire_config()

    def _wire_config(self) -> None:
        """Point the model config at DDP's no-sync and at ``finalize_model_grads``."""
        config = self.config
        config.no_sync_func = [c.no_sync for c in self.chunks]
        if len(self.chunks) == 1:
            config.no_sync_func = config.no_sync_func[0]
        if self.cfg.overlap_grad_reduce:
            config.grad_sync_func = [c.start_grad_sync for c in self.chunks]
            if len(self.chunks) == 1:
                config.grad_sync_func = config.grad_sync_func[0]
        side = self.side

        def finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
            finalize_model_grads(model, num_tokens, pg_collection, force_all_reduce)
            if side is not None:
                finalize_model_grads([side], None, pg_collection, force_all_reduce)

        config.finalize_model_grads_func = finalize

    @property
    def model(self) -> DistributedDataParallel:
        """The (wrapped) model chunk of this rank at PP=1, for checkpoints and evaluation."""
        if len(self.chunks) != 1:
            raise ValueError("this engine holds several model chunks; use .chunks")
        return self.chunks[0]

    def train(self) -> None:
        """Put every chunk (and the side module) in training mode."""
        for chunk in self.chunks:
            chunk.train()
        if self.side is not None:
            self.side.train()

    def _forward_step_func(self, step: TrainStep):
        cp_group = getattr(self.pgs, "cp", None)
        cp = _size(cp_group)

        def forward_step(data_iterator, model):
            part = split_for_context_parallel(next(data_iterator), cp_group)
            output, loss_func = step.forward(model, part)
            if cp == 1:
                return output, loss_func
            share = loss_token_share(part["loss_mask"], cp_group)
            return output, functools.partial(_context_parallel_loss, loss_func, share, cp)

        return forward_step

    def step(self, step: TrainStep, microbatches: Iterable[Batch], lr: float) -> StepResult:
        """One optimizer step over ``microbatches`` (this rank's part of the global batch)."""
        batches = list(microbatches)
        set_lr(self.optimizer, lr)
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.side is not None:
            self.side.zero_grad_buffer()
            self.side_optimizer.zero_grad()  # type: ignore[union-attr]
        outputs = self._run(step, batches, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        if self.side_optimizer is not None:
            self.side_optimizer.step()
        return StepResult(
            self._mean_metrics(outputs),
            float(grad_norm) if grad_norm is not None else 0.0,
            len(batches),
        )

    @torch.no_grad()
    def evaluate(self, step: TrainStep, batches: list[Batch]) -> dict[str, float]:
        """Mean metrics of ``step`` over ``batches`` and DP, forward only, in eval mode."""
        for chunk in self.chunks:
            chunk.eval()
        try:
            outputs = self._run(step, batches, forward_only=True)
        finally:
            self.train()
        return self._mean_metrics(outputs)

    def _run(self, step: TrainStep, batches: list[Batch], *, forward_only: bool) -> list:
        forward_backward = get_forward_backward_func()
        first = batches[0]["tokens"]
        return forward_backward(
            forward_step_func=self._forward_step_func(step),
            data_iterator=iter(batches),
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(batches),
            seq_length=self.seq_length or first.shape[1],
            micro_batch_size=first.shape[0],
            forward_only=forward_only,
        )

    def _mean_metrics(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Average the per-micro-batch metrics, then over DP × CP (on every rank).

        Each context-parallel rank's metrics are those of its part of the sequences.

        Under pipeline parallelism only the last stage computes the loss: its means are
        broadcast over the pipeline group first.
        """
        means = (
            {n: sum(float(o[n]) for o in outputs) / len(outputs) for n in outputs[0]}
            if outputs
            else {}
        )
        pp = getattr(self.pgs, "pp", None)
        if pp is not None and _size(pp) > 1:
            box = [means]
            dist.broadcast_object_list(box, src=dist.get_global_rank(pp, pp.size() - 1), group=pp)
            means = box[0]
        if not means:
            return {}
        names = sorted(means)
        values = torch.tensor([means[n] for n in names], dtype=torch.float64)
        group = getattr(self.pgs, "dp_cp", None)
        group = self.pgs.dp if group is None else group
        if _size(group) > 1:
            dist.all_reduce(values, group=group)
            values /= _size(group)
        return dict(zip(names, values.tolist()))

    # ---- optimizer state, for checkpoints and the benchmark --------------------------------

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state (Adam moments, fp32 main params) held by this rank."""
        total = 0
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", opt)
            for state in inner.state.values():
                total += sum(
                    t.numel() * t.element_size()
                    for t in state.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0
                )
        return total

    def reload_model_params(self) -> None:
        """Refresh the optimizer's fp32 main parameters from the model's (after a weight load)."""
        self.optimizer.reload_model_params()


def _context_parallel_loss(
    loss_func: LossFunc, share: torch.Tensor, cp: int, output: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A context-parallel rank's loss, weighted so that megatron's reductions give the mean.

    ``loss_func`` gives the mean over this rank's loss tokens; ``share`` is their fraction of
    the sequences' loss tokens. megatron's schedule multiplies a two-output loss by ``cp`` and
    DDP averages gradients over DP × CP, so ``share * mean`` makes the gradient that of the
    mean over every token of the sequences (exactly, whatever the mask). Metrics are averaged
    over DP × CP by :meth:`Engine._mean_metrics`, hence ``cp * share * metric``.
    """
    loss, metrics = loss_func(output)
    scaled = {name: value * (share * cp) for name, value in metrics.items()}
    return loss * share, scaled


def lm_forward(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, LossFunc]:
    """The parent's step: per-token next-token loss (vocab-parallel) and its masked mean."""
    from megatron_ext.models.builder import attention_mask

    tokens = batch["tokens"]
    per_token = model(
        tokens,
        batch["position_ids"],
        attention_mask(model, tokens.shape[1], tokens.device),
        labels=batch["labels"],
    )
    return per_token, functools.partial(masked_mean_loss, batch["loss_mask"])


def masked_mean_loss(
    mask: torch.Tensor, per_token: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean of ``per_token`` over ``mask``; the metric ``loss`` is its detached value."""
    loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"loss": loss.detach().clone()}  # the schedule scales ``loss`` in place


class LMStep:
    """:class:`TrainStep` of the parent: next-token cross-entropy."""

    def forward(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, LossFunc]:
        """See :func:`lm_forward`."""
        return lm_forward(model, batch)
