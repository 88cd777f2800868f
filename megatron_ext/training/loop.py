"""The training loop of the parent: :class:`~megatron_ext.training.engine.Engine` steps with
the next-token loss, evaluation, checkpoints and preemption."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_ext.models.builder import causal_mask
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.engine import Engine, LMStep, TrainStep
from megatron_ext.training.metrics import IntervalMetrics, progress_bar
from megatron_ext.training.optim import lr_at
from megatron_ext.training.pipeline import lm_forward_step, metrics_on_every_stage
from megatron_ext.training.preemption import PreemptionHandler, save_or_stop
from megatron_ext.training.state import loop_state, restore_loop_state

Batch = dict[str, torch.Tensor]


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the loss mask (vocab-parallel under TP)."""
    tokens = batch["tokens"]
    per_token = model(
        tokens,
        batch["position_ids"],
        causal_mask(tokens.shape[1], tokens.device),
        labels=batch["labels"],
    )
    mask = batch["loss_mask"]
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


def _dp_mean(values: list[float], pg_collection) -> list[float]:
    """Each of ``values`` averaged over the data-parallel ranks (one all-reduce)."""
    group = pg_collection.dp
    if group is None or dist.get_world_size(group) == 1 or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return [v / dist.get_world_size(group) for v in t.tolist()]


def _pp_group(pg_collection) -> Any:
    group = getattr(pg_collection, "pp", None)
    return group if group is not None and dist.is_initialized() and group.size() > 1 else None


def _staged_losses(model: torch.nn.Module, batches: list[Batch], pg_collection) -> list[float]:
    """Per-batch losses of a pipeline stage's ``model``: forward-only through the schedule,
    broadcast from the last stage (which computes them) to every stage."""
    seq = int(batches[0]["tokens"].shape[1])
    out = metrics_on_every_stage(model, batches, lm_forward_step, pg_collection, seq_length=seq)
    return [o["loss"] for o in out]


@torch.no_grad()
def batch_losses(model: torch.nn.Module, batches: list[Batch], pg_collection) -> list[float]:
    """Held-out loss of each of ``batches``, averaged over data-parallel ranks.

    Under pipeline parallelism ``model`` is this rank's stage; the batches go through
    megatron's schedule (forward only) and every stage returns the same values.
    """
    was_training = model.training
    model.eval()
    if batches and _pp_group(pg_collection) is not None:
        losses = _staged_losses(model, batches, pg_collection)
    else:
        losses = [float(lm_loss(model, b)) for b in batches]
    model.train(was_training)
    return _dp_mean(losses, pg_collection)


def mean_loss(losses: list[float]) -> float:
    """The mean of per-batch ``losses`` (0.0 without batches)."""
    return sum(losses) / max(1, len(losses))


def evaluate(model: torch.nn.Module, batches: list[Batch], pg_collection) -> float:
    """Held-out loss: the mean of :func:`batch_losses` (0.0 without batches)."""
    return mean_loss(batch_losses(model, batches, pg_collection))


@dataclass
class History:
    """Per-step and per-eval metrics of one run, kept across resumes."""

    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0


@dataclass
class TrainResult:
    """What :func:`train` returns: the history and the final figures."""

    history: History
    steps: int
    final_train_loss: float
    val_loss: float
    tokens_per_s: float


def train(
    engine: Engine,
    batches: Iterator[Batch],
    valid_batches: list[Batch],
    cfg: TrainConfig,
    pg_collection,
    *,
    checkpoint: Callable[[int, dict[str, Any]], object] | None = None,
    resume_state: dict[str, Any] | None = None,
    step_fn: TrainStep | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    preemption: PreemptionHandler | None = None,
) -> TrainResult:
    """Run optimizer steps up to ``cfg.steps`` (or ``cfg.stop_at``), evaluating and checkpointing.

    Each step takes ``engine.num_microbatches`` micro-batches from ``batches`` (this rank's
    part of the global batch) and runs ``step_fn`` (default: the next-token loss) on them.

    ``batches`` must support ``state_dict()``/``load_state_dict()``; ``checkpoint(step, extra)``
    is called every ``cfg.save_interval`` steps and at the end with everything a bit-identical
    resume needs (step, RNG, data position, history). ``resume_state`` is such an ``extra``.
    With ``preemption``, a signal on any rank (agreed after every step) saves a checkpoint
    and raises :class:`Preempted` with the step count reached (unless that is the last step).
    """
    start, history = restore_loop_state(resume_state, batches, History())
    end = cfg.stop_at or cfg.steps
    is_main = dist.get_rank() == 0 if dist.is_initialized() else True
    bar = progress_bar(total=end, initial=start, desc="train", disable=not (progress and is_main))
    interval = IntervalMetrics()

    def extra(step: int) -> dict[str, Any]:
        return loop_state(step, batches, history)

    step_fn = step_fn or LMStep()
    engine.train()
    for step in range(start, end):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(engine.num_microbatches)]
        result = engine.step(step_fn, micro, lr_at(step, cfg))
        grad_norm = result.grad_norm
        history.train_seconds += time.perf_counter() - t0
        tokens = sum(int(b["tokens"].numel()) for b in micro)
        history.tokens += tokens * _dp_size(pg_collection)
        loss_value = result.metrics["loss"]
        history.train.append((step + 1, loss_value))
        bar.update(1)
        metrics = {"loss": loss_value, "lr": lr_at(step, cfg), "grad_norm": grad_norm}
        interval.add(
            metrics,
            tokens=tokens * _dp_size(pg_collection),
            seconds=time.perf_counter() - t0,
        )
        val_metrics: dict[str, float] = {}
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == end:
            val = engine.evaluate(step_fn, valid_batches)["loss"]
            history.val.append((step + 1, val))
            val_metrics["val_loss"] = val
        bar.set_postfix(
            loss=f"{loss_value:.3f}",
            val=f"{history.val[-1][1]:.3f}" if history.val else "-",
            refresh=False,
        )
        if log is not None and ((step + 1) % cfg.log_interval == 0 or val_metrics):
            log(step + 1, {**interval.flush(), **val_metrics})  # means over the interval
        save_or_stop(step + 1, end, cfg.save_interval, checkpoint, extra, preemption, bar)
    bar.close()
    final_train = history.train[-1][1] if history.train else float("nan")
    val_loss = (
        history.val[-1][1] if history.val else engine.evaluate(step_fn, valid_batches)["loss"]
    )
    tps = history.tokens / history.train_seconds if history.train_seconds else 0.0
    return TrainResult(history, end, final_train, val_loss, tps)


def _dp_size(pg_collection) -> int:
    group = pg_collection.dp
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)
