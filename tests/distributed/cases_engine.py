"""The training engine on 2 ranks (gloo, CPU): DP=2 with the distributed optimizer, bit-identical
resume at TP=2 / EP=2 / DP=2, replicas that stay identical, in ONE torchrun launch.

Usage: ``torchrun --standalone --nproc-per-node 2 cases_engine.py OUT.json``. Rank 0 writes
``{"cases": {name: {...} | {"error": traceback}}}``; the 1-rank references are computed by the
test itself (``test_engine_parallel.py``) with the helpers of this file.

Data: fixed micro-batches of real text (this Python's ``os.py`` bytes). Step ``i`` of a run
with ``n`` micro-batches per rank at data-parallel size ``D`` gives rank ``r`` the chunks
``(i*n + k)*D + r``, exactly how :class:`~megatron_ext.data.loader.BatchIterator` splits a
global batch, so a DP=1 run with ``n*D`` micro-batches sees the same samples per step.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.compat.engine import apply_engine_shims
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.training.engine import Engine, LMStep
from megatron_ext.training.engine_config import EngineConfig

NPROC = 2
SEQ, MICRO = 32, 2
SEED = 2024
LR = 2e-3
MODEL = HybridModelConfig()  # the tiny hybrid: Mamba, attention, MoE (8 experts), MLP


def chunk(index: int) -> dict[str, torch.Tensor]:
    """Micro-batch ``index`` of real text bytes, as byte-level tokens."""
    raw = Path(os.__file__).read_bytes()
    start = 2048 + index * MICRO * (SEQ + 1)
    data = torch.tensor(list(raw[start : start + MICRO * (SEQ + 1)])).view(MICRO, SEQ + 1)
    return {
        "tokens": data[:, :-1].contiguous(),
        "labels": data[:, 1:].contiguous(),
        "loss_mask": torch.ones(MICRO, SEQ),
        "position_ids": torch.arange(SEQ)[None].expand(MICRO, SEQ),
    }


def microbatches(step: int, n: int, dp: int, dp_rank: int) -> list[dict[str, torch.Tensor]]:
    """Rank ``dp_rank``'s ``n`` micro-batches of step ``step`` at data-parallel size ``dp``."""
    return [chunk((step * n + k) * dp + dp_rank) for k in range(n)]


def layout(tp: int = 1, ep: int = 1, nproc: int = NPROC):
    """Initialise the groups of a layout; returns (ParallelConfig, process groups)."""
    par = ParallelConfig(nproc=nproc, tp=tp, ep=ep, timeout_s=300)
    return par, init_distributed(par)


def engine_at(par, pgs, *, global_batch: int, **settings) -> Engine:
    """The tiny parent built from ``SEED`` under megatron-core's engine."""
    set_seed(SEED)
    model = build_model(MODEL, par, pgs)
    cfg = EngineConfig(
        micro_batch_size=MICRO, global_batch_size=global_batch, lr=LR, weight_decay=0.1, **settings
    )
    return Engine([model], cfg, pgs, seq_length=SEQ)


def run_steps(engine: Engine, pgs, first: int, count: int) -> list[list[float]]:
    """``count`` steps from step ``first``: per step [loss, grad norm]."""
    dp = pgs.dp.size()
    rank = pgs.dp.rank()
    out = []
    for step in range(first, first + count):
        batches = microbatches(step, engine.num_microbatches, dp, rank)
        result = engine.step(LMStep(), batches, LR)
        out.append([result.metrics["loss"], result.grad_norm])
    return out


def replica_gaps(model: torch.nn.Module, pgs, extra: torch.nn.Module | None = None) -> dict:
    """Max |this rank - another| per parameter over every group that must hold it identically.

    Dense parameters: the data-parallel group; routed experts (``allreduce=False``): the
    expert-data-parallel group; parameters not split over TP (``tensor_model_parallel``
    unset: norms, the MoE router, SSM vectors that are replicated): also the TP group.
    ``extra`` (the elastic budget router) must be identical on every rank.
    """
    from megatron.core.utils import unwrap_model

    gaps: dict[str, float] = {}

    def check(name: str, tensor: torch.Tensor, group) -> None:
        if group is None or dist.get_world_size(group) == 1:
            return
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.detach().contiguous(), group=group)
        gap = max(float((p - tensor).abs().max()) for p in parts)
        gaps[name] = max(gaps.get(name, 0.0), gap)

    for name, p in unwrap_model(model).named_parameters():
        expert = not getattr(p, "allreduce", True)
        check(name, p, pgs.expt_dp if expert else pgs.dp)
        if not getattr(p, "tensor_model_parallel", False):
            check(name, p, pgs.expt_tp if expert else pgs.tp)
    if extra is not None:
        for name, p in extra.named_parameters():
            check(f"router.{name}", p, dist.group.WORLD)
    return gaps


def fresh_dir(path: Path) -> Path:
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    return path


def params_of(engine: Engine) -> dict[str, torch.Tensor]:
    from megatron.core.utils import unwrap_model

    return {n: p.detach().clone() for n, p in unwrap_model(engine.model).named_parameters()}


def dp2_distributed_optimizer(work: Path) -> dict:
    """DP=2 with ZeRO-1, 5 steps of 2 micro-batches per rank; then a checkpoint and 2 more.

    Also reports the optimizer-state bytes per rank and the same at DP=1 layout size (the
    test compares them with the 1-rank run).
    """
    par, pgs = layout()
    engine = engine_at(par, pgs, global_batch=4 * MICRO)
    steps = run_steps(engine, pgs, 0, 5)
    ckpts = CheckpointManager(fresh_dir(work / "dp2_ckpt"), pgs)
    ckpts.save(5, engine.model, engine.optimizer, {"step": 5})
    after = run_steps(engine, pgs, 5, 2)
    return {
        "steps": steps,
        "after_save": after,
        "optimizer_state_bytes": engine.optimizer_state_bytes(),
        "checkpoint": str(ckpts.path_for(5)),
        "replica_gaps": replica_gaps(engine.model, pgs),
    }


def resume_at(work: Path, tp: int, ep: int, settings: dict) -> dict:
    """6 steps in one go vs 3 steps, save, a fresh engine loading it, 3 more: every loss, grad
    norm and final parameter compared (0.0 = bit-identical)."""
    par, pgs = layout(tp=tp, ep=ep)
    gb = 2 * MICRO * pgs.dp.size()
    whole = engine_at(par, pgs, global_batch=gb, **settings)
    whole_steps = run_steps(whole, pgs, 0, 6)
    whole_params = params_of(whole)
    gaps = replica_gaps(whole.model, pgs)
    del whole
    first = engine_at(par, pgs, global_batch=gb, **settings)
    run_steps(first, pgs, 0, 3)
    ckpts = CheckpointManager(fresh_dir(work / f"resume_tp{tp}_ep{ep}"), pgs)
    ckpts.save(3, first.model, first.optimizer, {"step": 3})
    del first
    resumed = engine_at(par, pgs, global_batch=gb, **settings)
    extra = ckpts.load(ckpts.latest_valid(), resumed.model, resumed.optimizer)
    resumed_steps = run_steps(resumed, pgs, 3, 3)
    got = params_of(resumed)
    param_gap = max(float((got[n] - whole_params[n]).abs().max()) for n in got)
    diffs = [
        max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a, b in zip(whole_steps[3:], resumed_steps)
    ]
    return {
        "loaded_step": extra.get("step"),
        "step_gap": max(diffs),
        "param_gap": param_gap,
        "whole": whole_steps,
        "resumed": resumed_steps,
        "replica_gaps": gaps,
    }


def worst_over_ranks(result: dict) -> dict:
    """Every rank's gaps merged by their maximum (rank 0 reports)."""
    boxes: list = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, result)
    merged = dict(result)
    for key in ("step_gap", "param_gap"):
        if key in result:
            merged[key] = max(b[key] for b in boxes)
    if "replica_gaps" in result:
        merged["replica_gaps"] = {
            n: max(b["replica_gaps"].get(n, 0.0) for b in boxes) for n in result["replica_gaps"]
        }
    return merged


def main(out: Path) -> None:
    apply_engine_shims()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    layout()
    work = fresh_dir(out.parent / "engine_work")
    results: dict = {}
    cases = {
        "dp2_distributed_optimizer": lambda: dp2_distributed_optimizer(work),
        "resume_tp2": lambda: resume_at(work, 2, 1, {}),
        "resume_ep2": lambda: resume_at(work, 1, 2, {}),
        "resume_dp2": lambda: resume_at(work, 1, 1, {}),
        "resume_dp2_bf16": lambda: resume_at(work, 1, 1, {"precision": "bf16"}),
    }
    from cases_engine_elastic import elastic_cases  # beside this script

    cases.update(elastic_cases(work))
    for name, run in cases.items():
        start = time.perf_counter()
        try:
            results[name] = worst_over_ranks(run())
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    if dist.get_rank() == 0:
        payload = {"cases": results, "seconds": round(time.perf_counter() - t0, 2)}
        out.write_text(json.dumps(payload, indent=1))
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
