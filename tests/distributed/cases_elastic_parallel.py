"""Elastic layers at TP=2 and EP=2 against TP=1, in ONE 2-rank torchrun launch (gloo, CPU).

Usage: ``torchrun --standalone --nproc-per-node 2 cases_elastic_parallel.py OUT.json``.
Rank 0 writes ``{"cases": {name: {...measured max abs diffs...} | {"error": traceback}}}``.

The reference is the elastic model at TP=1 / EP=1 (both ranks hold the same replica), read
with the stripe layout of the run compared against (TP=2 / EP=2 for the TP=2 case, TP=1 /
EP=2 for the EP=2 case, so narrow compute has a local prefix on every rank). Its weights
move to the other layouts through megatron-core ``dist_checkpointing`` (saved at TP=1,
loaded at TP=2 or EP=2); the TP=1 slices of the small budget and of the small budget with
fewer layers (``depth``) are saved with ``save_slice`` and loaded at TP=2 / EP=2 as plain
smaller models. At PP=2 the elastic model and a depth slice (4 of 8 layers, which the elastic
model's stages hold 3 + 1 and the slice's 2 + 2) run forward-only through megatron's schedule.
Vocab-parallel logits are gathered over the TP group before comparing.
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

from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic, export
from megatron_ext.elastic.slicing import save_slice
from megatron_ext.models.builder import build_model, causal_mask
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.run_format import MODEL_CONFIG

NPROC = 2
SEQ, BATCH = 64, 2
SEED = 4321
MODEL = HybridModelConfig()
# Narrow compute needs the stripes of the run (a local prefix per rank); masked compute and
# slicing work with any. The slice is cut with TP2_EP2 in both cases.
# The layer ranking of the depth axis: depth 5 keeps layers 0, 1, 3, 4, 6 ("M*E-*").
ORDER = (1, 0, 3, 4, 6, 5, 2, 7)
TP2_EP2 = StripeLayout(tp=2, ep=2, layer_order=ORDER)
TP1_EP2 = StripeLayout(tp=1, ep=2, layer_order=ORDER)
SMALL = {
    "embedding": 96,
    "attn_heads": 2,
    "mamba_heads": 4,
    "mamba_head_dim": 8,
    "ffn": 128,
    "moe_experts": 4,
    "moe_ffn": 32,
}
SHALLOW = {**SMALL, "depth": 5}
# Depth 4 keeps layers 0, 1, 3, 4: at PP=2 the elastic model's stage 0 (layers 0-3) keeps
# three of them and stage 1 one, while the 4-layer slice splits 2 + 2, so layer 3 moves stage.
SHALLOW4 = {**SMALL, "depth": 4}
TP1 = StripeLayout(layer_order=ORDER)
BUDGETS = {
    "full": {},
    **{axis: {axis: w} for axis, w in SMALL.items()},
    "all": SMALL,
    "depth": {"depth": 5},
    "all_depth": SHALLOW,
    "all_depth4": SHALLOW4,
}
NARROW = ("embedding", "ffn", "moe_ffn", "attn_heads", "mamba_heads", "mamba_head_dim", "all")
NARROW += ("depth", "all_depth", "all_depth4")


def layout(tp: int = 1, ep: int = 1):
    par = ParallelConfig(nproc=NPROC, tp=tp, ep=ep, timeout_s=300)
    return par, init_distributed(par)


def inputs():
    raw = Path(os.__file__).read_bytes()[8192 : 8192 + BATCH * SEQ]
    tokens = torch.tensor(list(raw)).view(BATCH, SEQ)
    return tokens, torch.arange(SEQ)[None].expand(BATCH, SEQ), causal_mask(SEQ)


@torch.no_grad()
def logits(model, pgs) -> torch.Tensor:
    """Full-vocab logits: the TP shards of the vocab-parallel output gathered."""
    out = model(*inputs()).contiguous()
    tp = pgs.tp.size()
    if tp == 1:
        return out
    parts = [torch.empty_like(out) for _ in range(tp)]
    dist.all_gather(parts, out, group=pgs.tp)
    return torch.cat(parts, dim=-1)


def narrow_grad_gap(model, ctrl, widths) -> float:
    """Max |narrow - masked| over this rank's gradients, relative to its largest masked one."""
    model.train()
    tokens, pos, mask = inputs()
    grads: dict = {}
    for mode in ("masked", "narrow"):
        model.zero_grad(set_to_none=True)
        with ctrl.at(widths, mode=mode):
            model(tokens, pos, mask, labels=tokens).mean().backward()
        grads[mode] = [
            torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()
        ]
    model.zero_grad(set_to_none=True)
    model.eval()
    scale = max(g.abs().max().item() for g in grads["masked"])
    gaps = [(n - m).abs().max().item() for n, m in zip(grads["narrow"], grads["masked"])]
    return max(gaps) / scale


def fresh_dir(path: Path) -> Path:
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    return path


def reference(work: Path) -> dict:
    """TP=1 elastic logits at every budget; weights and the small slice saved for the others."""
    from megatron_ext.checkpoint import save_sharded

    par, pgs = layout()
    set_seed(SEED)
    model = build_model(MODEL, par, pgs).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    save_sharded(model.sharded_state_dict(), fresh_dir(work / "weights"))
    ref: dict = {}
    for stripes in (TP1, TP1_EP2, TP2_EP2):  # the slices are saved with the last one
        ctrl = ElasticController(MODEL, stripes)
        convert_to_elastic(model, ctrl)
        ref[stripes] = {}
        for name, widths in BUDGETS.items():
            with ctrl.at(widths):
                ref[stripes][name] = logits(model, pgs)
        save_slice(model, SMALL, fresh_dir(work / "slice"), pgs)
        save_slice(model, SHALLOW, fresh_dir(work / "slice_depth"), pgs)
        save_slice(model, SHALLOW4, fresh_dir(work / "slice_depth4"), pgs)
        export(model)
    return ref


def load_at(par, pgs, folder: Path, config: HybridModelConfig = MODEL):
    """A model of ``config`` built for this layout with the weights saved in ``folder``."""
    from megatron.core import dist_checkpointing

    model = build_model(config, par, pgs).eval()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(folder)))
    return model


def load_slice(par, pgs, folder: Path):
    """The slice saved in ``folder`` as a plain smaller model at this layout."""
    config = HybridModelConfig(**json.loads((folder / MODEL_CONFIG).read_text()))
    return load_at(par, pgs, folder / "iter_0000000", config)


def elastic_at(work: Path, refs: dict, tp: int, ep: int, stripes: StripeLayout) -> dict:
    """Elastic masked (and narrow) logits at a budget at tp/ep equal the TP=1 ones."""
    par, pgs = layout(tp, ep)
    model = load_at(par, pgs, work / "weights")
    ctrl = ElasticController(MODEL, stripes)
    convert_to_elastic(model, ctrl)
    ref = refs[stripes]
    result: dict = {"masked": {}, "narrow": {}, "stripes": [stripes.tp, stripes.ep]}
    for name, widths in BUDGETS.items():
        with ctrl.at(widths, mode="masked"):
            result["masked"][name] = (logits(model, pgs) - ref[name]).abs().max().item()
        if name in NARROW:
            with ctrl.at(widths, mode="narrow"):
                result["narrow"][name] = (logits(model, pgs) - ref[name]).abs().max().item()
    result["narrow_grad_gap"] = narrow_grad_gap(model, ctrl, BUDGETS["all"])
    result["narrow_grad_gap_depth"] = narrow_grad_gap(model, ctrl, SHALLOW)
    # the TP=1 slices load as plain smaller models at this layout
    for key, folder, budget in (("", "slice", "all"), ("_depth", "slice_depth", "all_depth")):
        small = load_slice(par, pgs, work / folder)
        diff = (logits(small, pgs) - refs[TP2_EP2][budget]).abs().max().item()
        result[f"slice_vs_masked{key}"] = diff
        result[f"slice_layers{key}"] = len(small.decoder.layers)
    result["tp"], result["ep"] = pgs.tp.size(), pgs.ep.size()
    return result


def staged_diff(model, pgs, ref: torch.Tensor) -> float:
    """Max |logits - ref| of a PP-staged ``model`` run forward-only through megatron's
    schedule: the last stage's value on every rank (-1.0 if no stage produced logits)."""
    from megatron_ext.training.pipeline import teacher_logits

    tokens, positions, _ = inputs()
    batches = [{"tokens": tokens, "position_ids": positions}]
    out = teacher_logits(model, batches, pgs, seq_length=SEQ)
    diff = torch.tensor([(out[0] - ref).abs().max().item() if out else -1.0], dtype=torch.float64)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def pipeline_at(work: Path, refs: dict) -> dict:
    """At PP=2: the elastic model (masked and narrow) at every depth budget and the depth-4
    slice, each against the one-process elastic logits."""
    par = ParallelConfig(nproc=NPROC, pp=2, timeout_s=300)
    pgs = init_distributed(par)
    model = load_at(par, pgs, work / "weights")
    ctrl = ElasticController(MODEL, TP1)
    convert_to_elastic(model, ctrl)
    result: dict = {"masked": {}, "narrow": {}, "pp": pgs.pp.size()}
    for name in ("full", "depth", "all_depth", "all_depth4"):
        for mode in ("masked", "narrow"):
            with ctrl.at(BUDGETS[name], mode=mode):
                result[mode][name] = staged_diff(model, pgs, refs[TP1][name])
    small = load_slice(par, pgs, work / "slice_depth4")
    result["slice_vs_elastic_depth4"] = staged_diff(small, pgs, refs[TP2_EP2]["all_depth4"])
    layers = [None] * dist.get_world_size()
    dist.all_gather_object(layers, len(small.decoder.layers))
    result["slice_stage_layers"] = layers
    return result


def worst_over_ranks(result: dict) -> dict:
    """Every measured diff replaced by its maximum over the ranks."""

    def walk(value):
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, float):
            t = torch.tensor([value], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t.item()
        return value

    return walk(result)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    layout()
    work = fresh_dir(out.parent / "elastic_parallel_work")
    results: dict = {}
    try:
        ref = reference(work)
    except Exception:
        ref = None
        results["reference"] = {"error": traceback.format_exc()}
    cases = {
        "tp2": lambda: worst_over_ranks(elastic_at(work, ref, 2, 1, TP2_EP2)),
        "ep2": lambda: worst_over_ranks(elastic_at(work, ref, 1, 2, TP1_EP2)),
        "pp2": lambda: pipeline_at(work, ref),
    }
    for name, run in cases.items():
        start = time.perf_counter()
        try:
            if ref is None:
                raise RuntimeError("the TP=1 reference failed")
            results[name] = run()
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
