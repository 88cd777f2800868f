"""The qad recipe in every 2-rank layout (TP=2, EP=2, PP=2, DP=2), one torchrun launch.

``python -m torch.distributed.run --nproc-per-node 2 cases_qad_parallel.py <out.json>``; the
inputs (source run, overrides) are read from ``inputs.json`` beside ``out.json``. Each layout
runs ``recipes.qad.run`` in these processes, as ``star-elastic qad parallel=<layout>`` does
on its ranks, into ``<out dir>/<layout>``; the process groups are rebuilt for the next
layout. After each run, what the ranks must hold identically is compared across them: every
parameter (``replica_gaps``) and every quantizer's input scale. Then the run is repeated
from a copy of one of its earlier checkpoints (``<layout>_resumed``), which the test compares
with the uninterrupted run.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.compat.engine import apply_engine_shims
from megatron_ext.config.compose import compose_recipe
from megatron_ext.parallel import destroy_distributed
from megatron_ext.quant.convert import quant_record
from megatron_ext.quant.parallel import is_routed_expert
from tests.distributed.cases_engine import replica_gaps, worst_over_ranks

LAYOUTS = ("tp2", "ep2", "pp2", "dp2")


def scale_gaps(model: torch.nn.Module, pgs) -> dict[str, float]:
    """Max |this rank - another| of every quantized linear's input scale over the ranks that
    hold that linear: its TP group and its (expert-)data-parallel group."""
    gaps: dict[str, float] = {}
    for name, m in quant_record(model).modules.items():
        expert = is_routed_expert(name)
        for group in (pgs.expt_tp, pgs.expt_dp) if expert else (pgs.tp, pgs.dp):
            if dist.get_world_size(group) == 1:
                continue
            mine = m.quant_input_scale.detach().reshape(1)
            parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, mine, group=group)
            gap = max(float((p - mine).abs().max()) for p in parts)
            gaps[name] = max(gaps.get(name, 0.0), gap)
    return gaps


def reductions(model: torch.nn.Module, pgs) -> dict[str, Any]:
    """The scale reductions on disagreeing ranks: (a) one DP replica's input scale of a dense
    linear doubled, then :func:`agree_over_replicas`: every replica holds the larger; (b) on
    EP rank 0 every expert of one linear unseen (NaN), then :func:`fill_unseen_experts`: they
    take the largest scale of that linear's experts on the other EP rank. Restored after."""
    from megatron_ext.quant.parallel import agree_over_replicas
    from megatron_ext.quant.ptq import fill_unseen_experts

    modules = quant_record(model).modules
    saved = {n: m.quant_input_scale.clone() for n, m in modules.items()}
    out: dict[str, Any] = {}
    dense = next(n for n in sorted(modules) if not is_routed_expert(n))
    if dist.get_world_size(pgs.dp) > 1:
        if pgs.dp.rank() == 1:
            modules[dense].quant_input_scale.mul_(2.0)
        agree_over_replicas(modules, pgs)
        out["dp_max"] = [float(modules[dense].quant_input_scale), 2.0 * float(saved[dense])]
    experts = sorted(n for n in modules if is_routed_expert(n) and n.endswith("linear_fc1"))
    if experts and dist.get_world_size(pgs.ep) > 1:
        layer = experts[0].split(".local_experts.")[0]
        siblings = [n for n in experts if n.startswith(layer + ".")]
        local_max = max(float(saved[n]) for n in siblings)
        others: list = [None] * dist.get_world_size(pgs.ep)
        dist.all_gather_object(others, local_max, group=pgs.ep)
        if pgs.ep.rank() == 0:
            for n in siblings:
                modules[n].quant_input_scale.fill_(float("nan"))
        filled = fill_unseen_experts(model, pgs)
        out["ep_fill"] = {
            "filled": len(filled),
            "got": [float(modules[n].quant_input_scale) for n in siblings],
            "other_ranks_max": max(others[1:]) if pgs.ep.rank() == 0 else None,
        }
    for n, m in modules.items():
        m.quant_input_scale.copy_(saved[n])
    return out


def run_layout(layout: str, out_dir: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    """``recipes.qad.run`` at ``parallel=<layout>`` into ``<layout>``, every checkpoint kept;
    the cross-rank comparisons; then the same run resumed from a copy of its checkpoint of
    step ``inputs["resume_at"]`` alone, into ``<layout>_resumed``."""
    from recipes import qad

    engines: list = []

    class Recorded(qad.Engine):  # the recipe's engine, kept for the comparisons
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            engines.append(self)

    class KeepAll(CheckpointManager):  # the resume below starts from an earlier checkpoint
        def __init__(self, root: Path, pgs: Any, keep: int = 1) -> None:
            super().__init__(root, pgs, keep=1000)

    qad.Engine, qad.CheckpointManager = Recorded, KeepAll  # type: ignore[misc]
    qad.destroy_distributed = lambda: None  # the next layout reuses the world
    whole, resumed = out_dir / layout, out_dir / f"{layout}_resumed"
    common = [f"parallel={layout}", *inputs["overrides"]]
    summary = qad.run(compose_recipe("qad", [f"run.dir={whole}", *common]))
    engine = engines[-1]
    student = engine.model.module
    result = {
        "steps": summary["qad"]["steps"],
        "replica_gaps": replica_gaps(engine.model, engine.pgs),
        "scale_gaps": scale_gaps(student, engine.pgs),
        "reductions": reductions(student, engine.pgs),
    }
    name = f"iter_{inputs['resume_at']:07d}"
    if dist.get_rank() == 0:
        shutil.rmtree(resumed, ignore_errors=True)
        shutil.copytree(whole / "checkpoints" / name, resumed / "checkpoints" / name)
    dist.barrier()
    qad.run(compose_recipe("qad", [f"run.dir={resumed}", *common]))
    return result


def main(out: Path) -> None:
    apply_engine_shims()
    inputs = json.loads((out.parent / "inputs.json").read_text())
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for layout in LAYOUTS:
        start = time.perf_counter()
        try:
            result = run_layout(layout, out.parent, inputs)
            merged = worst_over_ranks(result)
            merged["scale_gaps"] = _worst(result["scale_gaps"])
            results[layout] = merged
        except Exception:
            results[layout] = {"error": traceback.format_exc()}
        results[layout]["seconds"] = round(time.perf_counter() - start, 2)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"cases": results, "seconds": time.perf_counter() - t0}))
    dist.barrier()
    destroy_distributed()


def _worst(gaps: dict[str, float]) -> dict[str, float]:
    """Every rank's gaps (ranks may hold different linears) merged by their maximum."""
    boxes: list = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, gaps)
    merged: dict[str, float] = {}
    for box in boxes:
        for name, gap in box.items():
            merged[name] = max(merged.get(name, 0.0), gap)
    return merged


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
