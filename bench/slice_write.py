"""Slice write time ÷ plain copy time of the same bytes, at a size where data dominates.

Usage: python bench/slice_write.py [HIDDEN] (default 1024). Builds a hybrid model with random
weights at TP=1, slices budget S of conf/elastic/tiny.yaml scaled to that width, and times
(a) ``save_slice`` (select + build + torch_dist save + fsync + manifest) against (b) a plain
``cp -r`` of the written files and (c) the same copy followed by fsync. Interleaved A/B
repetitions, median reported. Writes bench/slice_write.json.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from suite_io import copy_tree, tree_bytes  # noqa: E402
from suite_models import bench_model  # noqa: E402

from megatron_ext.elastic.controller import ElasticController, StripeLayout  # noqa: E402
from megatron_ext.elastic.slicing import save_slice  # noqa: E402
from megatron_ext.models.builder import build_model  # noqa: E402
from megatron_ext.models.params import count_parameters  # noqa: E402
from megatron_ext.parallel import ParallelConfig, init_distributed  # noqa: E402

HERE = Path(__file__).resolve().parent
REPS = 3


def _timed_copy(src: Path, dst: Path, fsync: bool) -> float:
    t0 = time.perf_counter()
    copy_tree(src, dst, fsync)
    return time.perf_counter() - t0


def main() -> None:
    hidden = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    cfg = bench_model(hidden)
    widths = {
        "embedding": hidden // 2,
        "ffn": 2 * hidden,
        "attn_heads": cfg.num_attention_heads // 2,
        "mamba_heads": cfg.mamba_num_heads // 2,
        "moe_experts": 4,
        "moe_ffn": hidden // 2,
    }
    pgs = init_distributed(ParallelConfig())
    model = build_model(cfg, ParallelConfig(), pgs).eval()
    ctrl = ElasticController(cfg, stripes=StripeLayout())
    writes, copies, synced = [], [], []
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
        for rep in range(REPS):
            out = Path(tmp) / f"s{rep}"
            t0 = time.perf_counter()
            path = save_slice(model, widths, out, pgs, controller=ctrl)
            writes.append(time.perf_counter() - t0)
            copies.append(_timed_copy(path, Path(tmp) / f"c{rep}", fsync=False))
            synced.append(_timed_copy(path, Path(tmp) / f"f{rep}", fsync=True))
        size = tree_bytes(path)
    w, c, f = (statistics.median(x) for x in (writes, copies, synced))
    result = {
        "model": cfg.name,
        "params": count_parameters(model, cfg, pgs).total,
        "slice_bytes": size,
        "write_over_copy": w / c,
        "write_over_copy_fsync": w / f,
        "target": 2.0,
        "device": "cpu",
        "repetitions": REPS,
    }
    (HERE / "slice_write.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
