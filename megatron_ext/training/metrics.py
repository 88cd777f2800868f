"""Logging helpers of the training loops: interval averages and progress bars for log files.

:class:`IntervalMetrics` collects every step's scalar metrics and, at each logging step,
gives their means over the steps since the last log (a key only counts the steps that had
it, so ``kd/S`` is the mean over the steps that sampled budget ``S``) plus ``tokens_per_s``
over the interval's training time.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm

NON_TERMINAL_REFRESH_S = 60.0
"""Seconds between progress-bar refreshes when stderr is not a terminal (Slurm ``.out``)."""


class IntervalMetrics:
    """Sums of scalar metrics since the last :meth:`flush`, with tokens and seconds."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self.tokens = 0
        self.seconds = 0.0

    def add(self, metrics: Mapping[str, Any], *, tokens: int = 0, seconds: float = 0.0) -> None:
        """Record one step: its numeric metrics (others ignored), tokens and training time."""
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
                self._counts[key] = self._counts.get(key, 0) + 1
        self.tokens += tokens
        self.seconds += seconds

    def flush(self) -> dict[str, float]:
        """The interval's means (and ``tokens_per_s``); starts the next interval."""
        out = {key: total / self._counts[key] for key, total in self._sums.items()}
        if self.seconds > 0:
            out["tokens_per_s"] = self.tokens / self.seconds
        self.__init__()  # type: ignore[misc]
        return out


def progress_bar(*, total: int, initial: int, desc: str, disable: bool) -> tqdm:
    """A tqdm bar that refreshes at most once a minute when stderr is not a terminal."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=disable,
        dynamic_ncols=interactive,
        mininterval=0.1 if interactive else NON_TERMINAL_REFRESH_S,
        maxinterval=10.0 if interactive else NON_TERMINAL_REFRESH_S,
    )
