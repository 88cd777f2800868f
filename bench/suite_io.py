"""Checkpoint benchmarks: slice write time vs a plain copy, and checkpoint sizes.

* Slice write: ``save_slice`` of the mid budget from the elastic model in memory (select,
  build, ``torch_dist`` save with fsync, manifest) against copying the files it wrote, once
  plainly and once followed by an fsync of every file (the slice write is durable, so the
  copy with fsync is the like-for-like baseline; the plain copy only reaches the page cache).
  Every timed call starts after ``os.sync()`` (untimed): without it, the dirty pages of the
  earlier repetitions throttle the later ones and the figure depends on the repetition count.
* Sizes: the elastic checkpoint (the parent-shaped weights, the router, the stripe layout)
  against the parent checkpoint, and against one separate checkpoint per budget (each
  budget's standalone slice, as training every budget on its own would leave). Weights
  only, no optimizer state, on both sides.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_ext.benchmark import Samples, interleaved
from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.router import ElasticRouter, RouterConfig
from megatron_ext.elastic.slicing import save_slice
from megatron_ext.models.config import HybridModelConfig, save_model_config


def tree_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def copy_tree(src: Path, dst: Path, fsync: bool) -> None:
    """Copy the tree ``src`` to ``dst``; with ``fsync``, flush every copied file to disk."""
    shutil.copytree(src, dst)
    if fsync:
        for f in dst.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def slice_write(
    model: torch.nn.Module,
    ctrl: ElasticController,
    widths: dict[str, int],
    work: Path,
    pgs,
    reps: int,
    device: torch.device,
) -> dict[str, Any]:
    """Median seconds of ``save_slice`` and of copying its output, interleaved."""
    work.mkdir(parents=True, exist_ok=True)
    counter = {"n": 0}
    last: dict[str, Path] = {}

    def write() -> None:
        counter["n"] += 1
        out = work / f"slice{counter['n']}"
        last["path"] = save_slice(model, widths, out, pgs, controller=ctrl)

    def copier(fsync: bool):
        def run() -> None:
            counter["n"] += 1
            copy_tree(last["path"], work / f"copy{counter['n']}", fsync)

        return run

    cases = {"write": write, "copy": copier(False), "copy_fsync": copier(True)}
    times: dict[str, Samples] = interleaved(cases, reps, device, warmup=1, before=os.sync)
    size = tree_bytes(last["path"])
    for d in list(work.iterdir()):
        shutil.rmtree(d, ignore_errors=True)
    return {
        "slice_bytes": size,
        "write": times["write"].as_dict(),
        "copy": times["copy"].as_dict(),
        "copy_fsync": times["copy_fsync"].as_dict(),
        "copy_fsync_mb_per_s": size / times["copy_fsync"].median / 1e6,
        "over_copy": times["write"].median / times["copy"].median,
        "over_copy_fsync": times["write"].median / times["copy_fsync"].median,
    }


def checkpoint_sizes(
    parent: torch.nn.Module,
    cfg: HybridModelConfig,
    elastic: ElasticConfig,
    work: Path,
    pgs,
) -> dict[str, Any]:
    """Bytes of the parent, the elastic and the per-budget checkpoints (weights only).

    ``parent`` (a plain model at TP=1) is converted to elastic in place on the way.
    """
    parent_dir = work / "parent"
    CheckpointManager(parent_dir, pgs, keep=1).save(0, parent, None, {})
    save_model_config(cfg, parent_dir)
    stripes = StripeLayout()
    ctrl = ElasticController(cfg, stripes)
    router = ElasticRouter(elastic, RouterConfig(hidden=elastic.router_hidden))
    elastic_dir = work / "elastic"
    convert_to_elastic(parent, ctrl)
    extra = {"router": router.state_dict()}
    CheckpointManager(elastic_dir, pgs, keep=1).save(0, parent, None, extra)
    stripes.save(elastic_dir)
    save_model_config(cfg, elastic_dir)
    separate = {}
    for budget in elastic.budgets:
        out = work / f"separate_{budget.name}"
        save_slice(parent, elastic.widths_for(budget.name, cfg), out, pgs)
        separate[budget.name] = tree_bytes(out)
    parent_bytes, elastic_bytes = tree_bytes(parent_dir), tree_bytes(elastic_dir)
    total = sum(separate.values())
    return {
        "parent_bytes": parent_bytes,
        "elastic_bytes": elastic_bytes,
        "separate_bytes": separate,
        "separate_total_bytes": total,
        "elastic_over_parent": elastic_bytes / parent_bytes,
        "elastic_over_separate": elastic_bytes / total,
    }
