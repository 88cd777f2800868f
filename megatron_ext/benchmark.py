"""Timing and memory helpers for benchmarks that report ratios measured in one run.

A ratio of two timings is only meaningful when both sides see the same machine state, so
:func:`interleaved` runs the cases in turn (A, B, C, A, B, C, ...) rather than one after
the other, and every figure is the median over repetitions. Each repetition records the
wall-clock time and this process's CPU time: on a shared machine the wall clock also counts
time spent waiting for a core, the CPU time does not (it counts idle-spinning threads).

Peak memory: on an accelerator, the allocator's peak since :func:`reset_peak_memory`; on the
CPU, the process's peak resident set size since then (Linux), which also counts memory the C
allocator keeps after a free, so a CPU measurement is cleanest in a fresh process per case.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)


@dataclass
class Samples:
    """Per-repetition wall-clock and CPU seconds of one case."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median wall-clock seconds."""
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        """Median CPU seconds of this process."""
        return statistics.median(self.cpu)

    def as_dict(self) -> dict[str, object]:
        """Medians and raw samples, for a JSON report."""
        return {
            "median_s": self.median,
            "median_cpu_s": self.median_cpu,
            "wall_s": self.wall,
            "cpu_s": self.cpu,
        }


def time_once(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Run ``fn`` once; return its (wall-clock, CPU) seconds, queued device work included."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    cases: Mapping[str, Callable[[], object]],
    reps: int,
    device: torch.device,
    *,
    warmup: int = 1,
    before: Callable[[], object] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Samples]:
    """Time every case ``reps`` times, interleaved, after ``warmup`` untimed rounds.

    ``before`` runs untimed before every timed call (e.g. flushing the page cache's dirty
    pages, so every write starts from the same state); ``progress`` gets a line per round.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    out = {name: Samples() for name in cases}
    for rep in range(reps):
        for name, fn in cases.items():
            if before is not None:
                before()
            wall, cpu = time_once(fn, device)
            out[name].wall.append(wall)
            out[name].cpu.append(cpu)
        if progress is not None:
            progress(
                f"rep {rep + 1}/{reps}: "
                + ", ".join(f"{n} {s.wall[-1]:.3f}s" for n, s in out.items())
            )
    return out


def block_schedule(names: list[str], steps: int, block: int) -> list[tuple[str, bool]]:
    """The order in which models take ``steps`` steps each, alternating in blocks of ``block``.

    Each entry is ``(name, timed)``. Block ``i`` runs every model for ``block`` consecutive
    steps, in ``names`` order for even ``i`` and reversed for odd ``i``. With ``block == 1`` that
    is per-step interleaving and every step is timed; with larger blocks the first step of
    each block is not timed (the model's first step after another model evicted its cache).
    """
    if block < 1 or steps < 0:
        raise ValueError(f"block must be >= 1 and steps >= 0, got block={block} steps={steps}")
    order: list[tuple[str, bool]] = []
    for index, start in enumerate(range(0, steps, block)):
        count = min(block, steps - start)
        for name in names if index % 2 == 0 else names[::-1]:
            order += [(name, block == 1 or i > 0) for i in range(count)]
    return order


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; ``False`` where that is impossible.

    On an accelerator this resets the allocator's peak. On the CPU it resets the process's
    peak resident set size through ``/proc/self/clear_refs`` (Linux); elsewhere the peak of
    the whole process life stays, and a measurement needs a fresh process.
    """
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5\n")
    except OSError:
        return False
    return True


def peak_memory_bytes(device: torch.device) -> int:
    """Peak bytes: the allocator's peak on an accelerator, the peak RSS on the CPU."""
    if device.type != "cpu" and torch.accelerator.is_available():
        return int(torch.accelerator.max_memory_allocated(device))
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB


def current_memory_bytes(device: torch.device) -> int:
    """Bytes in use now: allocated on an accelerator, resident set size on the CPU."""
    if device.type != "cpu" and torch.accelerator.is_available():
        return int(torch.accelerator.memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


def device_description(device: torch.device) -> str:
    """A human-readable name of ``device``: the accelerator's name, or the CPU model and cores."""
    if device.type != "cpu":
        return str(torch.get_device_module(device).get_device_name(device))
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def load_average() -> float | None:
    """The machine's 1-minute load average (``None`` where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
