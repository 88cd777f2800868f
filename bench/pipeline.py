"""Pipeline parallelism on 2 ranks: the PP=2 step against the PP=1 step, and the bubble.

Usage: python bench/pipeline.py [--hidden 256] [--micro-batches 8] [--reps 5] [--out ...]
(starts torchrun with 2 ranks itself). Writes bench/pipeline.json and prints a table.

Both layouts run the same 8 micro-batches per step through megatron-core's schedules, with
the model in megatron's DDP, on the same two ranks: PP=2 splits the hybrid's layers over the
ranks (1F1B, p2p over gloo); PP=1 holds the whole model on each rank (DP=2, each replica its
own 8 micro-batches, so both cores work in both layouts). The steps alternate (PP=1, PP=2,
PP=1, ...) and each figure is a median over repetitions.

- ratio: PP=2 step / PP=1 step. With both stages equally fast and free communication it is
  (m + p - 1) / (m p) = 9/16 for m = 8 micro-batches, p = 2 stages.
- bubble fraction: the share of a PP=2 step a stage spends outside its forward and
  backward computations (waiting in the warm-up / cool-down of 1F1B, in p2p, and in the
  gradient finalization), averaged over the stages; 1F1B's ideal is (p - 1) / (m + p - 1).
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
)
from megatron.core.pipeline_parallel import schedules  # noqa: E402
from suite_models import Workload, bench_model  # noqa: E402

from megatron_ext.benchmark import device_description, load_average  # noqa: E402
from megatron_ext.models.builder import build_model  # noqa: E402
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed  # noqa: E402
from megatron_ext.training.pipeline import (  # noqa: E402
    finalize_with,
    lm_forward_step,
    run_schedule,
)

HERE = Path(__file__).resolve().parent


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="model width (multiple of 64)")
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="timed steps per layout")
    p.add_argument("--out", type=Path, default=HERE / "pipeline.json")
    return p.parse_args()


class ComputeClock:
    """Seconds spent in forward steps and backward steps (wraps megatron's, for the bench)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._backward = schedules.backward_step

        def timed_backward(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._backward(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        schedules.backward_step = timed_backward

    def forward_step(self, data_iterator, model):
        """``lm_forward_step``, timed (the loss function runs inside the schedule's forward)."""
        start = time.perf_counter()
        out, loss_func = lm_forward_step(data_iterator, model)
        self.seconds += time.perf_counter() - start

        def timed_loss(output):
            t = time.perf_counter()
            try:
                return loss_func(output)
            finally:
                self.seconds += time.perf_counter() - t

        return out, timed_loss


def _layout(pp: int, model_cfg, seed: int):
    par = ParallelConfig(nproc=2, pp=pp, timeout_s=600)
    pgs = init_distributed(par, seed=seed)
    set_seed(seed)
    model = build_model(model_cfg, par, pgs).train()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model, pgs)
    ddp.config.finalize_model_grads_func = finalize_with([], pgs)
    return ddp, pgs


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    model_cfg = bench_model(args.hidden)
    work = Workload(args.micro_batch_size, args.seq)
    batches = [work.make(model_cfg.vocab_size, torch.device("cpu"), i) for i in range(99)]
    micro = batches[: args.micro_batches]
    # Both layouts are built first; each keeps its own process groups (passed explicitly).
    layouts = {"pp1": _layout(1, model_cfg, 7), "pp2": _layout(2, model_cfg, 7)}
    clock = ComputeClock()
    samples: dict[str, list[float]] = {name: [] for name in layouts}
    busy: list[float] = []
    for rep in range(args.reps + 1):  # the first round warms up
        for name, (ddp, pgs) in layouts.items():
            ddp.zero_grad_buffer()
            dist.barrier()
            clock.seconds = 0.0
            start = time.perf_counter()
            run_schedule(ddp, micro, clock.forward_step, pgs, seq_length=args.seq)
            wall = time.perf_counter() - start
            if rep:
                samples[name].append(wall)
                if name == "pp2":
                    busy.append(clock.seconds / wall)
    walls = [None] * 2
    dist.all_gather_object(walls, (samples, busy))
    if dist.get_rank() == 0:
        _report(args, model_cfg, walls)


def _report(args, model_cfg, per_rank) -> None:
    # A step ends on every rank together (the gradient finalization is collective), so the
    # step time is the slower rank's; the bubble is averaged over the two stages.
    steps = {
        name: [max(r[0][name][i] for r in per_rank) for i in range(args.reps)]
        for name in ("pp1", "pp2")
    }
    med = {name: statistics.median(v) for name, v in steps.items()}
    bubble_by_stage = [1.0 - statistics.median(r[1]) for r in per_rank]
    m, p = args.micro_batches, 2
    result = {
        "ratio_pp2_over_pp1": med["pp2"] / med["pp1"],
        "ratio_median_of_paired_steps": statistics.median(
            b / a for a, b in zip(steps["pp1"], steps["pp2"])
        ),
        "ideal_ratio": (m + p - 1) / (m * p),
        "bubble_fraction": statistics.mean(bubble_by_stage),
        "bubble_fraction_by_stage": bubble_by_stage,
        "ideal_bubble_fraction": (p - 1) / (m + p - 1),
        "step_seconds_median": med,
        "step_seconds": steps,
        "micro_batches": m,
        "micro_batch_size": args.micro_batch_size,
        "seq_length": args.seq,
        "model": {"pattern": model_cfg.pattern, "hidden_size": model_cfg.hidden_size},
        "device": device_description(torch.device("cpu")),
        "load_average": load_average(),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"| figure | measured | ideal ({m} micro-batches, {p} stages) |")
    print("|---|---|---|")
    rows = [
        ("PP=2 step / PP=1 step", result["ratio_pp2_over_pp1"], result["ideal_ratio"]),
        ("bubble fraction", result["bubble_fraction"], result["ideal_bubble_fraction"]),
    ]
    for name, measured, ideal in rows:
        print(f"| {name} | {measured:.3f} | {ideal:.3f} |")
    print(f"steps (median s): PP=1 {med['pp1']:.3f}, PP=2 {med['pp2']:.3f}; wrote {args.out}")


def main() -> None:
    args = _args()
    if "WORLD_SIZE" not in os.environ:  # start the two ranks
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", "2", __file__, *sys.argv[1:]]
        sys.exit(subprocess.run(cmd, env=env, check=False).returncode)
    _worker(args)


if __name__ == "__main__":
    main()
