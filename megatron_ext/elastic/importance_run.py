"""Rank a trained parent and write its importance-ordered run directory.

One call does what the ``importance`` recipe (and ``train-elastic`` given only ``parent.dir``)
needs: score every elastic axis on calibration batches at the configured TP/EP layout, rank the
layers for the ``depth`` axis, turn the width scores into striped permutations, apply them to the
unsharded (TP=1, EP=1) parent, and save ``scores.pt``, ``permutations.json``, ``summary.json``,
``model_config.json`` and ``checkpoints/{iter_0000000, elastic_layout.json}`` (the layout file is
also copied into ``iter_0000000``, outside its manifest, for readers given that directory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from megatron_ext.checkpoint import CheckpointError, CheckpointManager
from megatron_ext.data.config import DataConfig
from megatron_ext.elastic.depth import layer_order, layer_removal_scores
from megatron_ext.elastic.importance import ImportanceConfig, ImportanceResult, compute_importance
from megatron_ext.elastic.reorder import compute_permutations, layout_record, permutations_to_json
from megatron_ext.elastic.reorder_run import reorder_checked, unsharded
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import ConfigError, HybridModelConfig, save_model_config
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed
from megatron_ext.run_format import (
    ELASTIC_LAYOUT,
    PERMUTATIONS,
    SCORES,
    checkpoints_dir,
    save_torch,
    write_elastic_layout,
    write_json,
    write_summary,
)
from megatron_ext.runtime import is_main, main_print, prepare_run_dir
from megatron_ext.training.data import held_out_batches, train_batches


@dataclass
class RankedParent:
    """What :func:`rank_parent` wrote, and the figures a caller prints."""

    run_dir: Path
    summary: dict[str, Any]
    result: ImportanceResult
    depth_scores: dict[int, float]
    order: tuple[int, ...]
    source: Path  # the parent checkpoint that was scored
    saved: Path  # the reordered checkpoint
    reorder_diff: float  # largest |logit change| the reorder caused (should be ~0)


def _calibration(data_cfg: DataConfig, imp: ImportanceConfig, pgs, seed: int, vocab: int):
    """(calibration batches, one held-out batch for the reorder check)."""
    shape = dict(seq_length=imp.seq_length, micro_batch_size=imp.micro_batch_size)
    batches, meta = train_batches(data_cfg, pgs, steps=imp.calib_batches, seed=seed, **shape)
    check = held_out_batches(data_cfg, pgs, count=1, seed=seed, **shape)
    if meta["vocab_size"] > vocab:
        raise ConfigError(
            f"data: the tokenizer's {meta['vocab_size']} ids exceed the parent's "
            f"model.vocab_size={vocab}"
        )
    return [next(batches) for _ in range(imp.calib_batches)], check[0]


def rank_parent(
    cfg: DictConfig,
    parent_dir: Path,
    model_cfg: HybridModelConfig,
    imp: ImportanceConfig,
    parallel: ParallelConfig,
    data_cfg: DataConfig,
    *,
    run_dir: str,
    seed: int,
    backend: str = "auto",
) -> RankedParent:
    """Score, rank, reorder and save ``parent_dir``'s latest checkpoint into ``run_dir``.

    ``cfg`` is saved there as ``config.yaml``. Initialises torch.distributed for ``parallel``
    (and again at TP = EP = 1 for the reorder); the caller destroys it when done.
    """
    imp.check_model(model_cfg)
    pgs = init_distributed(parallel)
    out_dir = prepare_run_dir(cfg, run_dir)
    scored_at = {"nproc": parallel.nproc, "tp": parallel.tp, "ep": parallel.ep}
    calibration, check = _calibration(data_cfg, imp, pgs, seed, model_cfg.vocab_size)
    set_seed(seed)
    model = build_model(model_cfg, parallel, pgs, backend=backend)
    parent_root = checkpoints_dir(parent_dir)
    source = CheckpointManager(parent_root, pgs).latest_valid()
    if source is None:
        raise CheckpointError(f"parent.dir: no valid checkpoint under {parent_root}")
    CheckpointManager(parent_root, pgs).load(source, model, weights_only=True)
    main_print(f"scoring {source} on {imp.calib_batches} batches per data-parallel rank")
    result = compute_importance(model, calibration, pgs, progress=True)
    depth_scores: dict[int, float] = {}
    order: tuple[int, ...] = ()
    if imp.depth_batches:
        depth_scores = layer_removal_scores(
            model, calibration[: imp.depth_batches], pgs, progress=True
        )
        order = layer_order(depth_scores, model_cfg.pattern)
    perms = compute_permutations(
        result.scores, model_cfg, stripe_tp=imp.stripe_tp, stripe_ep=imp.stripe_ep
    )

    model, parallel, pgs = unsharded(model, model_cfg, parallel, pgs, parent_root, source, backend)
    diff = reorder_checked(model, perms, check)
    saved = CheckpointManager(checkpoints_dir(out_dir), pgs).save(
        0, model, None, {"parent_checkpoint": str(source), "importance": True}
    )
    record = layout_record(
        perms, imp.stripe_tp, imp.stripe_ep, parent_checkpoint=str(source), checkpoint=str(saved)
    )
    depth = {str(j): s for j, s in sorted(depth_scores.items())}
    if order:
        record["layer_order"] = list(order)
        record["depth_scores"] = depth
    summary = {
        "model": model_cfg.name,
        "parent": str(parent_dir),
        "parent_checkpoint": str(source),
        "checkpoint": str(saved),
        "elastic_layout": str(checkpoints_dir(out_dir) / ELASTIC_LAYOUT),
        "calib_batches": result.batches,
        "tokens": result.tokens,
        "seq_length": imp.seq_length,
        "micro_batch_size": imp.micro_batch_size,
        "stripe": {"tp": imp.stripe_tp, "ep": imp.stripe_ep},
        "scored_at": scored_at,
        "reorder_logits_max_abs_diff": float(diff),
        "importance": result.summary(),
        "depth": {"batches": imp.depth_batches, "scores": depth, "layer_order": list(order)},
    }
    if is_main():
        save_model_config(model_cfg, out_dir)
        write_elastic_layout(checkpoints_dir(out_dir), record)  # beside the checkpoint
        write_elastic_layout(saved, record)  # and in it (not in its manifest)
        save_torch(out_dir / SCORES, {a: dict(layers) for a, layers in result.scores.items()})
        write_json(
            out_dir / PERMUTATIONS,
            {"tp": imp.stripe_tp, "ep": imp.stripe_ep, "axes": permutations_to_json(perms)},
            sort_keys=True,
        )
        write_summary(out_dir, summary)
    return RankedParent(out_dir, summary, result, depth_scores, order, source, saved, float(diff))
