"""Importance scores at TP=1, TP=2 and EP=2 from the same weights and tokens, ONE launch.

Usage: ``torchrun --standalone --nproc-per-node 2 cases_importance.py OUT.json``. Rank 0
writes ``{"cases": {name: {...} | {"error": traceback}}, "seconds": s}``.

The weights are built once at TP=1, saved with megatron-core's dist_checkpointing and loaded
into every layout. The calibration tokens are the same in total: four micro-batches of real
text G0..G3. With DP=2 (TP=1, or EP=2) rank r scores G_r then G_{2+r}; with TP=2 (DP=1) both
ranks score cat(G0, G1) then cat(G2, G3). Every score is a sum (REAP: a sum over a count),
so all layouts must agree up to fp32 rounding.
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

from megatron_ext.checkpoint import save_sharded
from megatron_ext.elastic.depth import layer_removal_scores
from megatron_ext.elastic.importance import compute_importance
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed

NPROC = 2
SEQ = 64
MICRO = 2
SEED = 4321
MODEL = HybridModelConfig()  # the tiny hybrid: M*ME-M*E, 8 experts, top-2


def text(i: int) -> torch.Tensor:
    """Micro-batch ``G_i`` of real text bytes (this Python's ``os.py``) as tokens."""
    raw = Path(os.__file__).read_bytes()
    start = 2048 + i * MICRO * SEQ
    return torch.tensor(list(raw[start : start + MICRO * SEQ])).view(MICRO, SEQ)


def batches(dp: int) -> list[dict[str, torch.Tensor]]:
    rank = dist.get_rank()
    if dp == NPROC:
        parts = [text(rank), text(NPROC + rank)]
    else:
        parts = [
            torch.cat([text(i) for i in range(NPROC)]),
            torch.cat([text(NPROC + i) for i in range(NPROC)]),
        ]
    return [
        {"tokens": p, "position_ids": torch.arange(SEQ)[None].expand(p.shape[0], SEQ)}
        for p in parts
    ]


def layout(tp: int = 1, ep: int = 1):
    par = ParallelConfig(nproc=NPROC, tp=tp, ep=ep, timeout_s=300)
    return par, init_distributed(par)


def fresh_dir(path: Path) -> Path:
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    return path


def plain(result) -> dict:
    out = {
        axis: {str(i): t.tolist() for i, t in sorted(layers.items())}
        for axis, layers in sorted(result.scores.items())
    }
    out["expert_tokens"] = {str(i): t.tolist() for i, t in sorted(result.expert_tokens.items())}
    out["tokens"] = result.tokens
    return out


def scores_at(weights: Path, tp: int, ep: int) -> dict:
    """Global scores at this layout (weights loaded from the TP=1 save), and rank agreement."""
    from megatron.core import dist_checkpointing

    par, pgs = layout(tp, ep)
    set_seed(SEED + 1)  # another init: the weights must come from the load
    model = build_model(MODEL, par, pgs)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(weights)))
    result = plain(compute_importance(model, batches(par.dp), pgs))
    depth = layer_removal_scores(model, batches(par.dp), pgs)  # logits vocab-parallel at TP=2
    result["depth"] = {str(j): [s] for j, s in sorted(depth.items())}
    everyone: list = [None] * NPROC
    dist.all_gather_object(everyone, result)
    return {"scores": result, "ranks_identical": all(r == everyone[0] for r in everyone)}


def compare(ref: dict, other: dict) -> dict:
    """Max |diff| / max |ref| per axis (over its layers), and the worst overall."""
    per_axis = {}
    for axis in sorted(k for k in ref if k != "tokens"):
        worst = 0.0
        assert ref[axis].keys() == other[axis].keys(), axis
        for layer in ref[axis]:
            a = torch.tensor(ref[axis][layer], dtype=torch.float64)
            b = torch.tensor(other[axis][layer], dtype=torch.float64)
            assert a.shape == b.shape, (axis, layer)
            scale = float(a.abs().max()) or 1.0
            worst = max(worst, float((a - b).abs().max()) / scale)
        per_axis[axis] = worst
    return {"per_axis_max_rel_diff": per_axis, "max_rel_diff": max(per_axis.values())}


def recipe_tp2(work: Path) -> dict:
    """The importance recipe scoring at TP=2, then reordering and saving at TP=1 (DP=2)."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from megatron_ext.checkpoint import CheckpointManager
    from megatron_ext.config.compose import compose_recipe
    from recipes import importance

    par, pgs = layout()
    set_seed(SEED)
    parent = work / "parent"
    CheckpointManager(parent / "checkpoints", pgs).save(2, build_model(MODEL, par, pgs), None, {})
    if dist.get_rank() == 0:
        OmegaConf.save({"model": asdict(MODEL)}, parent / "config.yaml")
    dist.barrier()
    overrides = [
        "parallel=tp2",
        f"parent.dir={parent}",
        f"run.dir={work / 'importance'}",
        f"data.cache_dir={work / 'data'}",
        "data.max_files=20",
        "data.name=stdlib_tiny",
        "importance.calib_batches=2",
        "importance.seq_length=64",
        "importance.micro_batch_size=2",
        "importance.stripe_tp=2",
    ]
    summary = importance.run(compose_recipe("importance", overrides))
    ckpt = Path(summary["checkpoint"])
    manifest = json.loads((ckpt / "manifest.json").read_text())
    layout_file = json.loads((ckpt.parent / "elastic_layout.json").read_text())
    return {
        "scored_at": summary["scored_at"],
        "tokens": summary["tokens"],
        "reorder_logits_max_abs_diff": summary["reorder_logits_max_abs_diff"],
        "saved_layout": manifest["layout"],
        "stripe": [layout_file["tp"], layout_file["ep"]],
        "layout_axes": sorted(layout_file["permutations"]),
        "layer_order": layout_file.get("layer_order"),
        "depth_ranking": summary["depth"]["layer_order"],
        "files": sorted(p.name for p in (work / "importance").iterdir()),
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    layout()
    work = fresh_dir(out.parent / "importance_work")
    cases: dict = {}
    try:
        par, pgs = layout()
        set_seed(SEED)
        model = build_model(MODEL, par, pgs)
        weights = fresh_dir(work / "weights")
        save_sharded(model.sharded_state_dict(), weights)
        del model
        start = time.perf_counter()
        ref = scores_at(weights, 1, 1)
        cases["tp1"] = {
            "ranks_identical": ref["ranks_identical"],
            "tokens": ref["scores"]["tokens"],
            "axes": sorted(k for k in ref["scores"] if k not in ("tokens", "expert_tokens")),
            "seconds": round(time.perf_counter() - start, 2),
        }
        for name, (tp, ep) in {"tp2": (2, 1), "ep2": (1, 2)}.items():
            start = time.perf_counter()
            try:
                got = scores_at(weights, tp, ep)
                cases[name] = {
                    **compare(ref["scores"], got["scores"]),
                    "ranks_identical": got["ranks_identical"],
                    "tokens": got["scores"]["tokens"],
                    "expert_tokens_equal": got["scores"]["expert_tokens"]
                    == ref["scores"]["expert_tokens"],
                }
            except Exception:
                cases[name] = {"error": traceback.format_exc()}
            cases[name]["seconds"] = round(time.perf_counter() - start, 2)
    except Exception:
        cases["tp1"] = {"error": traceback.format_exc()}
    start = time.perf_counter()
    try:  # last: the recipe tears the process groups down when it ends
        cases["recipe_tp2"] = recipe_tp2(work)
    except Exception:
        cases["recipe_tp2"] = {"error": traceback.format_exc()}
        destroy_distributed()
    cases["recipe_tp2"]["seconds"] = round(time.perf_counter() - start, 2)
    if os.environ["RANK"] == "0":
        payload = {"cases": cases, "seconds": round(time.perf_counter() - t0, 2)}
        out.write_text(json.dumps(payload, indent=1))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
