"""A real Slurm job of train-parent (2 CPU ranks, TP=2) is preempted, requeued and resumed.

Submitted through the project's own launcher (``star-elastic train-parent cluster=slurm``).
Once the job has written its first checkpoint, ``scancel --signal=USR1 <job>`` signals the
srun step's tasks (both ranks); they agree on the stop, checkpoint after the current step and
exit 75; the batch script runs ``scontrol requeue``; the second start resumes from that
checkpoint and finishes. The final losses must equal, bit for bit, those of the same config
run locally without Slurm or interruption: same weights, optimizer moments, RNG and data
position at the resume point.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slurm

TRAIN = [
    "parallel=tp2",
    "train.steps=80",
    "train.warmup_steps=2",
    "train.micro_batch_size=4",
    "train.seq_length=64",
    "train.eval_interval=20",
    "train.eval_batches=2",
    "train.save_interval=10",
    "train.threads=1",  # the reference and the job must reduce in the same order
    "logger=none",
]
FIRST_CKPT = "iter_0000010"


def _cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "recipes.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _wait(condition, timeout: float, what: str, context) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{context()}")


@pytest.mark.timeout(300)
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(
    slurm, tmp_path, data_overrides
):
    env = dict(slurm.env, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()  # the reference: same config, local torchrun, no interruption
    ref_dir = tmp_path / "reference"
    ref = _cli(["train-parent", *TRAIN, *data_overrides, f"run.dir={ref_dir}"], env, 240)
    assert ref.returncode == 0, ref.stderr[-3000:]
    timings["reference run (local torchrun)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_dir = tmp_path / "slurm run"  # a space in the path: quoted through the script
    args = ["train-parent", *TRAIN, *data_overrides, f"run.dir={run_dir}"]
    args += ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.cpus_per_task=1"]
    args += ["cluster.partition=debug", "cluster.time=10"]
    sub = _cli(args, env, 60)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = re.search(r"submitted batch job (\d+)", sub.stdout).group(1)  # type: ignore[union-attr]
    log = run_dir / "slurm" / f"slurm-{job_id}.out"

    def state() -> dict[str, str]:
        return slurm.job(job_id)

    def context() -> str:
        text = log.read_text(errors="replace").replace("\r", "\n") if log.exists() else ""
        return f"job: {state()}\nlog tail:\n{text[-4000:]}\n{slurm.logs()}"

    first = run_dir / "checkpoints" / FIRST_CKPT
    _wait(lambda: first.is_dir(), 120, f"the job to write {FIRST_CKPT}", context)
    assert state().get("JobState") == "RUNNING", context()
    timings["submit to first checkpoint"] = time.perf_counter() - t0

    t_signal = time.perf_counter()
    slurm.run("scancel", "--signal=USR1", job_id)
    _wait(lambda: state().get("Restarts") == "1", 60, "the requeue", context)
    timings["signal to requeue"] = time.perf_counter() - t_signal
    t_requeue = time.perf_counter()
    _wait(lambda: state().get("JobState") == "COMPLETED", 150, "the job to finish", context)
    timings["requeue to completion"] = time.perf_counter() - t_requeue
    timings["whole Slurm job"] = time.perf_counter() - t0
    print("\n" + "\n".join(f"  {k}: {v:.1f} s" for k, v in timings.items()))

    job = state()
    assert job.get("Restarts") == "1" and job.get("ExitCode") == "0:0", context()
    text = log.read_text(errors="replace").replace("\r", "\n")
    stop = re.search(r"preempted by SIGUSR1 after step (\d+): saved \S.*iter_(\d{7})", text)
    assert stop is not None, context()
    step = int(stop.group(1))
    assert 10 <= step < 80 and int(stop.group(2)) == step
    assert f"requeueing job {job_id}" in text
    assert f"job {job_id} restart 1 on" in text
    assert re.search(rf"resumed from .*iter_{step:07d}\n", text), context()

    whole = json.loads((ref_dir / "summary.json").read_text())
    resumed = json.loads((run_dir / "summary.json").read_text())
    print(
        f"  preempted after step {step}; final train loss {resumed['final_train_loss']!r} "
        f"(uninterrupted {whole['final_train_loss']!r}), held-out {resumed['val_loss']!r} "
        f"(uninterrupted {whole['val_loss']!r})"
    )
    assert resumed["steps"] == whole["steps"] == 80
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    assert resumed["val_loss"] == whole["val_loss"]
    assert resumed["val_curve"] == whole["val_curve"]
