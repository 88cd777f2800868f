"""Imported Hugging Face checkpoints loaded at TP=2, in ONE 2-rank torchrun launch.

Usage: ``torchrun --standalone --nproc-per-node 2 cases_hf_import.py OUT.json``. The inputs
are in ``OUT.json``'s folder under ``inputs/<case>/``: an imported run (``run/``, written at
TP=1 by ``import_hf``) and ``expected.pt``, ``transformers``' logits of :func:`tokens`.
Rank 0 writes ``{"cases": {case: {"max_abs_diff": ...} | {"error": traceback}}}``.
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

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.models.builder import build_model, causal_mask
from megatron_ext.models.config import load_model_config
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed
from tests.export.hf_tiny import tokens


@torch.no_grad()
def logits_at_tp2(run_dir: Path, parallel: ParallelConfig, pgs) -> torch.Tensor:
    """Full-vocab logits of the imported run, loaded from torch_dist at TP=2 (SP on)."""
    model = build_model(load_model_config(run_dir), parallel, pgs, initialize=False).eval()
    ckpts = CheckpointManager(run_dir / "checkpoints", pgs)
    ckpts.load(ckpts.latest_valid(), model, weights_only=True)
    ids = tokens()
    b, s = ids.shape
    out = model(ids, torch.arange(s)[None].expand(b, s), causal_mask(s)).contiguous()
    parts = [torch.empty_like(out) for _ in range(pgs.tp.size())]
    dist.all_gather(parts, out, group=pgs.tp)
    return torch.cat(parts, dim=-1)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    parallel = ParallelConfig(nproc=2, tp=2, timeout_s=300)
    pgs = init_distributed(parallel)
    results: dict = {}
    for case in sorted(p for p in (out.parent / "inputs").iterdir() if p.is_dir()):
        try:
            got = logits_at_tp2(case / "run", parallel, pgs)
            expected = torch.load(case / "expected.pt")
            results[case.name] = {"max_abs_diff": (got - expected).abs().max().item()}
        except Exception:
            results[case.name] = {"error": traceback.format_exc()}
    if dist.get_rank() == 0:
        payload = {"cases": results, "seconds": round(time.perf_counter() - t0, 2)}
        out.write_text(json.dumps(payload, indent=1))
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
