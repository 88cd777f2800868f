"""Reorder a parent's weights on the unsharded layout and check that its function is unchanged.

The permutations apply to the TP=1, EP=1 model (:func:`.reorder.apply_permutations`), so a
parent scored at another layout is first rebuilt unsharded (data parallel over every rank)
and loaded from its checkpoint (:func:`unsharded`). :func:`reorder_checked` applies them and
returns the largest change of the logits on a held-out batch over every rank: rounding only,
where a wrong permutation changes them by order one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.elastic.reorder import Perms, apply_permutations
from megatron_ext.models.builder import build_model, causal_mask
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, init_distributed


def unsharded(
    model: torch.nn.Module,
    model_cfg: HybridModelConfig,
    parallel: ParallelConfig,
    pg_collection,
    checkpoint_root: Path,
    checkpoint: Path,
    backend: str = "auto",
):
    """``(model, parallel, pg_collection)`` at TP = EP = 1: as given when already unsharded,
    else rebuilt with data parallelism over the same ranks and loaded from ``checkpoint``."""
    if parallel.tp == 1 and parallel.ep == 1:
        return model, parallel, pg_collection
    parallel = ParallelConfig(
        nproc=parallel.nproc, backend=parallel.backend, timeout_s=parallel.timeout_s
    )
    pg_collection = init_distributed(parallel)
    model = build_model(model_cfg, parallel, pg_collection, backend=backend)
    CheckpointManager(checkpoint_root, pg_collection).load(checkpoint, model, weights_only=True)
    return model, parallel, pg_collection


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["tokens"]
    with torch.no_grad():
        return model(ids, batch["position_ids"], causal_mask(ids.shape[1])).float()


def reorder_checked(model: torch.nn.Module, perms: Perms, batch: dict[str, torch.Tensor]) -> float:
    """Apply ``perms`` to the unsharded ``model`` in place (eval mode); the largest absolute
    change of its logits on ``batch``, the maximum over every rank."""
    model.eval()
    reference = _logits(model, batch)
    apply_permutations(model, perms)
    diff = torch.tensor([float((_logits(model, batch) - reference).abs().max())])
    if dist.is_initialized():
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)
