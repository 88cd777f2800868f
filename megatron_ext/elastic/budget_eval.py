"""Per-budget evaluation of an elastic model: held-out loss, cost error, sizes, a plot."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_ext.checkpoint import CheckpointError
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.cost import CostModel
from megatron_ext.run_format import BUDGET_CHOICES, read_json, write_json
from megatron_ext.training.loop import batch_losses, mean_loss


def batch_losses_at(
    model: torch.nn.Module,
    controller: ElasticController,
    widths: Mapping[str, int],
    valid_batches: list[dict],
    pg_collection,
) -> list[float]:
    """Held-out loss of each batch of the elastic ``model`` at ``widths`` (deterministic, no
    gates)."""
    controller.set_gates(None)
    with controller.at(dict(widths)):
        return batch_losses(model, valid_batches, pg_collection)


def evaluate_at(
    model: torch.nn.Module,
    controller: ElasticController,
    widths: Mapping[str, int],
    valid_batches: list[dict],
    pg_collection,
) -> float:
    """Held-out loss of the elastic ``model`` at ``widths``: the mean of
    :func:`batch_losses_at`."""
    return mean_loss(batch_losses_at(model, controller, widths, valid_batches, pg_collection))


def budget_figures(
    elastic: ElasticConfig,
    choices: Mapping[str, Mapping[str, int]],
    cost_models: Mapping[str, CostModel],
) -> dict[str, dict[str, Any]]:
    """Per budget: its widths, params, active params, cost and relative cost error."""
    out = {}
    for budget in elastic.budgets:
        widths = dict(choices[budget.name])
        model = cost_models[budget.kind]
        target = budget.target * model.full()
        cost = float(model(widths))
        out[budget.name] = {
            "target": budget.target,
            "kind": budget.kind,
            "router_choice": widths,
            "params": int(round(float(cost_models["params"](widths)))),
            "active_params": int(round(float(cost_models["active_params"](widths)))),
            "cost": cost,
            "cost_error": abs(cost - target) / target,
        }
    return out


def save_choices(run_dir: str | Path, choices: Mapping[str, Mapping[str, int]]) -> Path:
    """Write the router's final deterministic widths per budget, for ``slice``/``export``."""
    choices_json = {k: dict(v) for k, v in choices.items()}
    return write_json(Path(run_dir) / BUDGET_CHOICES, choices_json, indent=1)


def load_choices(run_dir: str | Path) -> dict[str, dict[str, int]] | None:
    """The widths saved by :func:`save_choices`, or ``None`` when the run has none.

    A file that is not ``{budget: {axis: int}}`` raises :class:`CheckpointError` naming it.
    """
    path = Path(run_dir) / BUDGET_CHOICES
    if not path.is_file():
        return None
    try:
        choices = read_json(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    valid = isinstance(choices, dict) and all(
        isinstance(widths, dict) and all(type(w) is int for w in widths.values())
        for widths in choices.values()
    )
    if not valid:
        raise CheckpointError(f"{path} is corrupt: expected {{budget: {{axis: width}}}}")
    return choices


def plot_budgets(
    figures: Mapping[str, Mapping[str, Any]], parent_loss: float, path: str | Path, title: str
) -> Path:
    """PNG: held-out loss against active parameters, one point per budget, parent as reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    names = list(figures)
    xs = [figures[n]["active_params"] for n in names]
    for key, style, label in (
        ("zero_shot_val_loss", "s--", "zero-shot slice (before elastic training)"),
        ("val_loss", "o-", "after elastic training"),
    ):
        ys = [figures[n].get(key) for n in names]
        if all(y is not None for y in ys):
            ax.plot(xs, [float(y) for y in ys], style, label=label)  # type: ignore[arg-type]
    for name, x, y in zip(names, xs, [figures[n]["val_loss"] for n in names]):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4))
    ax.axhline(parent_loss, color="gray", linewidth=1, label="parent (teacher)")
    ax.set_xlabel("active parameters")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
