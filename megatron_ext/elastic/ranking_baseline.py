"""Baselines for importance ranking: the same reorder driven by random scores.

A slice's held-out loss under the importance order, against the same width under a random
order of the same parent, is the measure of what importance ranking buys before any
elastic training.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_ext.checkpoint import CheckpointError, CheckpointManager
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.importance import Scores, compute_importance
from megatron_ext.elastic.reorder import apply_permutations, compute_permutations
from megatron_ext.elastic.slicing import build_slice, slice_model
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import HybridModelConfig, load_model_config
from megatron_ext.parallel import ParallelConfig
from megatron_ext.run_format import checkpoints_dir
from megatron_ext.training.loop import evaluate


def random_scores_like(scores: Scores, seed: int) -> Scores:
    """Scores of the same shapes as ``scores``, i.i.d. uniform from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return {
        axis: {layer: torch.rand(t.shape, generator=gen) for layer, t in sorted(layers.items())}
        for axis, layers in sorted(scores.items())
    }


def reorder_by(
    model: torch.nn.Module,
    scores: Scores,
    model_cfg: HybridModelConfig,
    *,
    stripe_tp: int = 1,
    stripe_ep: int = 1,
) -> None:
    """Reorder the unsharded ``model`` in place so every axis follows ``scores`` (striped)."""
    perms = compute_permutations(scores, model_cfg, stripe_tp=stripe_tp, stripe_ep=stripe_ep)
    apply_permutations(model, perms)


def compare_orders(
    parent_dir: Path,
    elastic: ElasticConfig,
    calib_batches: Iterator[dict],
    valid_batches: list[dict],
    pg_collection,
    *,
    calib_steps: int = 8,
    random_seeds: tuple[int, ...] = (0, 1, 2),
    budgets: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Held-out loss of every budget's slice of the parent under each order.

    Orders: ``importance`` (scored on ``calib_steps`` calibration batches) and
    ``random<seed>``. Returns ``{order: {budget: loss}}`` plus ``{"full": {"full": loss}}``.
    Runs at TP=1 (slicing reads unsharded weights).
    """
    model_cfg = load_model_config(parent_dir)
    ckpts = CheckpointManager(checkpoints_dir(parent_dir), pg_collection)
    source = ckpts.latest_valid()
    if source is None:
        raise CheckpointError(f"{parent_dir}: no valid checkpoint under checkpoints/")

    def parent() -> torch.nn.Module:
        model = build_model(model_cfg, ParallelConfig(), pg_collection, initialize=False)
        ckpts.load(source, model, weights_only=True)
        return model.eval()

    scores = compute_importance(
        parent(), calib_batches, pg_collection, num_batches=calib_steps
    ).scores
    orders = {"importance": scores} | {
        f"random{s}": random_scores_like(scores, s) for s in random_seeds
    }
    names = budgets or [b.name for b in elastic.budgets]
    out: dict[str, dict[str, float]] = {
        "full": {"full": evaluate(parent(), valid_batches, pg_collection)}
    }
    for order, order_scores in orders.items():
        model = parent()
        reorder_by(model, order_scores, model_cfg)
        controller = ElasticController(model_cfg, stripes=StripeLayout())
        out[order] = {}
        for name in names:
            cfg, state = slice_model(model, elastic.widths_for(name, model_cfg), controller)
            small = build_slice(cfg, state, pg_collection=pg_collection).eval()
            out[order][name] = evaluate(small, valid_batches, pg_collection)
    return out
