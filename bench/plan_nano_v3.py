"""The Nano v3 memory plan of ``curriculum=star_elastic``, on a cluster shape that fits and on
one that does not. Writes bench/plan_nano_v3.txt (the README's table comes from it).

The shapes set the engine's fields (precision, recompute, distributed optimizer, global batch)
on the composed train-elastic config's plan inputs; the same figures come from
``star-elastic plan model=nano_v3 curriculum=star_elastic cluster=slurm ...`` with those
fields given as overrides.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import dataclasses
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from megatron_ext.config.compose import compose_recipe  # noqa: E402
from megatron_ext.models.config import ConfigError  # noqa: E402
from megatron_ext.plan.budget import check_fits, plan_memory  # noqa: E402
from recipes.plan import plan_inputs, render  # noqa: E402

HERE = Path(__file__).resolve().parent
ENGINE = dict(precision="bf16", recompute="selective", distributed_optimizer=True)
SHAPES = {
    "fits: 8 nodes x 8 GPUs (80 GiB), TP 2, EP 8, PP 4, DP 8, micro-batch 1, global batch 8": dict(
        nproc=64, tp=2, ep=8, pp=4, micro_batch_size=1, global_batch_size=8
    ),
    "does not fit: 1 node x 8 GPUs (80 GiB), TP 2, EP 4, PP 1, DP 4, micro-batch 1": dict(
        nproc=8, tp=2, ep=4, pp=1, micro_batch_size=1, global_batch_size=4
    ),
    "does not fit: the first shape with global batch 64 (8 micro-batches in flight)": dict(
        nproc=64, tp=2, ep=8, pp=4, micro_batch_size=1, global_batch_size=64
    ),
}


def main() -> None:
    cfg = compose_recipe(
        "train_elastic", ["model=nano_v3", "curriculum=star_elastic", "cluster=slurm"]
    )
    base = plan_inputs(cfg, "train-elastic")
    out = []
    for title, shape in SHAPES.items():
        inp = dataclasses.replace(base, kd_chunk_size=1024, gpu_memory_gb=80, **ENGINE, **shape)
        plans = plan_memory(inp)
        try:
            check_fits(inp, plans)
            verdict = "fits"
        except ConfigError as err:
            verdict = f"refused: {err}"
        out += [f"## {title}", render(inp, plans), verdict, ""]
    text = "\n".join(out)
    (HERE / "plan_nano_v3.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
