"""Vocab-parallel KD at TP=2 against TP=1 on the full vocabulary, ONE launch.

Also chunked KD (:mod:`megatron_ext.distill_chunked`) against whole logits at TP=2 with
sequence parallelism, on real tiny hybrids.

Usage: ``torchrun --standalone --nproc-per-node 2 cases_kd_parallel.py OUT.json``. Rank 0
writes ``{"cases": {name: {...} | {"error": traceback}}, "seconds": s}``.

Both ranks draw the same full-vocabulary logits from a fixed seed. At TP=2 rank r holds the
vocabulary half r of student and teacher (megatron's parallel output layout) and calls
``kd_loss`` with megatron's TP group; the student gradients of both halves are gathered and
compared with ``kd_loss`` at TP=1 (no group) on the whole vocabulary, computed on each rank.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext.distill import kd_loss
from megatron_ext.distill_chunked import chunked_distill_loss, hidden_states_only, output_head
from megatron_ext.models.builder import build_model, causal_mask
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed

NPROC = 2
SHAPE = (2, 8, 384)  # batch, sequence, vocabulary (divisible by TP=2)
CASES = {  # name: (dtype, temperature, masked)
    "fp32_t1": (torch.float32, 1.0, False),
    "fp32_t2_masked": (torch.float32, 2.0, True),
    "fp64_t1_masked": (torch.float64, 1.0, True),
    "fp32_equal": (torch.float32, 1.0, False),
}


def full_inputs(name: str, dtype: torch.dtype):
    """Student and teacher logits over the full vocabulary and a token mask; same on all ranks."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    student = 3 * torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    teacher = 3 * torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    if name.endswith("equal"):
        teacher = student.clone()
    mask = (torch.rand(SHAPE[:2], generator=gen) > 0.3).double()
    return student.to(dtype), teacher.to(dtype), mask


def run_case(name: str, tp_group) -> dict:
    dtype, temperature, masked = CASES[name]
    student, teacher, mask = full_inputs(name, dtype)
    mask = mask if masked else None
    rank, half = dist.get_rank(tp_group), SHAPE[-1] // NPROC
    shard = slice(rank * half, (rank + 1) * half)

    ref_student = student.clone().requires_grad_()
    ref = kd_loss(ref_student, teacher, temperature=temperature, loss_mask=mask)
    ref.backward()

    local = student[..., shard].clone().requires_grad_()
    got = kd_loss(
        local, teacher[..., shard], temperature=temperature, tp_group=tp_group, loss_mask=mask
    )
    got.backward()
    grads = [torch.empty_like(local.grad) for _ in range(NPROC)]
    dist.all_gather(grads, local.grad.contiguous(), group=tp_group)
    losses = [torch.empty_like(got.detach()) for _ in range(NPROC)]
    dist.all_gather(losses, got.detach().clone(), group=tp_group)
    grad = torch.cat(grads, dim=-1)
    return {
        "loss_tp1": ref.item(),
        "loss_tp2": got.item(),
        "loss_max_abs_diff": abs(got.item() - ref.item()),
        "grad_max_abs_diff": (grad - ref_student.grad).abs().max().item(),
        "grad_max_abs": ref_student.grad.abs().max().item(),
        "losses_identical_on_ranks": all(torch.equal(x, losses[0]) for x in losses),
    }


CHUNKED = {"chunked_sp_chunk3": (3, 0.0), "chunked_sp_chunk4_ce": (4, 0.5)}  # local seq 11


def chunked_case(name: str, pgs) -> dict:
    """Chunked vs whole-logit KD (+CE) of tiny hybrids at TP=2 with sequence parallelism."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    chunk, ce_weight = CHUNKED[name]
    parallel = ParallelConfig(nproc=NPROC, tp=NPROC)
    set_seed(1)
    student = build_model(HybridModelConfig(), parallel, pgs)
    set_seed(2)
    teacher = build_model(HybridModelConfig(), parallel, pgs).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    batch, seq = 2, 22
    tokens = torch.randint(0, 384, (batch, seq), generator=gen)
    labels = torch.randint(0, 384, (batch, seq), generator=gen)
    mask = (torch.rand(batch, seq, generator=gen) > 0.3).float()
    pos, attn = torch.arange(seq)[None].expand(batch, seq), causal_mask(seq)

    logits = student(tokens, pos, attn)
    with torch.no_grad():
        t_logits = teacher(tokens, pos, attn)
    ref = kd_loss(logits, t_logits, temperature=2.0, tp_group=pgs.tp, loss_mask=mask)
    ce = vocab_parallel_cross_entropy(logits.float(), labels)
    ref = ref + ce_weight * (ce * mask).sum() / mask.sum()
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)

    with hidden_states_only(student):
        hidden = student(tokens, pos, attn)
    with torch.no_grad(), hidden_states_only(teacher):
        t_hidden = teacher(tokens, pos, attn)
    loss, _, _ = chunked_distill_loss(
        hidden,
        t_hidden,
        output_head(student),
        output_head(teacher),
        chunk_size=chunk,
        temperature=2.0,
        tp_group=pgs.tp,
        loss_mask=mask,
        labels=labels,
        ce_weight=ce_weight,
    )
    loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    diff = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    worst = torch.tensor([diff])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=pgs.tp)
    return {
        "local_seq": int(hidden.shape[0]),
        "loss_whole": ref.item(),
        "loss_chunked": loss.item(),
        "loss_max_abs_diff": abs(loss.item() - ref.item()),
        "grad_max_abs_diff": worst.item(),
        "grad_max_abs": max(g.abs().max().item() for g in ref_grads.values()),
        "same_parameters_with_grad": grads.keys() == ref_grads.keys(),
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cases: dict = {}
    try:
        pgs = init_distributed(ParallelConfig(nproc=NPROC, tp=NPROC, timeout_s=300))
        for name in CASES:
            start = time.perf_counter()
            try:
                cases[name] = run_case(name, pgs.tp)
            except Exception:
                cases[name] = {"error": traceback.format_exc()}
            cases[name]["seconds"] = round(time.perf_counter() - start, 3)
        for name in CHUNKED:
            start = time.perf_counter()
            try:
                cases[name] = chunked_case(name, pgs)
            except Exception:
                cases[name] = {"error": traceback.format_exc()}
            cases[name]["seconds"] = round(time.perf_counter() - start, 3)
    except Exception:
        cases["setup"] = {"error": traceback.format_exc()}
    finally:
        destroy_distributed()
    if os.environ["RANK"] == "0":
        payload = {"cases": cases, "seconds": round(time.perf_counter() - t0, 2)}
        out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
