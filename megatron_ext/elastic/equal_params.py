"""Width against depth at equal parameters: a depth-only budget and its width-only twin.

A depth-only budget keeps every width full and drops layers (the lowest-ranked by
``layer_order``); the width-only budget keeps every layer and narrows the width axes.
:func:`equal_params_budgets` picks, among the width choices of ``elastic.axes``, the one
whose parameter count is nearest the depth-only budget's, and refuses a pair further apart
than ``tolerance``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_ext.elastic.config import DEPTH, ElasticConfig
from megatron_ext.elastic.cost import CostModel, CostSpec
from megatron_ext.errors import ConfigError
from megatron_ext.models.config import HybridModelConfig


@dataclass
class EqualParamsPair:
    """A depth-only and a width-only budget, and their parameter counts."""

    depth_only: dict[str, int]
    width_only: dict[str, int]
    depth_params: int
    width_params: int
    full_params: int

    @property
    def mismatch(self) -> float:
        """Relative parameter difference, width-only against depth-only."""
        return abs(self.width_params - self.depth_params) / self.depth_params


def equal_params_budgets(
    elastic: ElasticConfig,
    model: HybridModelConfig,
    layer_order: Sequence[int],
    depth: int,
    tolerance: float = 0.02,
) -> EqualParamsPair:
    """The depth-only budget at ``depth`` layers and the width-only budget nearest its
    parameter count (ties: the first in ``elastic.axes`` order, widest first).

    Raises :class:`ConfigError` when ``depth`` is not a choice of the ``depth`` axis, or no
    width choice comes within ``tolerance`` (relative) of the depth-only count.
    """
    choices = elastic.axes.get(DEPTH, [])
    if depth not in choices or depth == model.num_layers:
        raise ConfigError(
            f"elastic.axes.depth: {depth} must be one of the axis's reduced depths "
            f"{[d for d in choices if d != model.num_layers]}"
        )
    cost = CostModel(model, CostSpec(kind="params"), layer_order)
    full = elastic.full_widths(model)
    depth_only = {**full, DEPTH: depth}
    target = float(cost.params(depth_only))
    axes = [a for a in elastic.axes if a != DEPTH and a in full]
    best: tuple[float, dict[str, int]] | None = None
    for combo in itertools.product(*(elastic.axes[a] for a in axes)):
        widths = {**full, **dict(zip(axes, combo)), DEPTH: model.num_layers}
        gap = abs(float(cost.params(widths)) - target)
        if best is None or gap < best[0]:
            best = (gap, widths)
    assert best is not None
    width_only = best[1]
    pair = EqualParamsPair(
        depth_only,
        width_only,
        round(target),
        round(float(cost.params(width_only))),
        round(float(cost.params(full))),
    )
    if pair.mismatch > tolerance:
        raise ConfigError(
            f"elastic.axes: no width choice has the parameters of depth {depth} "
            f"({pair.depth_params:,}) within {tolerance:.0%}; the nearest "
            f"({pair.width_params:,}) is {pair.mismatch:.1%} away. Add width choices"
        )
    return pair
