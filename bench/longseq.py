"""Bounded-memory distillation and the memory planner, as ratios measured in one run.

Usage: python bench/longseq.py [--quick]. Writes bench/longseq.json. Three ratios:

1. peak memory of the KD loss (output layers of student and teacher + KD, forward and
   backward) at sequence 8192 over sequence 1024, chunked (target <= 1.5) and, for contrast,
   on whole logits (about 8). Peaks are live tensor bytes (megatron_ext.plan.meter), counted
   above the inputs (hidden states, output weights), so freed-but-kept heap does not blur them.
2. time of one chunked KD step over one whole-logit KD step at sequence 1024 (target <= 1.10);
   A/B interleaved repetitions, median.
3. the planner's predicted peak over the measured peak of a real train-elastic step
   (megatron_ext.plan.measure), worst case over sequence 256..4096, hidden 128..512, with and
   without full recompute (target 0.85..1.15); pipeline parallelism is not measured here.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from megatron_ext.distill import kd_loss  # noqa: E402
from megatron_ext.distill_chunked import OutputHead, chunked_distill_loss  # noqa: E402
from megatron_ext.models.config import HybridModelConfig  # noqa: E402
from megatron_ext.parallel import ParallelConfig, init_distributed  # noqa: E402
from megatron_ext.plan.budget import PlanInputs, StageLength, plan_memory  # noqa: E402
from megatron_ext.plan.measure import measure_elastic_step  # noqa: E402
from megatron_ext.plan.meter import LiveTensorMeter  # noqa: E402

HERE = Path(__file__).resolve().parent
VOCAB, HIDDEN, CHUNK = 4096, 128, 512


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


def _full_recompute(model: torch.nn.Module) -> None:
    """Every decoder layer's forward through a checkpoint (keeps only the layer's input)."""
    for layer in model.decoder.layers:
        forward = layer.forward

        def run(hidden_states, *args, _forward=forward, **kwargs):
            def body(h):
                return _forward(h, *args, **kwargs)

            return torch.utils.checkpoint.checkpoint(body, hidden_states, use_reentrant=False)

        layer.forward = run


def planner_ratios(quick: bool) -> dict:
    pgs = init_distributed(ParallelConfig())
    shapes = [(128, 256), (512, 256), (256, 1024), (128, 4096)]
    if not quick:
        shapes += [(512, 1024), (256, 4096)]
    rows = []
    for hidden, seq in shapes:
        for recompute in ("none", "full"):
            cfg = HybridModelConfig(hidden_size=hidden, ffn_hidden_size=2 * hidden)
            hook = _full_recompute if recompute == "full" else None
            measured = measure_elastic_step(cfg, seq, 1, 256, pgs, recompute=hook)
            plan = plan_memory(
                PlanInputs(
                    model=cfg,
                    stages=[StageLength("s", seq, steps=1)],
                    kd_chunk_size=256,
                    recompute=recompute,
                )
            )[0]
            rows.append(
                {
                    "hidden": hidden,
                    "seq": seq,
                    "recompute": recompute,
                    "measured_bytes": measured,
                    "predicted_bytes": plan.total(0),
                    "ratio": plan.total(0) / measured,
                }
            )
            print(rows[-1], flush=True)
    ratios = [r["ratio"] for r in rows]
    worst = max(ratios, key=lambda r: abs(r - 1))
    return {"planner_rows": rows, "planner_predicted_over_measured_worst": worst}


def main(quick: bool) -> None:
    torch.set_num_threads(1)
    out = {**memory_ratios(), **time_ratio(3 if quick else 7), **planner_ratios(quick)}
    (HERE / "longseq.json").write_text(json.dumps(out, indent=1))
    for key in (
        "kd_peak_8192_over_1024_chunked",
        "kd_peak_8192_over_1024_whole",
        "kd_step_chunked_over_whole_seq1024",
        "planner_predicted_over_measured_worst",
    ):
        print(f"{key}: {out[key]:.3f}")


if __name__ == "__main__":
    main("--quick" in sys.argv[1:])
