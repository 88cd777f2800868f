"""Vocab-parallel KD at TP=2 against TP=1 on the full vocabulary, ONE launch.

Usage: ``torchrun --standalone --nproc-per-node 2 cases_kd_parallel.py OUT.json``. Rank 0
writes ``{"cases": {name: {...} | {"error": traceback}}, "seconds": s}``.

Both ranks draw the same full-vocabulary logits from a fixed seed. At TP=2 rank r holds the
vocabulary half r of student and teacher (megatron's parallel output layout) and calls
``kd_loss`` with megatron's TP group; the student gradients of both halves are gathered and
compared with ``kd_loss`` at TP=1 (no group) on the whole vocabulary, computed on each rank.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext.distill import kd_loss
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed

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
    except Exception:
        cases["setup"] = {"error": traceback.format_exc()}
    finally:
        destroy_distributed()
    if os.environ["RANK"] == "0":
        payload = {"cases": cases, "seconds": round(time.perf_counter() - t0, 2)}
        out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
