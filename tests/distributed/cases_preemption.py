"""Preemption agreement cases on 2 ranks (gloo), ONE launch.

Usage: ``torchrun --standalone --nproc-per-node 2 cases_preemption.py OUT.json``. Rank 0
writes ``{"cases": {name: {"stopped": [per rank], "signum": [per rank]} | {"error": ...}}}``.

Each case runs a loop of 10 "steps" that polls :meth:`PreemptionHandler.requested` once per
step, as the training loop does, with real signals sent by a rank to itself.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist

from megatron_ext.training.preemption import PreemptionHandler

STEPS = 10


def _loop(signals: dict[int, tuple[int, int]]) -> dict:
    """``signals[rank] = (step, signum)``: that rank signals itself before that step's poll."""
    rank = dist.get_rank()
    stopped, signum = None, 0
    with PreemptionHandler() as handler:
        for step in range(1, STEPS + 1):
            if rank in signals and signals[rank][0] == step:
                os.kill(os.getpid(), signals[rank][1])
            if handler.requested():
                stopped, signum = step, handler.signum
                break
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (stopped, signum))
    return {"stopped": [g[0] for g in gathered], "signum": [g[1] for g in gathered]}


CASES = {
    "no_signal": lambda: _loop({}),
    "usr1_on_rank1_only": lambda: _loop({1: (4, signal.SIGUSR1)}),
    "term_on_rank0_only": lambda: _loop({0: (7, signal.SIGTERM)}),
    "both_same_step": lambda: _loop({0: (2, signal.SIGUSR1), 1: (2, signal.SIGTERM)}),
}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    t0 = time.perf_counter()
    results: dict = {}
    for name, case in CASES.items():
        try:
            results[name] = case()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    if dist.get_rank() == 0:
        payload = {"cases": results, "seconds": round(time.perf_counter() - t0, 2)}
        out.write_text(json.dumps(payload, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
