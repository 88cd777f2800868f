"""The benchmark helpers: interleaved timing order, the untimed hook, memory readings."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.benchmark import (
    block_schedule,
    current_memory_bytes,
    device_description,
    interleaved,
    peak_memory_bytes,
    reset_peak_memory,
)

CPU = torch.device("cpu")


def test_cases_run_interleaved_after_warmup_with_the_hook_before_each_timed_call():
    calls: list[str] = []
    cases = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = interleaved(cases, 3, CPU, warmup=1, before=lambda: calls.append("-"))
    assert calls == ["a", "b"] + ["-", "a", "-", "b"] * 3
    assert all(len(s.wall) == len(s.cpu) == 3 for s in out.values())
    assert all(s.median >= 0 and s.median_cpu >= 0 for s in out.values())


def test_interleaved_needs_a_repetition():
    with pytest.raises(ValueError, match="reps"):
        interleaved({"a": lambda: None}, 0, CPU)


def test_cpu_peak_memory_sees_a_large_allocation():
    reset_peak_memory(CPU)
    before = current_memory_bytes(CPU)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = peak_memory_bytes(CPU)
    del block
    assert peak >= before + 60 * 2**20


def test_device_description_names_the_cpu():
    assert "cores" in device_description(CPU)


def test_block_schedule_alternates_blocks_and_skips_each_blocks_first_step():
    assert block_schedule(["a", "b"], 3, 1) == [
        ("a", True),
        ("b", True),
        ("b", True),
        ("a", True),
        ("a", True),
        ("b", True),
    ]
    order = block_schedule(["a", "b"], 5, 3)  # blocks of 3, then the last 2 steps
    assert [n for n, _ in order] == ["a"] * 3 + ["b"] * 3 + ["b"] * 2 + ["a"] * 2
    assert [t for _, t in order] == [False, True, True] * 2 + [False, True] * 2
    assert sum(1 for n, _ in order if n == "a") == 5  # every model takes every step
    with pytest.raises(ValueError, match="block"):
        block_schedule(["a"], 4, 0)
