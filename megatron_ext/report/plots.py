"""The report's PNG plots (matplotlib, Agg backend): grouped bars over budgets or pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def grouped_bars(
    ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[float | None]]
) -> None:
    """One cluster of bars per group, one bar per series (a ``None`` value draws nothing)."""
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        xs = [j + offset for j, v in enumerate(values) if v is not None]
        ys = [float(v) for v in values if v is not None]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=8)


def plot_budget_control(
    tables: Mapping[str, Mapping[str, Mapping[str, Any]]], pairs: Sequence[str], path: str | Path
) -> Path:
    """PNG: exact-match accuracy and mean latency per (think → answer) pair, per model source.

    ``tables[source][pair]`` holds ``accuracy`` (``None`` when not scored) and ``latency_s``.
    """
    plt = _pyplot()
    fig, (acc_ax, lat_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    accuracy = {s: [t.get(p, {}).get("accuracy") for p in pairs] for s, t in tables.items()}
    scored = {s: v for s, v in accuracy.items() if any(a is not None for a in v)}
    grouped_bars(acc_ax, pairs, scored)
    if not scored:
        acc_ax.text(0.5, 0.5, "no reference answers: not scored", ha="center", va="center")
    acc_ax.set_ylim(0, 1.05)
    acc_ax.set_ylabel("exact-match accuracy")
    acc_ax.set_xlabel("think budget -> answer budget")
    grouped_bars(
        lat_ax,
        pairs,
        {s: [t.get(p, {}).get("latency_s") for p in pairs] for s, t in tables.items()},
    )
    lat_ax.set_ylabel("latency per prompt (s)")
    lat_ax.set_xlabel("think budget -> answer budget")
    fig.suptitle("budget control: think at one budget, answer at another")
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points no other point beats on both, by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_frontier(tables: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path) -> Path:
    """PNG: accuracy against latency per (think → answer) pair and source, Pareto line drawn.

    ``tables[source][pair]`` holds ``accuracy`` and ``latency_s``; unscored pairs are left out.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for (source, table), marker in zip(tables.items(), "osD^v"):
        names = [p for p, v in table.items() if v.get("accuracy") is not None]
        points = [(float(table[p]["latency_s"]), float(table[p]["accuracy"])) for p in names]
        if not points:
            continue
        dots = ax.scatter([x for x, _ in points], [y for _, y in points], marker=marker)
        for name, (x, y) in zip(names, points):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = [points[i] for i in pareto_front(points)]
        ax.plot([x for x, _ in front], [y for _, y in front], color=dots.get_facecolor()[0])
        dots.set_label(source)
    if not ax.collections:
        ax.text(0.5, 0.5, "no reference answers: not scored", ha="center", va="center")
    ax.set_xlabel("latency per prompt (s)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("accuracy-latency frontier of the think -> answer pairs")
    return _save(fig, path)


def plot_quantization(
    budgets: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    path: str | Path,
    title: str = "quantization: unquantized vs PTQ vs QAD",
) -> Path:
    """PNG: held-out loss per budget for the unquantized model and each format's PTQ / QAD."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    grouped_bars(ax, budgets, series)
    values = [float(v) for vs in series.values() for v in vs if v is not None]
    if values:
        low, high = min(values), max(values)
        pad = 0.1 * (high - low) + 1e-3
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("budget")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    return _save(fig, path)


def plot_checkpoint_sizes(
    slice_bytes: Mapping[str, int], elastic_bytes: Mapping[str, int], path: str | Path
) -> Path:
    """PNG: the separate slices' bytes stacked, beside the elastic checkpoint's bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    bottom = 0.0
    for name, size in slice_bytes.items():
        ax.bar(0, size / 1e6, bottom=bottom, label=f"slice {name}")
        bottom += size / 1e6
    for i, size in enumerate(elastic_bytes.values(), start=1):
        ax.bar(i, size / 1e6, color="gray", alpha=0.5 + 0.4 * (i % 2))
    labels = ["separate slices", *elastic_bytes]
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("MB on disk")
    ax.set_title("one elastic checkpoint vs one checkpoint per budget")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_throughput(
    budgets: Sequence[str], series: Mapping[str, Sequence[float | None]], path: str | Path
) -> Path:
    """PNG: decode tokens/s per budget, one bar per model source (slice, elastic)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    grouped_bars(ax, budgets, series)
    ax.set_xlabel("budget")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title("standalone slices vs the elastic checkpoint")
    return _save(fig, path)


def plot_comparison(
    groups: Sequence[str],
    loss: Mapping[str, Sequence[float | None]],
    accuracy: Mapping[str, Sequence[float | None]],
    path: str | Path,
    title: str,
) -> Path:
    """Two panels of grouped bars over ``groups``: held-out loss and task accuracy."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    grouped_bars(left, groups, loss)
    left.set_ylabel("held-out loss (nats/token)")
    grouped_bars(right, groups, accuracy)
    right.set_ylabel("task accuracy (exact match)")
    fig.suptitle(title)
    return _save(fig, path)
