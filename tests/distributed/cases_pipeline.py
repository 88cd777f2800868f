"""Pipeline parallelism (PP=2, 1F1B) against PP=1, in ONE 2-rank torchrun launch (gloo, CPU).

Usage: ``torchrun --standalone --nproc-per-node 2 cases_pipeline.py OUT.json``.
Rank 0 writes ``{"cases": {name: {...measured differences...} | {"error": traceback}}}``.

Every step goes through megatron-core's ``get_forward_backward_func`` (1F1B at PP=2, no
pipelining at PP=1) with the model in megatron's DDP and the gradients finalized by
``finalize_model_grads``. The PP=1 reference runs on both ranks (DP=2) with the same
micro-batches on each, so its data-parallel average is exactly the one replica's gradient.
Weights reach the PP=2 stages through dist_checkpointing (saved at PP=1, loaded at PP=2), and
gradients are compared as global tensors under the model's own sharded keys (global layer
numbers), as in ``cases_parallel_equivalence.py``.
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

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.cost import CostModel, CostSpec
from megatron_ext.elastic.pipeline_step import ElasticForwardStep
from megatron_ext.elastic.router import ElasticRouter, RouterConfig
from megatron_ext.elastic.train_config import ElasticTrainConfig
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import HybridModelConfig, save_model_config
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.training.pipeline import (
    finalize_with,
    lm_forward_step,
    replicated_chunk,
    run_schedule,
    teacher_logits,
)
from tests.distributed.cases_parallel_equivalence import (
    all_ranks,
    compare,
    fresh_dir,
    load_weights,
    plain,
    save_weights,
    text_batch,
)

NPROC = 2
SEQ, MICRO, MICROBATCHES = 64, 2, 4
SEED = 2468
MODEL = HybridModelConfig()  # M*ME-M*E: stage 0 holds M*ME, stage 1 holds -M*E
TIED = HybridModelConfig(tie_embeddings=True)
AXES = {
    "embedding": [128, 96, 64],
    "attn_heads": [4, 2],
    "mamba_heads": [8, 4],
    "mamba_head_dim": [16, 8],
    "ffn": [256, 192, 128],
    "moe_experts": [8, 6, 4],
    "moe_ffn": [64, 32],
}
ELASTIC = ElasticConfig(
    axes=AXES,  # type: ignore[arg-type]
    budgets=[  # type: ignore[list-item]
        {"name": "L", "target": 1.0, "kind": "params"},
        {"name": "S", "target": 0.45, "kind": "params"},
    ],
)
# depth 5 of 8 keeps layers 0, 1, 3 (stage 0) and 4, 6 (stage 1): each stage skips some
ORDER = (1, 0, 3, 4, 6, 5, 2, 7)
ELASTIC_DEPTH = ElasticConfig(
    axes={**AXES, "depth": [8, 6, 5]},  # type: ignore[arg-type]
    budgets=ELASTIC.budgets,
)
TRAIN = ElasticTrainConfig(ce_weight=0.5, cost_weight=1.0, warmup_steps=0)
DDP = DistributedDataParallelConfig(grad_reduce_in_fp32=True)


def layout(pp: int = 1):
    par = ParallelConfig(nproc=NPROC, pp=pp, timeout_s=300)
    return par, init_distributed(par)


def microbatches(step: int = 0) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(MICROBATCHES):
        batch = text_batch(step * MICROBATCHES + i)
        batch["loss_mask"] = torch.ones(batch["labels"].shape)
        out.append(batch)
    return out


def wrap(model, par, pgs, model_cfg=MODEL):
    return DistributedDataParallel(model.config, DDP, model, pg_collection=pgs)


def build(par, pgs, model_cfg=MODEL, seed=SEED):
    set_seed(seed)
    return build_model(model_cfg, par, pgs).train()


def main_grads_dir(ddp, path: Path) -> Path:
    """The DDP chunk's gradients (``main_grad``) saved under the parameters' sharded keys."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_ext.checkpoint import save_sharded

    grads = {id(p): p.main_grad for p in ddp.module.parameters()}
    sharded = {}
    for key, value in ddp.module.sharded_state_dict().items():
        if isinstance(value, ShardedTensor) and id(value.data) in grads:
            value.data = grads[id(value.data)]
            sharded[key] = value
    save_sharded(sharded, fresh_dir(path))
    return path


def last_stage_losses(outputs: list, key: str = "loss") -> list[float]:
    """The micro-batch losses, on every rank (the last stage has them)."""
    mine = [float(o[key]) for o in outputs]
    return max(all_ranks(mine), key=len)  # type: ignore[arg-type,return-value]


def parent_step(ddp, pgs) -> list[float]:
    ddp.zero_grad_buffer()
    out = run_schedule(ddp, microbatches(), lm_forward_step, pgs, seq_length=SEQ)
    return last_stage_losses(out)


def case_parent(work: Path, model_cfg: HybridModelConfig, name: str) -> dict:
    """PP=2 loss and every gradient against PP=1, same weights and micro-batches."""
    par, pgs = layout(pp=1)
    ddp = wrap(build(par, pgs, model_cfg), par, pgs)
    ddp.config.finalize_model_grads_func = finalize_with([], pgs)
    loss_ref = parent_step(ddp, pgs)
    weights = save_weights(ddp.module, work / f"{name}_weights")
    grads_ref = main_grads_dir(ddp, work / f"{name}_grads_ref")
    del ddp

    par, pgs = layout(pp=2)
    model = build(par, pgs, model_cfg, seed=SEED + 1)  # other weights: they must come from the load
    load_weights(model, weights)
    ddp = wrap(model, par, pgs)
    ddp.config.finalize_model_grads_func = finalize_with([], pgs)
    loss_pp = parent_step(ddp, pgs)
    grads_pp = main_grads_dir(ddp, work / f"{name}_grads_pp")
    result = compare(plain(grads_ref), plain(grads_pp))
    stage_layers = all_ranks(len(model.decoder.layers))
    return {
        "loss_ref": loss_ref,
        "loss_pp": loss_pp,
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(loss_ref, loss_pp)),
        "grad_tensors": result["tensors"],
        "grad_max_abs_diff": result["max_abs_diff"],
        "grad_keys": sorted(result["per_tensor"]),
        "stage_layers": stage_layers,
        "tied": model_cfg.tie_embeddings,
    }


def smallest_first(router: ElasticRouter) -> None:
    """Bias every axis's router towards its smallest width, so each axis is reduced."""
    with torch.no_grad():
        for axis, axis_router in router.routers.items():
            n = len(router.choices[axis])
            bias = axis_router.fc2.bias.view(axis_router.n_layers, n)
            bias[:, n - 1] += 4.0  # wins against the Gumbel noise, leaves the softmax soft


def elastic_step(pp: int, mode: str, weights: Path, depth: bool = False):
    """One elastic step (teacher pass, then the student's) at ``pp``; returns its pieces.

    ``depth``: the depth axis too (layer ranking ``ORDER``), so both stages skip layers."""
    par, pgs = layout(pp=pp)
    teacher = build(par, pgs, seed=SEED + 7)
    load_weights(teacher, weights)
    teacher.eval().requires_grad_(False)
    student = build(par, pgs, seed=SEED + 8)
    load_weights(student, weights)
    order = ORDER if depth else ()
    ctrl = ElasticController(MODEL, StripeLayout(layer_order=order), mode=mode)
    convert_to_elastic(student, ctrl)
    router = ElasticRouter(ELASTIC_DEPTH if depth else ELASTIC, RouterConfig(hidden=32, seed=3))
    smallest_first(router)
    ddp = wrap(student, par, pgs)
    router_ddp = replicated_chunk(router, student.config, pgs)
    ddp.config.finalize_model_grads_func = finalize_with([router_ddp], pgs)
    cost = CostModel(MODEL, CostSpec(kind="params"), order)
    target = 0.45 * cost.full()

    def cost_error(expected):
        return (cost(expected) - target).abs() / target

    batches = microbatches()
    logits = teacher_logits(teacher, batches, pgs, seq_length=SEQ)
    for batch, t in zip(batches, logits or [None] * len(batches)):
        batch["teacher_logits"] = t  # type: ignore[assignment]
    step = ElasticForwardStep(
        router, ctrl, TRAIN, pgs, budget="S", seed=11, stage=0, step=0, cost_error=cost_error
    )
    ddp.zero_grad_buffer()
    router_ddp.zero_grad_buffer()
    out = run_schedule(ddp, batches, step, pgs, seq_length=SEQ)
    step.finish()
    return ddp, router_ddp, step, out, pgs


def router_grads(router_ddp) -> dict[str, torch.Tensor]:
    return {n: p.main_grad.clone() for n, p in router_ddp.module.module.named_parameters()}


def case_elastic(work: Path, mode: str, depth: bool = False) -> dict:
    """The elastic step (router, KD + CE + cost, every axis reduced) at PP=2 against PP=1."""
    par, pgs = layout(pp=1)
    mode_dir = f"{mode}_depth" if depth else mode
    weights = save_weights(build(par, pgs, seed=SEED + 5), work / f"elastic_{mode_dir}_weights")
    ddp, router_ddp, step, out, _ = elastic_step(1, mode, weights, depth)
    kd_ref = last_stage_losses(out, "kd")
    grads_ref = main_grads_dir(ddp, work / f"elastic_{mode_dir}_grads_ref")
    router_ref = router_grads(router_ddp)
    choices_ref = step.choices
    del ddp, router_ddp

    ddp, router_ddp, step, out, pgs = elastic_step(2, mode, weights, depth)
    kd_pp = last_stage_losses(out, "kd")
    grads_pp = main_grads_dir(ddp, work / f"elastic_{mode_dir}_grads_pp")
    result = compare(plain(grads_ref), plain(grads_pp))
    router_pp = router_grads(router_ddp)
    router_diff = max(float((router_ref[k] - router_pp[k]).abs().max()) for k in router_ref)
    router_scale = max(float(g.abs().max()) for g in router_ref.values())
    full = {**AXES, "depth": [MODEL.num_layers]}
    reduced = sorted(a for a, w in choices_ref[0].items() if w < full[a][0])
    return {
        "kd_ref": kd_ref,
        "kd_pp": kd_pp,
        "kd_max_abs_diff": max(abs(a - b) for a, b in zip(kd_ref, kd_pp)),
        "grad_tensors": result["tensors"],
        "grad_max_abs_diff": result["max_abs_diff"],
        "router_grad_max_abs_diff": router_diff,
        "router_grad_scale": router_scale,
        "router_grad_rel_diff": router_diff / max(router_scale, 1e-30),
        "reduced_axes": reduced,
        "choices_ref": choices_ref,
        "choices_by_stage": all_ranks(step.choices),  # type: ignore[arg-type]
        "micro_batches": MICROBATCHES,
    }


def adam_step(ddp, optimizer) -> None:
    """The optimizer step on DDP's gradients (``main_grad``).

    ``.grad`` is unset again after the step: megatron's DDP hook adds a parameter's ``.grad``
    into ``main_grad``, so a ``.grad`` left aliasing ``main_grad`` would double the next one.
    """
    params = list(ddp.module.parameters())
    for p in params:
        p.grad = p.main_grad
    optimizer.step()
    for p in params:
        p.grad = None


def train(ddp, optimizer, pgs, steps: range) -> list[float]:
    """Parent steps through the schedule; the mean micro-batch loss of each."""
    losses = []
    for step in steps:
        ddp.zero_grad_buffer()
        out = run_schedule(ddp, microbatches(step), lm_forward_step, pgs, seq_length=SEQ)
        adam_step(ddp, optimizer)
        per_micro = last_stage_losses(out)
        losses.append(sum(per_micro) / len(per_micro))
    return losses


def parent_at(pp: int, seed: int):
    par, pgs = layout(pp=pp)
    model = build(par, pgs, seed=seed)
    ddp = wrap(model, par, pgs)
    ddp.config.finalize_model_grads_func = finalize_with([], pgs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return model, ddp, optimizer, pgs


def weights_max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(
        float((sa[k].double() - sb[k].double()).abs().max())
        for k in sa
        if isinstance(sa[k], torch.Tensor)
    )


def case_resume_pp2(work: Path) -> dict:
    """PP=2: save after 2 steps, resume in a fresh model; 3 more steps against the reference."""
    model, ddp, optimizer, pgs = parent_at(2, SEED + 20)
    train(ddp, optimizer, pgs, range(2))
    manager = CheckpointManager(fresh_dir(work / "resume_pp2"), pgs)
    manager.save(2, model, optimizer, {"step": 2})
    ref = train(ddp, optimizer, pgs, range(2, 5))

    fresh, fresh_ddp, fresh_opt, pgs = parent_at(2, SEED + 21)
    extra = manager.load(manager.latest_valid(), fresh, fresh_opt)
    resumed = train(fresh_ddp, fresh_opt, pgs, range(int(extra["step"]), 5))
    return {
        "step": extra["step"],
        "losses_ref": ref,
        "losses_resumed": resumed,
        "weights_max_diff_after": max(all_ranks(weights_max_diff(model, fresh))),
        "optimizer_entries": len(fresh_opt.state_dict()["state"]),
    }


def case_reshard_pp2_to_pp1(work: Path, keep: Path) -> dict:
    """A PP=2 checkpoint (CheckpointManager) loads at PP=1 with the same weights and loss."""
    model, ddp, optimizer, pgs = parent_at(2, SEED + 30)
    train(ddp, optimizer, pgs, range(1))
    with torch.no_grad():
        loss_pp2 = last_stage_losses(
            run_schedule(
                ddp, microbatches(9), lm_forward_step, pgs, seq_length=SEQ, forward_only=True
            )
        )
    source = fresh_dir(keep)
    manager = CheckpointManager(source / "checkpoints", pgs)
    manager.save(1, model, optimizer, {"step": 1})
    saved = save_weights(model, work / "reshard_pp2_saved")
    if dist.get_rank() == 0:
        save_model_config(MODEL, source)
    stage_keys = all_ranks(len(model.sharded_state_dict()))

    fresh, fresh_ddp, fresh_opt, pgs = parent_at(1, SEED + 31)
    manager = CheckpointManager(source / "checkpoints", pgs)
    info = manager.load(manager.latest_valid(), fresh, fresh_opt)
    with torch.no_grad():
        loss_pp1 = last_stage_losses(
            run_schedule(
                fresh_ddp, microbatches(9), lm_forward_step, pgs, seq_length=SEQ, forward_only=True
            )
        )
    loaded = save_weights(fresh, work / "reshard_pp1_loaded")
    weights = compare(plain(saved), plain(loaded))
    return {
        "load_info": info,
        "stage_keys": stage_keys,
        "weights_tensors": weights["tensors"],
        "weights_max_abs_diff": weights["max_abs_diff"],
        "loss_pp2": loss_pp2,
        "loss_pp1": loss_pp1,
        "source": str(source),
    }


def case_engine_parent(work: Path) -> dict:
    """The training engine (DDP, distributed optimizer, clipping) at PP=2 against PP=1."""
    from megatron_ext.training.engine import Engine, LMStep
    from megatron_ext.training.engine_config import EngineConfig

    def run(pp: int) -> list[list[float]]:
        par, pgs = layout(pp=pp)
        model = build(par, pgs, seed=SEED + 40)
        cfg = EngineConfig(
            micro_batch_size=MICRO,
            global_batch_size=MICRO * MICROBATCHES,
            lr=1e-3,
            weight_decay=0.1,
        )
        engine = Engine([model], cfg, pgs, seq_length=SEQ)
        load_weights(model, work / "engine_weights")
        engine.reload_model_params()
        out = []
        for step in range(3):  # every rank the same micro-batches (DP=2 at PP=1: exact mean)
            result = engine.step(LMStep(), microbatches(step), 1e-3)
            out.append([result.metrics["loss"], result.grad_norm])
        return out

    par, pgs = layout(pp=1)
    save_weights(build(par, pgs, seed=SEED + 41), work / "engine_weights")
    ref = run(1)
    pp2 = run(2)
    return {"pp1": ref, "pp2": pp2, "ranks_agree": all_ranks(pp2)}  # type: ignore[arg-type]


def case_engine_elastic(work: Path) -> dict:
    """The engine's elastic trainer at PP=2 against PP=1, and a PP=2 resume (its own file)."""
    from tests.distributed.cases_pipeline_engine import case_engine_elastic as run_case

    return run_case(work)


CASES = {
    "parent_pp2_vs_pp1": lambda work: case_parent(work, MODEL, "parent"),
    "parent_tied_pp2_vs_pp1": lambda work: case_parent(work, TIED, "tied"),
    "elastic_masked_pp2_vs_pp1": lambda work: case_elastic(work, "masked"),
    "elastic_narrow_pp2_vs_pp1": lambda work: case_elastic(work, "narrow"),
    "elastic_depth_masked_pp2_vs_pp1": lambda work: case_elastic(work, "masked", depth=True),
    "elastic_depth_narrow_pp2_vs_pp1": lambda work: case_elastic(work, "narrow", depth=True),
    "resume_pp2": case_resume_pp2,
    "engine_parent_pp2_vs_pp1": case_engine_parent,
    "engine_elastic_pp2_vs_pp1": case_engine_elastic,
}


def main(out: Path) -> None:
    from megatron_ext.compat.engine import apply_engine_shims

    apply_engine_shims()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    layout()  # the default process group, kept for every layout below
    work = fresh_dir(out.parent / "pipeline_work")
    results: dict = {}
    only = sys.argv[2:]
    for name, case in CASES.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            results[name] = case(work)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    name = "reshard_pp2_to_pp1"
    if not only or name in only:
        start = time.perf_counter()
        try:
            results[name] = case_reshard_pp2_to_pp1(work, out.parent / "pp2_source")
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    if dist.get_rank() == 0:
        payload = {"cases": results, "seconds": round(time.perf_counter() - t0, 2)}
        out.write_text(json.dumps(payload, indent=1))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(work, ignore_errors=True)
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
