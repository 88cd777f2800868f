"""The per-budget figures of a PTQ / QAD run: table rows and a plot."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

HEADERS = [
    "budget",
    "ref loss",
    "PTQ loss",
    "QAD loss",
    "PTQ gap",
    "QAD gap",
    "recovery",
    "PTQ KL",
    "QAD KL",
]


def budget_rows(figures: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    """One table row per budget, in :data:`HEADERS` order ('-' where QAD did not run).

    The KL columns are the held-out KD loss from the teacher (the QAD objective)."""
    rows = []
    for name, f in figures.items():
        qad = f.get("qad_loss")
        rows.append(
            [
                name,
                f["ref_loss"],
                f["ptq_loss"],
                "-" if qad is None else qad,
                f["ptq_loss"] - f["ref_loss"],
                "-" if qad is None else qad - f["ref_loss"],
                "-" if f.get("recovery") is None else f["recovery"],
                "-" if f.get("ptq_kd") is None else f["ptq_kd"],
                "-" if f.get("qad_kd") is None else f["qad_kd"],
            ]
        )
    return rows


def plot_quant_budgets(
    figures: Mapping[str, Mapping[str, Any]], path: str | Path, title: str
) -> Path:
    """PNG: held-out loss per budget, one bar each for unquantized, PTQ and QAD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures)
    series = [("ref_loss", "unquantized"), ("ptq_loss", "PTQ"), ("qad_loss", "QAD")]
    series = [
        (k, label) for k, label in series if all(figures[n].get(k) is not None for n in names)
    ]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    width = 0.8 / max(1, len(series))
    for i, (key, label) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [float(figures[n][key]) for n in names], width, label=label)
    low = min(float(figures[n][k]) for n in names for k, _ in series)
    high = max(float(figures[n][k]) for n in names for k, _ in series)
    ax.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("budget")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
