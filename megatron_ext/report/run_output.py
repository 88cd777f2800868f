"""What a run leaves for people: ``summary.json``, a printed table, and plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_ext import run_format


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` into ``run_dir`` (atomically) and return its path."""
    return run_format.write_summary(run_dir, summary)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned numbers, for the end of a run."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [
        [isinstance(v, (int, float)) and not isinstance(v, bool) for v in row] for row in rows
    ]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line, "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |", line]
    for row, nums in zip(cells, numeric):
        padded = (c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, nums))
        out.append("| " + " | ".join(padded) + " |")
    out.append(line)
    return "\n".join(out)


def key_value_table(title: str, items: dict[str, Any]) -> str:
    """A two-column table of named figures under a title."""
    return f"{title}\n" + format_table(["figure", "value"], list(items.items()))


def plot_loss_curves(
    train: Sequence[tuple[int, float]],
    val: Sequence[tuple[int, float]],
    path: str | Path,
    title: str,
) -> Path:
    """Save a PNG of the training loss and the held-out loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.6, linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out", linewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
