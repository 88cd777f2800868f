"""The elastic settings: which axes are elastic, their width choices, and the budgets.

One typed dataclass kept beside :class:`HybridModelConfig`, never injected into it.
``__post_init__`` checks what the settings say on their own; :meth:`ElasticConfig.validate_for`
checks them against a model shape and a parallel layout (docs/design.md invariants 2, 3 and 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megatron_ext.elastic.sites import registry
from megatron_ext.elastic.sites.base import DEPTH as DEPTH  # the layer count (sites.depth)
from megatron_ext.models.config import ConfigError, HybridModelConfig, require
from megatron_ext.parallel import ParallelConfig

AXES: tuple[str, ...] = tuple(a.name for a in registry.axes() if a.width)
"""Every elastic width axis (each site's, :mod:`megatron_ext.elastic.sites`). A budget keeps a
top-ranked prefix along each."""

ELASTIC_AXES: tuple[str, ...] = tuple(a.name for a in registry.axes())
"""Every axis a budget can shrink: the width axes, then depth."""

BUDGET_KINDS: tuple[str, ...] = ("params", "active_params", "memory", "latency")
"""What a budget's ``target`` is a fraction of (in the full model)."""

COMPUTE_MODES: tuple[str, ...] = ("masked", "narrow")
"""How an elastic layer computes: full width times a mask, or on its active components only
(hidden channels, FFN and expert channels, attention heads, Mamba heads and head channels;
inactive experts are masked in both modes and get no tokens either way)."""


def elastic_axes() -> tuple[str, ...]:
    """Every axis of the registered sites now (:data:`ELASTIC_AXES` at import)."""
    return tuple(a.name for a in registry.axes())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Budget:
    """One nested submodel: a ``target`` fraction of the full model's cost of kind ``kind``.

    ``widths`` may pin a width per axis (each must be one of that axis's choices); the axes
    it leaves out are chosen later by the router and cost model.
    """

    name: str
    target: float
    kind: str = "params"
    widths: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(
            isinstance(self.name, str) and bool(self.name),
            "elastic.budgets[].name",
            f"must be a non-empty string, got {self.name!r}",
        )
        where = f"elastic.budgets[{self.name}]"
        require(
            isinstance(self.target, (int, float)) and 0.0 < float(self.target) <= 1.0,
            f"{where}.target",
            f"{self.target!r} must be a fraction of the full model in (0, 1]",
        )
        self.target = float(self.target)
        require(
            self.kind in BUDGET_KINDS,
            f"{where}.kind",
            f"{self.kind!r} is not one of {BUDGET_KINDS}",
        )
        self.widths = dict(self.widths)
        for axis, width in self.widths.items():
            require(
                axis in elastic_axes(),
                f"{where}.widths",
                f"unknown axis {axis!r}; known: {elastic_axes()}",
            )
            require(
                _is_int(width) and width > 0,
                f"{where}.widths.{axis}",
                f"{width!r} must be a positive integer",
            )


@dataclass
class ElasticConfig:
    """Elastic axes with their width choices, the budgets, and how elastic layers compute.

    ``axes`` maps an axis name to its width choices: absolute counts, unique, strictly
    descending, the first one the full width. An axis not listed is not elastic.
    ``quant_block`` is the NVFP4 block every width along a GEMM's input must be a multiple
    of (1 turns that rule off); ``router_hidden`` is the hidden width of each axis router.
    """

    axes: dict[str, list[int]]
    budgets: list[Budget]
    compute: str = "masked"
    quant_block: int = 16
    router_hidden: int = 256

    def __post_init__(self) -> None:
        self.axes = {axis: list(choices) for axis, choices in dict(self.axes).items()}
        for axis, choices in self.axes.items():
            _check_choices(axis, choices)
        self.budgets = [b if isinstance(b, Budget) else Budget(**b) for b in self.budgets]
        require(bool(self.budgets), "elastic.budgets", "at least one budget is required")
        names = [b.name for b in self.budgets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        require(not dupes, "elastic.budgets", f"budget names must be unique; repeated: {dupes}")
        for budget in self.budgets:
            for axis, width in budget.widths.items():
                where = f"elastic.budgets[{budget.name}].widths.{axis}"
                require(
                    axis in self.axes,
                    where,
                    f"axis {axis!r} is not elastic; add it to elastic.axes or drop this width",
                )
                require(
                    width in self.axes[axis],
                    where,
                    f"{width} is not one of elastic.axes.{axis} = {self.axes[axis]}",
                )
        require(
            self.compute in COMPUTE_MODES,
            "elastic.compute",
            f"{self.compute!r} is not one of {COMPUTE_MODES}",
        )
        require(
            _is_int(self.quant_block) and self.quant_block >= 1,
            "elastic.quant_block",
            f"{self.quant_block!r} must be an integer >= 1 (16 = NVFP4, 1 = no rule)",
        )
        require(
            _is_int(self.router_hidden) and self.router_hidden >= 1,
            "elastic.router_hidden",
            f"{self.router_hidden!r} must be an integer >= 1",
        )

    def budget(self, name: str) -> Budget:
        """The budget called ``name``; raises :class:`ConfigError` listing the known names."""
        for budget in self.budgets:
            if budget.name == name:
                return budget
        raise ConfigError(
            f"elastic.budgets: no budget named {name!r}; known: {[b.name for b in self.budgets]}"
        )

    def full_widths(self, model: HybridModelConfig) -> dict[str, int]:
        """Full width of every axis whose layer kind exists in ``model`` (``embedding`` always;
        ``depth``, the layer count, when depth is elastic)."""
        return {
            a.name: a.full(model)
            for a in registry.axes()
            if (a.exists(model) if a.width else a.name in self.axes)
        }

    def widths_for(
        self, budget_name: str, model: HybridModelConfig | None = None
    ) -> dict[str, int]:
        """Widths of budget ``budget_name``: its explicit widths, else the full width.

        Every elastic axis is included (its first choice is the full width). With ``model``,
        the non-elastic axes that exist in the model are included at full width too.
        """
        budget = self.budget(budget_name)
        widths = self.full_widths(model) if model is not None else {}
        widths.update({axis: choices[0] for axis, choices in self.axes.items()})
        widths.update(budget.widths)
        return widths

    def validate_for(self, model: HybridModelConfig, parallel: ParallelConfig) -> None:
        """Raise :class:`ConfigError` unless every choice fits ``model`` and ``parallel``.

        Rules: the axis's layer kind exists; the first choice is the full width; heads stay
        whole per query / Mamba group; TP- and EP-split axes split evenly; experts >= top-k;
        and every width along a GEMM's input (per rank, where TP splits it) is a multiple of
        ``quant_block``. Expert FFN channels are split over megatron's expert-TP group, which
        defaults to TP.
        """
        full = self.full_widths(model)
        other_model = (
            f" (an elastic config is made for one model: for model={model.name} choose "
            f"elastic={model.name} where conf/elastic/{model.name}.yaml exists, or write one)"
        )
        # the layer count first: a depth error says more than the widths it would change
        for name in sorted(self.axes, key=lambda a: registry.axis(a).width):
            axis = registry.axis(name)
            registry.site_of_axis(name).check_axis(axis, self.axes[name], model, other_model)
        for name, choices in self.axes.items():
            site = registry.site_of_axis(name)
            rules = site.divisibility(name, model, parallel, self)
            if not rules:
                continue
            step = math.lcm(*(r.mod // math.gcd(r.mult, r.mod) for r in rules))
            for choice in choices:
                for rule in rules:
                    if choice * rule.mult % rule.mod:
                        raise ConfigError(
                            f"elastic.axes.{name}: choice {choice} {rule.why}; "
                            f"{_fix_hint(step, full[name])}"
                        )
                site.check_choice(name, choice, model)


def _check_choices(axis: str, choices: list[int]) -> None:
    """Check one axis's choices on their own: known axis, positive, unique, descending."""
    known = elastic_axes()
    require(axis in known, "elastic.axes", f"unknown axis {axis!r}; known: {known}")
    where = f"elastic.axes.{axis}"
    require(bool(choices), where, "needs at least one choice (the full width)")
    for c in choices:
        require(_is_int(c) and c > 0, where, f"choice {c!r} must be a positive integer")
    dupes = sorted({c for c in choices if choices.count(c) > 1})
    require(not dupes, where, f"choices must be unique; repeated: {dupes}")
    fix = sorted(choices, reverse=True)
    require(
        choices == fix,
        where,
        f"choices {choices} must be strictly descending, full width first; write {fix}",
    )


def _fix_hint(step: int, full: int) -> str:
    """Tell the user which choices would pass."""
    if full % step:
        return f"even the full width {full} is not a multiple of {step}: change the model or tp/ep"
    if step == full:
        return f"only the full width {full} fits here (widths must be multiples of {step})"
    examples = list(range(full - full % step, 0, -step))[:4]
    return f"use multiples of {step}, e.g. {examples}"
