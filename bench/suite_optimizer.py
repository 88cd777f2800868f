"""Optimizer-state bytes per rank of the engine's distributed optimizer, printed as JSON.

Usage: python bench/suite_optimizer.py --hidden H --batch B --seq S (1 rank), or under
``torchrun --nproc-per-node 2`` (DP=2). After one engine step on the benchmark model, every
rank counts the bytes of its optimizer state (Adam moments, fp32 main parameters where they
are separate); rank 0 prints ``{"dp": D, "bytes_per_rank": [...]}``.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import argparse
import json
import os
import warnings

import torch
import torch.distributed as dist
from suite_models import Workload, bench_model
from suite_train import LR, build, engine_config

from megatron_ext.compat.engine import apply_engine_shims
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed
from megatron_ext.training.engine import Engine, LMStep


def state_bytes(hidden: int, batch: int, seq: int) -> dict:
    """This world's DP size and every rank's optimizer-state bytes after one step."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    par = ParallelConfig(nproc=world)
    pgs = init_distributed(par)
    cfg = bench_model(hidden, "float32")
    data = Workload(batch, seq).make(cfg.vocab_size, torch.device("cpu"))
    engine = Engine([build(cfg, pgs, torch.device("cpu"))], engine_config(cfg, data), pgs)
    engine.train()
    engine.step(LMStep(), [data], LR)
    mine = engine.optimizer_state_bytes()
    every = [mine] * world
    if world > 1:
        box: list = [None] * world
        dist.all_gather_object(box, mine)
        every = box
    destroy_distributed()
    return {"dp": world, "bytes_per_rank": every}


def main() -> None:
    """Parse the arguments, measure, print one JSON line on rank 0."""
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    args = p.parse_args()
    apply_engine_shims()
    torch.set_num_threads(1)
    out = state_bytes(args.hidden, args.batch, args.seq)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
