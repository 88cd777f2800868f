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
    "± 2 SE",
    "PTQ KL",
    "QAD KL",
]


def budget_rows(figures: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    """One table row per budget, in :data:`HEADERS` order ('-' where QAD did not run).

    *± 2 SE* is the recovery that twice the paired standard error of QAD's change over the
    held-out batches would give: a recovery within it is no measurable change. The KL columns
    are the held-out KD loss from the teacher (the QAD objective)."""
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
                recovery_noise(f),
                "-" if f.get("ptq_kd") is None else f["ptq_kd"],
                "-" if f.get("qad_kd") is None else f["qad_kd"],
            ]
        )
    return rows


def recovery_noise(figures: Mapping[str, Any]) -> float | str:
    """``2 * qad_change_se / |PTQ gap|``: the recovery a change of two paired standard errors
    gives ('-' where QAD, its standard error or the gap is missing)."""
    se, gap = figures.get("qad_change_se"), figures["ptq_loss"] - figures["ref_loss"]
    return "-" if se is None or abs(gap) < 1e-6 else 2 * se / abs(gap)


TASK_HEADERS = ["budget", "prompts", "ref accuracy", "PTQ accuracy", "QAD accuracy", "recovery"]


def task_rows(figures: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    """One row per budget that has task figures (``qad_train.task_prompts``), in
    :data:`TASK_HEADERS` order ('-' where QAD, or the recovery, is undefined)."""
    rows = []
    for name, f in figures.items():
        task = f.get("task")
        if not task:
            continue
        qad = task.get("qad")
        recovery = task.get("recovery")
        rows.append(
            [
                name,
                task["ref"]["total"],
                task["ref"]["accuracy"],
                task["ptq"]["accuracy"],
                "-" if qad is None else qad["accuracy"],
                "-" if recovery is None else recovery,
            ]
        )
    return rows


def plot_quant_budgets(
    figures: Mapping[str, Mapping[str, Any]], path: str | Path, title: str
) -> Path:
    """PNG: held-out loss per budget, one bar each for unquantized, PTQ and QAD (those every
    budget has), drawn by :func:`megatron_ext.report.plots.plot_quantization`."""
    from megatron_ext.report.plots import plot_quantization

    names = list(figures)
    series = {
        label: [figures[n][key] for n in names]
        for key, label in (("ref_loss", "unquantized"), ("ptq_loss", "PTQ"), ("qad_loss", "QAD"))
        if all(figures[n].get(key) is not None for n in names)
    }
    return plot_quantization(names, series, path, title=title)
