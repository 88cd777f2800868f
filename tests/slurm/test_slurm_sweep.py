"""A Hydra multirun sweep on the real Slurm through hydra-submitit-launcher.

``star-elastic-sweep model-info -m hydra/launcher=submitit_slurm model=tiny_hybrid,nano_v3``
submits one Slurm job per point; each job runs the same recipe ``run(cfg)`` and writes its
own ``summary.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slurm


@pytest.mark.timeout(240)
def test_two_job_model_info_sweep_runs_on_slurm_through_submitit(slurm, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra")
    cmd = [sys.executable, "-m", "recipes.sweep", "model-info", "-m"]
    cmd += ["hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1"]
    cmd += ["hydra.launcher.timeout_min=5", "hydra.launcher.partition=debug"]
    cmd += [f"hydra.sweep.dir={tmp_path / 'multirun'}", "model=tiny_hybrid,nano_v3"]
    cmd += [f"run.dir={tmp_path}/runs/${{hydra:job.num}}"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, env=slurm.env, cwd=tmp_path, capture_output=True, text=True, timeout=200
    )
    print(f"\n  2-job submitit sweep: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    models = {}
    for num in (0, 1):
        summary = json.loads((tmp_path / "runs" / str(num) / "summary.json").read_text())
        models[summary["model"]] = summary["params_total"]
    assert set(models) == {"tiny_hybrid", "nano_v3"}
    assert models["nano_v3"] > 1e10 > models["tiny_hybrid"]
    # Both ran as Slurm jobs (submitit's per-job folders hold the Slurm job ids).
    assert len(list((tmp_path / "multirun" / ".submitit").glob("*/*_log.out"))) >= 2
