"""The uninterrupted 2-rank runs of the SIGKILL suite, one torchrun launch for all of them.

``python -m torch.distributed.run --nproc-per-node 2 cases_whole_runs.py <out.json>``; the runs
are read from ``inputs.json`` beside ``out.json``: ``{"runs": {name: {"recipe", "overrides"}}}``.
Each runs the recipe's ``run`` in these processes, as ``star-elastic <recipe> <overrides>``
does on its ranks, into ``<out dir>/<name>``; megatron's groups are rebuilt for the next run
(the world is kept: a torchrun start costs several seconds). The fault cases compare their
killed-and-resumed command-line runs with these, bit for bit.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch.distributed as dist  # noqa: E402

from megatron_ext.compat.engine import apply_engine_shims  # noqa: E402
from megatron_ext.parallel import destroy_distributed  # noqa: E402
from recipes.cli import RECIPES  # noqa: E402
from tests.faults.kill_resume import run_in_process  # noqa: E402


def _keep_world() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def run_one(name: str, spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """``spec["recipe"]`` with ``spec["overrides"]`` into ``<out_dir>/<name>``."""
    module = importlib.import_module(RECIPES[spec["recipe"]][1])
    module.destroy_distributed = _keep_world  # the next run reuses the world
    run_in_process(spec["recipe"], out_dir / name, spec["overrides"])
    return {"run_dir": str(out_dir / name)}


def main(out: Path) -> None:
    apply_engine_shims()
    runs = json.loads((out.parent / "inputs.json").read_text())["runs"]
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for name, spec in runs.items():
        start = time.perf_counter()
        try:
            results[name] = run_one(name, spec, out.parent)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"cases": results, "seconds": time.perf_counter() - t0}))
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
