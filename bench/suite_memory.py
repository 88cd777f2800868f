"""Peak memory of one training case, measured in a fresh process and printed as JSON.

Usage: python bench/suite_memory.py CASE --hidden H --batch B --seq S --device D --dtype T

CASE is ``plain`` (the parent's training step), ``elastic`` (``ElasticTrainer`` steps at the
full budget with the frozen parent as KD teacher) or ``elastic_replay`` (the same with the
teacher's logits computed once, so no teacher weights stay in memory). The figure is the
peak above the memory in use once the libraries are imported; a fresh process per case keeps
one case's freed-but-kept heap out of another's (``megatron_ext.benchmark``).
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import argparse
import json
import warnings

import torch
from suite_models import Workload, bench_elastic, bench_model
from suite_train import Batch, build, elastic_bench, plain_step

from megatron_ext.benchmark import current_memory_bytes, peak_memory_bytes, reset_peak_memory
from megatron_ext.compat.engine import apply_engine_shims
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, init_distributed

CASES = ("plain", "elastic", "elastic_replay")


def memory_probe(
    case: str,
    cfg: HybridModelConfig,
    elastic: ElasticConfig,
    batch: Batch,
    pgs,
    device: torch.device,
    steps: int,
) -> dict[str, int]:
    """Peak bytes of ``steps`` training steps of ``case``, and the bytes in use before."""
    base = current_memory_bytes(device)
    reset_peak_memory(device)
    if case == "plain":
        run = plain_step(build(cfg, pgs, device), batch, pgs, cfg)
    else:
        teacher = build(cfg, pgs, device).eval() if case == "elastic" else None
        bench = elastic_bench(cfg, elastic, batch, pgs, device, teacher=teacher)
        run = bench.step(elastic.budgets[0].name, "narrow", "teacher" if teacher else "replay")
    for _ in range(steps):
        run()
    return {"base_bytes": base, "peak_bytes": peak_memory_bytes(device)}


def main() -> None:
    """Parse the arguments, run the probe, print one JSON line."""
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("case", choices=CASES)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    device = torch.device(args.device)
    apply_engine_shims()
    pgs = init_distributed(ParallelConfig())
    cfg = bench_model(args.hidden, args.dtype)
    batch = Workload(args.batch, args.seq).make(cfg.vocab_size, device)
    out = memory_probe(args.case, cfg, bench_elastic(cfg), batch, pgs, device, args.steps)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
