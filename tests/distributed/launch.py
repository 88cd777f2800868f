"""Run a file of distributed cases once under torchrun (2 ranks, gloo) and read its results.

Each torchrun start costs several seconds, so every case script runs all of its cases in one
launch and writes ``{"cases": {...}, "seconds": ...}`` as JSON (rank 0) to the path it is given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The checkout: case scripts import helpers of the ``tests`` package, as the suite does."""


def run_cases(script: Path, out_dir: Path, nproc: int = 2, timeout: int = 600) -> dict:
    """Launch ``script`` on ``nproc`` local ranks and return its results plus the wall time."""
    out = out_dir / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), str(script), str(out)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    data = json.loads(out.read_text())
    data["launch_wall_s"] = wall
    print(f"{script.name}: {wall:.1f} s wall, cases {data.get('seconds')} s")
    return data


def case(results: dict, name: str) -> dict:
    """One case's result; a case that raised on a rank reports its error here."""
    result = results["cases"][name]
    assert "error" not in result, result["error"]
    return result
