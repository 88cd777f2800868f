"""TP/EP equivalence and checkpoint resharding cases, run in ONE 2-rank torchrun launch.

Usage: ``torchrun --standalone --nproc-per-node 2 cases_parallel_equivalence.py OUT.json``.
Rank 0 writes ``{"cases": {name: {...measured differences...} | {"error": traceback}}}``.

Gradients are compared as global tensors: each layout's grads are put in place of the
parameters in the model's own ``sharded_state_dict()`` and saved with megatron-core's
dist_checkpointing, then read back whole with ``load_plain_tensors``. The mapping from TP/EP
shards to global tensors (Mamba ``in_proj`` pieces, expert stacking) is therefore upstream's.
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

from megatron_ext.checkpoint import CheckpointManager, save_sharded
from megatron_ext.compat.engine import apply_engine_shims
from megatron_ext.models.builder import build_model, causal_mask
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.training.state import capture_rng, restore_rng

NPROC = 2
SEQ = 64
MICRO = 2
SEED = 1234
MODEL = HybridModelConfig()  # the tiny hybrid: M*ME-M*E, 8 experts, top-2


def text_batch(offset: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch of real text bytes (this Python's ``os.py``), as byte-level tokens."""
    raw = Path(os.__file__).read_bytes()
    start = 4096 + offset * MICRO * (SEQ + 1)
    data = torch.tensor(list(raw[start : start + MICRO * (SEQ + 1)])).view(MICRO, SEQ + 1)
    return {
        "tokens": data[:, :-1],
        "labels": data[:, 1:],
        "position_ids": torch.arange(SEQ)[None].expand(MICRO, SEQ),
    }


def layout(tp: int = 1, ep: int = 1):
    par = ParallelConfig(nproc=NPROC, tp=tp, ep=ep, timeout_s=300)
    return par, init_distributed(par)


def build(par, pgs, seed: int = SEED) -> torch.nn.Module:
    """The tiny hybrid model (training mode; at TP>1 with sequence parallelism, the default)."""
    set_seed(seed)
    return build_model(MODEL, par, pgs).train()


def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    per_token = model(
        batch["tokens"], batch["position_ids"], causal_mask(SEQ), labels=batch["labels"]
    )
    return per_token.float().mean()


_DDP: dict[int, torch.nn.Module] = {}


def forward_backward(model, batch, pgs) -> float:
    """Loss and data-parallel-reduced grads (of the mean loss over the global batch), reduced
    by megatron-core's DDP and ``finalize_model_grads`` and put in ``param.grad``."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp = _DDP.get(id(model))
    if ddp is None or ddp.module is not model:  # wrapped once: DDP hooks the parameters
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        ddp = _DDP[id(model)] = DistributedDataParallel(
            model.config, ddp_config, model, pg_collection=pgs
        )
    model.zero_grad(set_to_none=True)  # param.grad was the reduced buffer (below)
    ddp.zero_grad_buffer()
    loss = loss_of(ddp, batch)
    loss.backward()
    finalize_model_grads([ddp], pg_collection=pgs)
    for p in model.parameters():
        p.grad = p.main_grad
    return float(loss.detach())


def fresh_dir(path: Path) -> Path:
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    return path


def save_weights(model, path: Path) -> Path:
    save_sharded(model.sharded_state_dict(), fresh_dir(path))
    return path


def load_weights(model, path: Path) -> None:
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path)))


def save_grads(model, path: Path) -> Path:
    """Save the grads under the parameters' sharded keys (upstream's TP/EP sharding)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    grads = {id(p): p.grad for p in model.parameters()}
    sharded = {}
    for key, value in model.sharded_state_dict().items():
        if isinstance(value, ShardedTensor | ShardedTensorFactory):
            if id(value.data) not in grads:
                raise RuntimeError(f"{key}: sharded tensor is not a parameter")
            value.data = grads[id(value.data)]
            sharded[key] = value
    save_sharded(sharded, fresh_dir(path))
    return path


def plain(path: Path) -> dict[str, torch.Tensor]:
    from megatron.core.dist_checkpointing import load_plain_tensors

    return load_plain_tensors(str(path))


def compare(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """Max abs diff per global tensor, and relative to the tensor's and the global grad scale."""
    assert ref.keys() == other.keys(), sorted(set(ref) ^ set(other))
    per_tensor = {}
    for key in sorted(ref):
        a, b = ref[key].double(), other[key].double()
        assert a.shape == b.shape, (key, a.shape, b.shape)
        # fit_ratio: b ≈ fit_ratio * a in least squares; tells a scale error from noise
        ratio = float((a * b).sum() / (a * a).sum()) if bool(a.any()) else float("nan")
        per_tensor[key] = {
            "max_abs_diff": float((a - b).abs().max()),
            "max_abs": float(a.abs().max()),
            "fit_ratio": ratio,
        }
    scale = max(v["max_abs"] for v in per_tensor.values())
    worst = max(per_tensor, key=lambda k: per_tensor[k]["max_abs_diff"])
    worst_rel = max(
        per_tensor,
        key=lambda k: per_tensor[k]["max_abs_diff"] / max(per_tensor[k]["max_abs"], 1e-30),
    )
    return {
        "tensors": len(per_tensor),
        "global_scale": scale,
        "max_abs_diff": per_tensor[worst]["max_abs_diff"],
        "max_abs_diff_tensor": worst,
        "max_diff_rel_global_scale": per_tensor[worst]["max_abs_diff"] / scale,
        "max_diff_rel_own_scale": per_tensor[worst_rel]["max_abs_diff"]
        / max(per_tensor[worst_rel]["max_abs"], 1e-30),
        "max_diff_rel_own_scale_tensor": worst_rel,
        "per_tensor": per_tensor,
    }


def replica_spread(model, group) -> float:
    """Max difference of replicated (not TP-sharded) grads across ``group``'s ranks."""
    spread = torch.zeros(1, dtype=torch.float64)
    if dist.get_world_size(group) == 1:
        return 0.0
    for p in model.parameters():
        if getattr(p, "tensor_model_parallel", False) or not getattr(p, "allreduce", True):
            continue
        gathered = [torch.empty_like(p.grad) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, p.grad.contiguous(), group=group)
        for g in gathered[1:]:
            spread = torch.maximum(spread, (g - gathered[0]).abs().max().double()[None])
    return float(spread)


def all_ranks(value: float) -> list[float]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def equivalence(work: Path, name: str, ref_layout: dict, layout_b: dict, same_batch: bool) -> dict:
    """Loss and global grads of ``layout_b`` against ``ref_layout`` with the same weights."""
    batch = text_batch(0 if same_batch else dist.get_rank())
    par, pgs = layout(**ref_layout)
    model = build(par, pgs)
    loss_ref = forward_backward(model, batch, pgs)
    weights = save_weights(model, work / f"{name}_weights")
    grads_ref = save_grads(model, work / f"{name}_grads_ref")
    del model

    par, pgs = layout(**layout_b)
    model = build(par, pgs, seed=SEED + 1)  # another init: the weights must come from the load
    load_weights(model, weights)
    loss_b = forward_backward(model, batch, pgs)
    grads_b = save_grads(model, work / f"{name}_grads")
    spread = replica_spread(model, pgs.tp)
    losses_ref, losses_b = all_ranks(loss_ref), all_ranks(loss_b)
    result = compare(plain(grads_ref), plain(grads_b))
    result.update(
        loss_ref=losses_ref,
        loss=losses_b,
        loss_abs_diff=max(abs(a - b) for a, b in zip(losses_ref, losses_b)),
        tp_replica_grad_spread=spread,
        sequence_parallel=par.use_sequence_parallel,
        ref_layout=ref_layout,
        layout=layout_b,
    )
    return result


def case_tp2_vs_tp1(work: Path) -> dict:
    """TP=2 loss and gradients equal TP=1 (both ranks see the same batch)."""
    return equivalence(work, "tp", {"tp": 1}, {"tp": 2}, same_batch=True)


def case_ep2_vs_ep1(work: Path) -> dict:
    """EP=2 loss and gradients equal EP=1 (DP=2 in both; each rank its own batch)."""
    return equivalence(work, "ep", {"ep": 1}, {"ep": 2}, same_batch=False)


def reshard(work: Path, name: str, saved_at: dict, loaded_at: dict) -> dict:
    batch = text_batch(0)
    par, pgs = layout(**saved_at)
    model = build(par, pgs, seed=SEED + 2)
    with torch.no_grad():
        loss_saved = float(loss_of(model, batch))
    manager = CheckpointManager(fresh_dir(work / f"{name}_ckpt"), pgs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager.save(1, model, optimizer, {"step": 1})
    saved_weights = save_weights(model, work / f"{name}_saved_weights")
    del model, optimizer

    par, pgs = layout(**loaded_at)
    model = build(par, pgs, seed=SEED + 3)
    manager = CheckpointManager(work / f"{name}_ckpt", pgs)
    info = manager.load(manager.latest_valid(), model, torch.optim.AdamW(model.parameters()))
    with torch.no_grad():
        loss_loaded = float(loss_of(model, batch))
    loaded_weights = save_weights(model, work / f"{name}_loaded_weights")
    weights = compare(plain(saved_weights), plain(loaded_weights))
    return {
        "load_info": info,
        "loss_saved": all_ranks(loss_saved),
        "loss_loaded": all_ranks(loss_loaded),
        "loss_abs_diff": max(
            abs(a - b) for a, b in zip(all_ranks(loss_saved), all_ranks(loss_loaded))
        ),
        "weights_max_abs_diff": weights["max_abs_diff"],
        "weights_tensors": weights["tensors"],
    }


def case_reshard_tp2_to_tp1(work: Path) -> dict:
    """A CheckpointManager checkpoint saved at TP=2 loads at TP=1 with the same loss."""
    return reshard(work, "reshard_tp", {"tp": 2}, {"tp": 1})


def case_reshard_ep2_to_ep1(work: Path) -> dict:
    """A CheckpointManager checkpoint saved at EP=2 loads at EP=1 with the same loss."""
    return reshard(work, "reshard_ep", {"ep": 2}, {"ep": 1})


def train_step(model, optimizer, batch, pgs) -> float:
    loss = forward_backward(model, batch, pgs)
    optimizer.step()
    return loss


def tensors_max_diff(a, b) -> float:
    """Max abs diff over all tensors of two equally-structured nests (inf if structure differs)."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype):
            return float("inf")
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return float("inf")
        return max((tensors_max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return float("inf")
        return max((tensors_max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0 if a == b else float("inf")


def case_resume_tp2_restores_optimizer(work: Path) -> dict:
    """Save/load through CheckpointManager at TP=2, resume at TP=2: exact optimizer state."""
    par, pgs = layout(tp=2)
    batches = [text_batch(i) for i in range(3)]

    def make(seed: int):
        model = build(par, pgs, seed=seed)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    model, optimizer = make(SEED + 4)
    for b in batches[:2]:
        train_step(model, optimizer, b, pgs)
    manager = CheckpointManager(fresh_dir(work / "resume_ckpt"), pgs)
    manager.save(2, model, optimizer, {"step": 2, "rng": capture_rng()})
    rng_at_save = torch.get_rng_state()
    loss_ref = train_step(model, optimizer, batches[2], pgs)
    torch.manual_seed(999)  # disturb the RNG: the resume must restore it

    resumed, resumed_opt = make(SEED + 5)
    extra = manager.load(manager.latest_valid(), resumed, resumed_opt)
    entries = len(resumed_opt.state_dict()["state"])
    restore_rng(extra["rng"])
    rng_diff = int((torch.get_rng_state() != rng_at_save).sum())
    saved_opt = torch.load(
        work / "resume_ckpt" / "iter_0000002" / "rank_state" / f"rank_{dist.get_rank():05d}.pt",
        weights_only=False,
    )["optimizer"]
    opt_diff = tensors_max_diff(saved_opt, resumed_opt.state_dict())
    loss_resumed = train_step(resumed, resumed_opt, batches[2], pgs)
    after_diff = tensors_max_diff(model.state_dict(), resumed.state_dict())
    opt_after_diff = tensors_max_diff(optimizer.state_dict(), resumed_opt.state_dict())
    return {
        "step": extra["step"],
        "optimizer_state_max_diff": max(all_ranks(opt_diff)),
        "optimizer_state_entries": entries,
        "rng_bytes_differing": max(all_ranks(rng_diff)),
        "next_step_loss_ref": loss_ref,
        "next_step_loss_resumed": loss_resumed,
        "next_step_weights_max_diff": max(all_ranks(after_diff)),
        "next_step_optimizer_max_diff": max(all_ranks(opt_after_diff)),
    }


CASES = {
    "tp2_vs_tp1": case_tp2_vs_tp1,
    "ep2_vs_ep1": case_ep2_vs_ep1,
    "reshard_tp2_to_tp1": case_reshard_tp2_to_tp1,
    "reshard_ep2_to_ep1": case_reshard_ep2_to_ep1,
    "resume_tp2": case_resume_tp2_restores_optimizer,
}


def main(out: Path) -> None:
    apply_engine_shims()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    layout()  # the default process group, kept for every layout below
    work = fresh_dir(out.parent / "parallel_equivalence_work")
    results: dict = {}
    for name, case in CASES.items():
        start = time.perf_counter()
        try:
            results[name] = case(work)
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
