"""``parallel.nproc=2`` makes the local launcher start torchrun itself (TP=2 or EP=2, gloo)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("tp2", {"nproc": 2, "tp": 2, "ep": 1, "dp": 1}),
        ("ep2", {"nproc": 2, "tp": 1, "ep": 2, "dp": 2}),
    ],
)
def test_cli_starts_torchrun_for_two_ranks(tmp_path, data_overrides, layout, expected):
    run_dir = tmp_path / layout
    cmd = [
        sys.executable,
        "-m",
        "recipes.cli",
        "train-parent",
        f"parallel={layout}",
        f"run.dir={run_dir}",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.eval_interval=4",
        "train.eval_batches=1",
        "train.micro_batch_size=2",
        "train.seq_length=32",
        "logger=none",
        *data_overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["parallel"] == expected
    assert summary["steps"] == 4
    assert summary["tokens"] == 4 * 2 * 32 * expected["dp"]
