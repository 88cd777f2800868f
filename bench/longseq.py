"""Bounded-memory distillation and the memory planner, as ratios measured in one run.

Usage: python bench/longseq.py [--quick]. Writes bench/longseq.json (it starts torchrun with
2 ranks itself for the pipeline-parallel rows). Three ratios:

1. peak memory of the KD loss (output layers of student and teacher + KD, forward and
   backward) at sequence 8192 over sequence 1024, chunked (target <= 1.5) and, for contrast,
   on whole logits (about 8). Peaks are live tensor bytes (megatron_ext.plan.meter), counted
   above the inputs (hidden states, output weights), so freed-but-kept heap does not blur them.
2. time of one chunked KD step over one whole-logit KD step at sequence 1024 (target <= 1.10);
   A/B interleaved repetitions, median.
3. the planner's predicted peak over the measured peak of a real train-elastic step
   (megatron_ext.plan.measure), worst case over sequence 256..4096, hidden 128..512, with and
   without full recompute (the engine's own, megatron_ext.training.recompute), at PP=1 and at
   PP=2 (target 0.85..1.15). At PP=2 every stage is measured on its own rank (2 ranks over
   gloo, 2 micro-batches per step: the first stage holds both in flight under 1F1B, the last
   stage one, plus the teacher's final hidden states of both and the KD) and compared with
   the planner's figure for that stage.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_ext.compat import ensure_compat  # noqa: E402
from megatron_ext.compat.engine import apply_engine_shims  # noqa: E402
from megatron_ext.distill import kd_loss  # noqa: E402
from megatron_ext.distill_chunked import OutputHead, chunked_distill_loss  # noqa: E402
from megatron_ext.models.config import HybridModelConfig  # noqa: E402
from megatron_ext.parallel import ParallelConfig, init_distributed  # noqa: E402
from megatron_ext.plan.budget import PlanInputs, StageLength, plan_memory  # noqa: E402
from megatron_ext.plan.measure import measure_elastic_step, measure_pipeline_step  # noqa: E402
from megatron_ext.plan.meter import LiveTensorMeter  # noqa: E402
from megatron_ext.training.recompute import apply_recompute  # noqa: E402

HERE = Path(__file__).resolve().parent
VOCAB, HIDDEN, CHUNK = 4096, 128, 512
PLAN_CHUNK = 256  # the KD chunk of the planner's validation steps
PP_MICROBATCHES = 2


def _heads(gen: torch.Generator):
    w = (0.05 * torch.randn(VOCAB, HIDDEN, generator=gen)).requires_grad_()
    wt = 0.05 * torch.randn(VOCAB, HIDDEN, generator=gen)
    return w, wt


def kd_step(seq: int, chunked: bool, gen: torch.Generator, metered: bool) -> float:
    """One KD forward + backward on [seq, 1, HIDDEN] hidden states.

    Returns the live-tensor peak above the inputs (``metered``), else the seconds it took.
    """
    w, wt = _heads(gen)
    h = torch.randn(seq, 1, HIDDEN, generator=gen).requires_grad_()
    ht = torch.randn(seq, 1, HIDDEN, generator=gen)
    meter = LiveTensorMeter()
    meter.add_existing([w, wt, h, ht])
    base = meter.current
    t0 = time.perf_counter()
    with meter if metered else contextlib.nullcontext():
        if chunked:
            student = OutputHead(lambda x: x @ w.t(), (w,))
            teacher = OutputHead(lambda x: x @ wt.t(), ())
            loss, _, _ = chunked_distill_loss(h, ht, student, teacher, chunk_size=CHUNK)
        else:
            logits = h @ w.t()
            with torch.no_grad():
                t_logits = ht @ wt.t()
            loss = kd_loss(logits, t_logits)
        loss.backward()
    seconds = time.perf_counter() - t0
    return float(meter.peak - base) if metered else seconds


def memory_ratios() -> dict:
    gen = torch.Generator().manual_seed(0)
    peaks = {(s, c): kd_step(s, c, gen, True) for s in (1024, 8192) for c in (True, False)}
    return {
        "kd_peak_bytes": {
            f"seq{s}_{'chunked' if c else 'whole'}": v for (s, c), v in peaks.items()
        },
        "kd_peak_8192_over_1024_chunked": peaks[(8192, True)] / peaks[(1024, True)],
        "kd_peak_8192_over_1024_whole": peaks[(8192, False)] / peaks[(1024, False)],
    }


def time_ratio(reps: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    times: dict[bool, list[float]] = {True: [], False: []}
    kd_step(1024, True, gen, False)  # warm-up
    kd_step(1024, False, gen, False)
    for _ in range(reps):
        for chunked in (True, False):  # interleaved
            times[chunked].append(kd_step(1024, chunked, gen, False))
    chunked, whole = statistics.median(times[True]), statistics.median(times[False])
    return {
        "kd_step_s_chunked": chunked,
        "kd_step_s_whole": whole,
        "kd_step_chunked_over_whole_seq1024": chunked / whole,
    }


def _recompute_hook(recompute: str):
    """The engine's own recompute (megatron's ``tensor_parallel.checkpoint`` per layer)."""
    if recompute == "none":
        return None
    return lambda model: apply_recompute(model, recompute)


def _row(cfg, seq, recompute, pp, stage, measured, plan) -> dict:
    predicted = plan.total(stage)
    row = {
        "hidden": cfg.hidden_size,
        "seq": seq,
        "recompute": recompute,
        "pp": pp,
        "pp_stage": stage,
        "measured_bytes": measured,
        "predicted_bytes": predicted,
        "ratio": predicted / measured,
    }
    print(row, flush=True)
    return row


def planner_rows(quick: bool) -> list[dict]:
    """PP=1: one process, every shape, with and without full recompute."""
    pgs = init_distributed(ParallelConfig())
    shapes = [(128, 256), (512, 256), (256, 1024), (128, 4096)]
    if not quick:
        shapes += [(512, 1024), (256, 4096)]
    rows = []
    for hidden, seq in shapes:
        for recompute in ("none", "full"):
            cfg = HybridModelConfig(hidden_size=hidden, ffn_hidden_size=2 * hidden)
            hook = _recompute_hook(recompute)
            measured = measure_elastic_step(cfg, seq, 1, PLAN_CHUNK, pgs, recompute=hook)
            plan = plan_memory(
                PlanInputs(
                    model=cfg,
                    stages=[StageLength("s", seq, steps=1)],
                    kd_chunk_size=PLAN_CHUNK,
                    recompute=recompute,
                )
            )[0]
            rows.append(_row(cfg, seq, recompute, 1, 0, measured, plan))
    return rows


def pipeline_worker(quick: bool, out: Path) -> None:
    """One rank of the PP=2 rows (under torchrun): measure this stage, gather on rank 0."""
    parallel = ParallelConfig(nproc=2, pp=2)
    pgs = init_distributed(parallel)
    stage = pgs.pp.rank()
    shapes = [(128, 256), (256, 1024)]
    if not quick:
        shapes += [(512, 256), (128, 2048)]
    rows = []
    for hidden, seq in shapes:
        for recompute in ("none", "full"):
            cfg = HybridModelConfig(hidden_size=hidden, ffn_hidden_size=2 * hidden)
            measured = measure_pipeline_step(
                cfg, parallel, seq, 1, PP_MICROBATCHES, PLAN_CHUNK, pgs, _recompute_hook(recompute)
            )
            plan = plan_memory(
                PlanInputs(
                    model=cfg,
                    stages=[StageLength("s", seq, steps=1)],
                    nproc=2,
                    pp=2,
                    global_batch_size=PP_MICROBATCHES,
                    kd_chunk_size=PLAN_CHUNK,
                    recompute=recompute,
                )
            )[0]
            rows.append(_row(cfg, seq, recompute, 2, stage, measured, plan))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        out.write_text(json.dumps([r for part in gathered for r in part]))


def pipeline_rows(quick: bool) -> list[dict]:
    """PP=2: start 2 ranks over gloo (torchrun) and read their rows back."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", "2", __file__, "--pp-worker", str(out)]
        cmd += ["--quick"] if quick else []
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def planner_ratios(quick: bool) -> dict:
    rows = planner_rows(quick) + pipeline_rows(quick)

    def worst(sel: list[dict]) -> float:
        return max((r["ratio"] for r in sel), key=lambda r: abs(r - 1))

    return {
        "planner_rows": rows,
        "planner_predicted_over_measured_worst": worst(rows),
        "planner_predicted_over_measured_worst_pp2": worst([r for r in rows if r["pp"] == 2]),
    }


def main(quick: bool) -> None:
    torch.set_num_threads(1)
    ensure_compat()
    apply_engine_shims()
    out = {**memory_ratios(), **time_ratio(3 if quick else 7), **planner_ratios(quick)}
    (HERE / "longseq.json").write_text(json.dumps(out, indent=1))
    for key in (
        "kd_peak_8192_over_1024_chunked",
        "kd_peak_8192_over_1024_whole",
        "kd_step_chunked_over_whole_seq1024",
        "planner_predicted_over_measured_worst",
        "planner_predicted_over_measured_worst_pp2",
    ):
        print(f"{key}: {out[key]:.3f}")


if __name__ == "__main__":
    if "--pp-worker" in sys.argv:
        torch.set_num_threads(1)
        ensure_compat()
        apply_engine_shims()
        pipeline_worker("--quick" in sys.argv, Path(sys.argv[sys.argv.index("--pp-worker") + 1]))
    else:
        main("--quick" in sys.argv[1:])
