"""Every rank picks the same budget and widths at every step, at TP=2 and EP=2 (one launch).

Usage: ``torchrun --standalone --nproc-per-node 2 cases_budget_agreement.py OUT.json``.
Rank 0 writes ``{"cases": {"tp2": {...}, "ep2": {...}}, "seconds": ...}``.

Per layout, each rank builds the router from ``RouterConfig.seed`` after seeding its GLOBAL RNG
differently (rank-dependent), then for 200 steps of the tiny curriculum (crossing the stage
boundary at step 150) draws ``sample_budget`` and runs the router with the step-seeded
generator, in homogeneous and heterogeneous mode, and takes one Adam step on a toy router loss
(the routers evolve, identically, with no communication). The per-step budget and widths are
all-gathered and compared.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.curriculum import CurriculumConfig, sample_budget, step_generator
from megatron_ext.elastic.router import ElasticRouter, RouterConfig, layer_counts
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed

CONF = Path(__file__).resolve().parents[2] / "conf"
STEPS = 200
MODES = ("homogeneous", "heterogeneous")


def load(path: Path, schema: type):
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))


def flat(widths: dict) -> list[int]:
    out: list[int] = []
    for w in widths.values():
        out += w if isinstance(w, list) else [w]
    return out


def run_layout(tp: int, ep: int) -> dict:
    """Per-step (budget, widths) on this rank, gathered from all ranks and compared."""
    pgs = init_distributed(ParallelConfig(nproc=2, tp=tp, ep=ep, timeout_s=300))
    rank = dist.get_rank()
    elastic = load(CONF / "elastic" / "tiny.yaml", ElasticConfig)
    curriculum = load(CONF / "curriculum" / "tiny.yaml", CurriculumConfig)
    stages = curriculum.resolve(global_batch=8, num_budgets=len(elastic.budgets))
    layers = layer_counts(elastic, HybridModelConfig())
    full = {a: c[0] for a, c in elastic.axes.items()}
    result: dict = {"tp": pgs.tp.size(), "ep": pgs.ep.size(), "stages_seen": []}
    for mode in MODES:
        torch.manual_seed(1000 + rank)  # a rank-dependent global RNG must not matter
        router = ElasticRouter(elastic, RouterConfig(mode=mode, anneal_steps=STEPS), layers)
        opt = torch.optim.Adam(router.parameters(), lr=router.cfg.lr)
        rows = []
        for step in range(STEPS):
            stage, _ = curriculum.stage_at(step)
            b = sample_budget(stages[stage].budget_probs, curriculum.seed, stage, step)
            budget = elastic.budgets[b]
            gen = step_generator(curriculum.seed, stage, step)
            out = router(budget.name, step, generator=gen)
            fracs = [(w / full[a]).mean() for a, w in out.expected_widths().items()]
            loss = (torch.stack(fracs).mean() - budget.target).abs() / budget.target
            opt.zero_grad()
            loss.backward()
            opt.step()
            rows.append([stage, b, *flat(out.widths())])
            if mode == MODES[0] and stage not in result["stages_seen"]:
                result["stages_seen"].append(stage)
        mine = torch.tensor(rows, dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        result[mode] = {
            "steps": len(rows),
            "disagreeing_steps": int((gathered[0] != gathered[1]).any(dim=1).sum()),
            "budget_counts": torch.bincount(mine[:, 1], minlength=3).tolist(),
            "distinct_widths": len({tuple(r[2:]) for r in rows}),
            "columns": mine.shape[1],
        }
        params = torch.cat([p.detach().flatten() for p in router.parameters()])
        others = [torch.empty_like(params) for _ in range(dist.get_world_size())]
        dist.all_gather(others, params)
        result[mode]["router_params_max_diff"] = (others[0] - others[1]).abs().max().item()
    return result


def main(out: Path) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results: dict = {}
    for name, (tp, ep) in {"tp2": (2, 1), "ep2": (1, 2)}.items():
        start = time.perf_counter()
        try:
            results[name] = run_layout(tp, ep)
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
