"""Budget-feasible width combinations: the configurations a router may choose for a budget.

With ``router.budget_tolerance > 0`` every hard choice of the router, in training and in the
final selection, is its highest-scoring combination of per-axis widths whose cost lies within
that relative distance of the budget's target. The score of a combination is the sum of its
per-axis (scaled, noised) logits, so with one axis and no constraint this is the usual argmax,
and the straight-through gradient is unchanged. Why: the paper's per-axis argmax learns the
budget only through the cost loss; on a coarse width grid (a few choices per axis, as on small
models) the straight-through signal flips between the two lattice points around the target and
the softmax saturates before it settles, so the final argmax may miss the target by a whole
grid step. Restricting the choice to the feasible set keeps every budget on target by
construction, while the router still learns *which* feasible configuration to use.

The set is enumerated once per budget from the cost model (a few thousand combinations on the
tiny model); :data:`MAX_COMBINATIONS` bounds it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.cost import CostModel
from megatron_ext.models.config import ConfigError

MAX_COMBINATIONS = 2_000_000
"""Refuse to enumerate more width combinations than this (use ``budget_tolerance=0``)."""


@dataclass(frozen=True)
class FeasibleSet:
    """The width combinations within tolerance of one target, as choice indices per axis."""

    axes: tuple[str, ...]
    index: Tensor  # (n_feasible, n_axes) long: the choice index of every axis
    rel_error: Tensor  # (n_feasible,) float64: |cost - target| / target

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def best(self, scores: Mapping[str, Tensor]) -> dict[str, int]:
        """The combination maximising the sum of per-axis scores (each ``(n_choices,)``)."""
        total = torch.zeros(len(self), dtype=torch.float64)
        for column, axis in enumerate(self.axes):
            total = total + scores[axis].detach().to(torch.float64)[self.index[:, column]]
        row = self.index[int(total.argmax())]
        return {axis: int(row[column]) for column, axis in enumerate(self.axes)}


def feasible_set(
    choices: Mapping[str, list[int]],
    cost_model: CostModel,
    target_fraction: float,
    tolerance: float,
    *,
    field: str = "router.budget_tolerance",
) -> FeasibleSet:
    """Every combination of ``choices`` whose cost is within ``tolerance`` of the target.

    ``target_fraction`` is relative to the full model's cost. Raises :class:`ConfigError`
    naming ``field`` when no combination qualifies (with the nearest one's error) or when the
    grid is larger than :data:`MAX_COMBINATIONS`.
    """
    axes = tuple(choices)
    sizes = [len(choices[a]) for a in axes]
    n = math.prod(sizes)
    if n > MAX_COMBINATIONS:
        raise ConfigError(
            f"{field}: {n:,} width combinations exceed {MAX_COMBINATIONS:,}; use fewer choices "
            "per axis or set router.budget_tolerance=0 (plain per-axis argmax)"
        )
    target = target_fraction * cost_model.full()
    rows, errors = [], []
    nearest = math.inf
    for combo in itertools.product(*(range(s) for s in sizes)):
        widths = {a: choices[a][i] for a, i in zip(axes, combo)}
        err = abs(float(cost_model(widths)) - target) / target
        nearest = min(nearest, err)
        if err <= tolerance:
            rows.append(combo)
            errors.append(err)
    if not rows:
        raise ConfigError(
            f"{field}: no width combination is within {tolerance:.3g} of the target "
            f"{target_fraction:g} ({cost_model.spec.kind}); the nearest is {nearest:.3g} away. "
            "Widen the tolerance, add width choices, or move the target"
        )
    return FeasibleSet(
        axes=axes,
        index=torch.tensor(rows, dtype=torch.long),
        rel_error=torch.tensor(errors, dtype=torch.float64),
    )


def budget_feasible_sets(
    elastic: ElasticConfig, cost_models: Mapping[str, CostModel], tolerance: float
) -> dict[str, FeasibleSet]:
    """One :class:`FeasibleSet` per budget of ``elastic`` (by name), each of its own kind."""
    return {
        b.name: feasible_set(
            elastic.axes,
            cost_models[b.kind],
            b.target,
            tolerance,
            field=f"elastic.budgets[{i}] (target {b.target}, router.budget_tolerance)",
        )
        for i, b in enumerate(elastic.budgets)
    }
