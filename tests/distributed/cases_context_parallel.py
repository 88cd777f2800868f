"""Mamba context parallelism on 2 ranks (gloo, CPU): CP=2 against CP=1, in ONE torchrun launch.

Usage: ``torchrun --standalone --nproc-per-node 2 cases_context_parallel.py OUT.json``.
A Mamba-only stack (``MM``) is built from one seed twice: at CP=2 (one replica, each rank
holding half of every sequence, megatron-core's load-balanced split) and at CP=1 with DP=2
where both ranks read the same full micro-batches (so DP's average is the 1-rank gradient).
Both run the same steps through the engine; rank 0 writes per-step losses and grad norms, the
largest gradient gap after step 1 and the largest parameter gap at the end.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import json
import sys
import time
import traceback

import torch
import torch.distributed as dist

from megatron_ext.compat.engine import apply_engine_shims
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.training.engine import Engine, LMStep
from megatron_ext.training.engine_config import EngineConfig
from tests.distributed.cases_engine import LR, MICRO, SEED, chunk

MAMBA_ONLY = HybridModelConfig(pattern="MM", position_embedding_type="none")
STEPS = 3
MASKED = 12  # loss-free leading positions: rank 0 holds 8 of them, rank 1 holds 4


def masked_chunk(index: int) -> dict[str, torch.Tensor]:
    """Micro-batch ``index`` with its first ``MASKED`` positions out of the loss, so the two
    CP ranks hold different numbers of loss tokens (a mean of their means would be wrong)."""
    batch = chunk(index)
    batch["loss_mask"][:, :MASKED] = 0.0
    return batch


def run_at(cp: int) -> dict:
    """``STEPS`` engine steps of the Mamba-only stack at ``cp`` (DP = 2 / cp, same samples)."""
    par = ParallelConfig(nproc=2, cp=cp, timeout_s=300)
    pgs = init_distributed(par)
    set_seed(SEED)
    model = build_model(MAMBA_ONLY, par, pgs)
    dp = pgs.dp.size()
    # no ZeRO-1: every rank's main_grad then holds the whole reduced gradient, to compare
    cfg = EngineConfig(
        micro_batch_size=MICRO,
        global_batch_size=2 * MICRO * dp,
        lr=LR,
        distributed_optimizer=False,
    )
    engine = Engine([model], cfg, pgs)
    steps, grads = [], {}
    for step in range(STEPS):
        # every DP rank reads the same two micro-batches: the CP=1 reference is the 1-rank run
        result = engine.step(LMStep(), [masked_chunk(2 * step), masked_chunk(2 * step + 1)], LR)
        steps.append([result.metrics["loss"], result.grad_norm])
        if step == 0:
            grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"steps": steps, "grads": grads, "params": params}


def main(out: str) -> None:
    apply_engine_shims()
    start = time.perf_counter()
    cases: dict = {}
    try:
        cp2 = run_at(2)
        ref = run_at(1)
        gaps = {n: float((cp2["grads"][n] - g).abs().max()) for n, g in ref["grads"].items()}
        cases["mamba_cp2_vs_cp1"] = {
            "cp2": cp2["steps"],
            "cp1": ref["steps"],
            "grad_gap": max(gaps.values()),
            "gaps": gaps,
            "grad_scale": max(float(g.abs().max()) for g in ref["grads"].values()),
            "param_gap": max(
                float((cp2["params"][n] - p).abs().max()) for n, p in ref["params"].items()
            ),
        }
    except Exception:
        cases["mamba_cp2_vs_cp1"] = {"error": traceback.format_exc()}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"cases": cases, "seconds": time.perf_counter() - start}, f)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
