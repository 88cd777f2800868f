"""The benchmark suite: seven ratios, each of two things measured in the same run.

Usage: python bench/suite.py [--device DEVICE] [--hidden 512] [--reps 7] ...

Writes bench/results.json (every ratio with its target, pass/miss, the raw medians, the
model and the device) and bench/RESULTS.md (the table), and prints the table. Timed cases
are interleaved (A, B, A, B, ...) and every figure is a median over repetitions. On the CPU
the model is fp32; on an accelerator (``--device`` of another type) it is bf16.

The model (``suite_models``) is a hybrid with Mamba, attention, dense MLP and MoE layers;
its budgets are L (full), M (about half the active parameters) and S (about a third).
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from suite_decode import decode_speed  # noqa: E402
from suite_io import checkpoint_sizes, slice_write  # noqa: E402
from suite_memory import CASES as MEMORY_CASES  # noqa: E402
from suite_models import Workload, bench_elastic, bench_model, describe  # noqa: E402
from suite_report import Ratio, markdown  # noqa: E402
from suite_train import build, forward_breakdown, step_cases  # noqa: E402

from megatron_ext.benchmark import device_description, interleaved, load_average  # noqa: E402
from megatron_ext.compat.engine import apply_engine_shims  # noqa: E402
from megatron_ext.compat.optional import default_device  # noqa: E402
from megatron_ext.elastic.controller import ElasticController, StripeLayout  # noqa: E402
from megatron_ext.elastic.cost import CostModel, CostSpec  # noqa: E402
from megatron_ext.elastic.slicing import sliced_config  # noqa: E402
from megatron_ext.models.params import count_parameters  # noqa: E402
from megatron_ext.parallel import ParallelConfig, init_distributed  # noqa: E402

HERE = Path(__file__).resolve().parent


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=str(default_device()), help="default: the project's")
    p.add_argument("--hidden", type=int, default=512, help="model width (multiple of 64)")
    p.add_argument("--batch", type=int, default=8, help="training sequences per step")
    p.add_argument("--seq", type=int, default=256, help="training sequence length")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per case")
    p.add_argument("--io-reps", type=int, default=5, help="repetitions of the slice write")
    p.add_argument("--io-hidden", type=int, default=1024, help="model width of the slice write")
    p.add_argument("--decode-batch", type=int, default=8, help="sequences decoded at once")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per row")
    p.add_argument("--decode-reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--out", type=Path, default=HERE / "results.json", help="RESULTS.md goes beside it"
    )
    return p.parse_args()


def _log(message: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_ratios(cfg, elastic, batch, pgs, device, reps) -> tuple[list[Ratio], dict]:
    """Ratios 1 and 2 from one interleaved run of every training-step case."""
    setup = step_cases(cfg, elastic, batch, pgs, device)
    _log(f"training steps: {len(setup.cases)} cases x {reps} reps")
    t = interleaved(setup.cases, reps, device, warmup=1, progress=_log)
    _log("forward time by layer kind")
    breakdown = forward_breakdown(setup, batch, reps=3)
    med = {name: s.median for name, s in t.items()}
    mid = elastic.budgets[1].name
    costs = CostModel(cfg, CostSpec(kind="active_params"))
    frac = float(costs(elastic.widths_for(mid, cfg))) / costs.full()
    ratios = [
        Ratio(
            "1",
            "elastic step at full budget ÷ plain megatron-core step "
            "(teacher decoder forward excluded)",
            med["elastic_full"] / med["plain"],
            "<=",
            1.10,
        ),
        Ratio(
            "1b",
            "elastic step at full budget, teacher forward included ÷ plain step",
            med["elastic_full_teacher"] / med["plain"],
        ),
        Ratio(
            "2",
            f"elastic step at budget {mid} ({frac:.0%} active params), narrow ÷ at full budget",
            med["elastic_mid_narrow"] / med["elastic_full"],
            "<=",
            0.65,
        ),
        Ratio(
            "2b",
            "same, masked compute ÷ full (what narrow compute saves)",
            med["elastic_mid_masked"] / med["elastic_full"],
        ),
        Ratio(
            "7",
            "training engine step (megatron DDP, distributed optimizer, schedule) ÷ the same "
            "step as a plain torch AdamW loop, 1 rank",
            med["plain"] / med["legacy"],
            "<=",
            1.05,
        ),
        Ratio(
            "2c",
            f"plain step of the standalone {mid} slice ÷ plain step (all axes narrow: the bound)",
            med["plain_mid_slice"] / med["plain"],
        ),
    ]
    cpu = {name: s.median_cpu for name, s in t.items()}
    detail = {
        "mid_budget_active_fraction": frac,
        "forward_seconds_by_layer_kind": breakdown,
        "steps": {name: s.as_dict() for name, s in t.items()},
        "cpu_time_ratios": {
            "1": cpu["elastic_full"] / cpu["plain"],
            "7": cpu["plain"] / cpu["legacy"],
            "2": cpu["elastic_mid_narrow"] / cpu["elastic_full"],
        },
    }
    return ratios, detail


def memory_ratio(args, dtype: str, teacher_weights: int) -> tuple[list[Ratio], dict]:
    """Ratio 6: peak memory of each case, each in a fresh process.

    With glibc, allocations from 64 KiB up are mapped on their own there and go back to the
    system when freed, so the CPU's peak RSS follows the live tensors, not heap fragmentation.
    """
    out = {}
    for case in MEMORY_CASES:
        cmd = [sys.executable, str(HERE / "suite_memory.py"), case]
        cmd += ["--hidden", str(args.hidden), "--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--device", args.device, "--dtype", dtype]
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode:
            raise RuntimeError(f"memory probe {case} failed:\n{done.stderr[-3000:]}")
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        out[case] = probe | {"used_bytes": probe["peak_bytes"] - probe["base_bytes"]}
        _log(f"memory {case}: {out[case]['used_bytes'] / 2**20:.0f} MiB above the start")
    used = {case: out[case]["used_bytes"] for case in out}
    ratios = [
        Ratio(
            "6", "peak memory: elastic training ÷ plain training", used["elastic"] / used["plain"]
        ),
        Ratio(
            "6b",
            "peak memory: elastic training without the teacher ÷ plain training",
            used["elastic_replay"] / used["plain"],
        ),
    ]
    teacher = used["elastic"] - used["elastic_replay"]
    return ratios, {
        "probes": out,
        "teacher_bytes": teacher,
        "teacher_weight_bytes": teacher_weights,
    }


def optimizer_state_ratio(args) -> tuple[list[Ratio], dict]:
    """Ratio 7b: optimizer-state bytes per rank at DP=2 (ZeRO-1) ÷ at DP=1, CPU fp32."""
    out = {}
    for nproc in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", str(nproc), str(HERE / "suite_optimizer.py")]
        cmd += ["--hidden", str(args.hidden), "--batch", str(args.batch), "--seq", str(args.seq)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(
                f"optimizer-state probe at DP={nproc} failed:\n{done.stderr[-3000:]}"
            )
        out[nproc] = json.loads(done.stdout.strip().splitlines()[-1])
        _log(f"optimizer state at DP={nproc}: {out[nproc]['bytes_per_rank']} bytes per rank")
    ratio = max(out[2]["bytes_per_rank"]) / out[1]["bytes_per_rank"][0]
    desc = "optimizer-state bytes per rank, DP=2 ÷ DP=1 (distributed optimizer, largest rank)"
    return [Ratio("7b", desc, ratio, "<=", 0.55)], {"dp1": out[1], "dp2": out[2]}


def param_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``HybridModelConfig.params_dtype`` name."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def main() -> None:
    """Run every section and write the results."""
    args = _args()
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, cpu = torch.device(args.device), torch.device("cpu")
    if device.type != "cpu" and device.type != default_device().type:
        sys.exit(
            f"--device {device}: not available here (the default device is {default_device()})"
        )
    dtype = "float32" if device.type == "cpu" else "bfloat16"
    load = {"start": load_average()}
    apply_engine_shims()
    pgs = init_distributed(ParallelConfig())
    cfg = bench_model(args.hidden, dtype)
    elastic = bench_elastic(cfg)
    elastic.validate_for(cfg, ParallelConfig())
    batch = Workload(args.batch, args.seq).make(cfg.vocab_size, device)
    ratios, details = [], {}

    r, details["train"] = train_ratios(cfg, elastic, batch, pgs, device, args.reps)
    ratios += r
    counts = count_parameters(build(cfg, pgs, cpu), cfg, pgs)
    weights = counts.total * torch.finfo(param_dtype(dtype)).bits // 8
    r, details["memory"] = memory_ratio(args, dtype, weights)
    ratios += r
    _log("optimizer state per rank at DP=1 and DP=2")
    r, details["optimizer_state"] = optimizer_state_ratio(args)
    ratios += r

    mid = elastic.widths_for(elastic.budgets[1].name, cfg)
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
        _log("checkpoint sizes")
        sizes = checkpoint_sizes(build(cfg, pgs, cpu), cfg, elastic, Path(tmp) / "sizes", pgs)
        _log(f"slice write at hidden {args.io_hidden}")
        io_cfg = bench_model(args.io_hidden, dtype)
        io_widths = bench_elastic(io_cfg).widths_for(elastic.budgets[1].name, io_cfg)
        ctrl = ElasticController(io_cfg, StripeLayout())
        write = slice_write(
            build(io_cfg, pgs, cpu), ctrl, io_widths, Path(tmp) / "write", pgs, args.io_reps, cpu
        )
    write["hidden"] = args.io_hidden
    details["slice_write"], details["checkpoints"] = write, sizes
    ratios += [
        Ratio(
            "3",
            f"slice write ÷ copy of the same bytes with fsync (hidden {args.io_hidden})",
            write["over_copy_fsync"],
            "<=",
            2.0,
        ),
        Ratio("3b", "slice write ÷ plain copy (page cache only, not durable)", write["over_copy"]),
    ]
    _log("decode")
    parent = build(cfg, pgs, cpu)
    dec = decode_speed(
        parent,
        cfg,
        mid,
        pgs,
        device,
        batch=args.decode_batch,
        prompt=32,
        new_tokens=args.decode_tokens,
        reps=args.decode_reps,
    )
    details["decode"] = dec
    ratios += [
        Ratio(
            "4",
            "slice decode tokens/s ÷ (full tokens/s × full ÷ slice active params)",
            dec["ratio"],
            ">=",
            0.9,
        ),
        Ratio(
            "4b",
            f"same, each model decoding {dec['warm_block_steps']} steps in a row (warm caches)",
            dec["warm_ratio"],
        ),
        Ratio(
            "4c",
            "elastic checkpoint decoding at the slice's widths (narrow) ÷ the slice, tokens/s",
            dec["elastic_narrow_over_slice"],
        ),
        Ratio(
            "5",
            "elastic checkpoint bytes ÷ parent checkpoint bytes",
            sizes["elastic_over_parent"],
            "<=",
            1.01,
        ),
        Ratio(
            "5b",
            "elastic checkpoint bytes ÷ sum of separate per-budget checkpoints",
            sizes["elastic_over_separate"],
        ),
    ]
    ratios.sort(key=lambda x: x.id)
    load["end"] = load_average()
    result = {
        "device": str(device),
        "device_name": device_description(device),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "model": describe(cfg) | {"params": counts.total, "active_params": counts.active},
        "budgets": {b.name: elastic.widths_for(b.name, cfg) for b in elastic.budgets},
        "mid_slice": describe(sliced_config(cfg, mid)),
        "workload": {"batch": args.batch, "seq_length": args.seq, "reps": args.reps},
        "load_average": load,
        "ratios": [x.as_dict() for x in ratios],
        "details": details,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.out.with_name("RESULTS.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
