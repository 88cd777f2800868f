"""The elastic settings: which axes are elastic, their width choices, and the budgets.

One typed dataclass kept beside :class:`HybridModelConfig`, never injected into it.
``__post_init__`` checks what the settings say on their own; :meth:`ElasticConfig.validate_for`
checks them against a model shape and a parallel layout (docs/design.md invariants 2, 3 and 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from megatron_ext.models.config import ConfigError, HybridModelConfig, require
from megatron_ext.parallel import ParallelConfig

AXES: tuple[str, ...] = (
    "embedding",
    "attn_heads",
    "mamba_heads",
    "mamba_head_dim",
    "ffn",
    "moe_experts",
    "moe_ffn",
)
"""Every elastic width axis. A budget keeps a top-ranked prefix along each."""

DEPTH = "depth"
"""The depth axis: a choice is the number of layers kept, the top-ranked ones by the layer
importance recorded in the stripe layout (:mod:`megatron_ext.elastic.depth`); a skipped layer
is the identity on the residual stream."""

ELASTIC_AXES: tuple[str, ...] = (*AXES, DEPTH)
"""Every axis a budget can shrink: the width axes, then depth."""

BUDGET_KINDS: tuple[str, ...] = ("params", "active_params", "memory", "latency")
"""What a budget's ``target`` is a fraction of (in the full model)."""

COMPUTE_MODES: tuple[str, ...] = ("masked", "narrow")
"""How an elastic layer computes: full width times a mask, or on its active components only
(hidden channels, FFN and expert channels, attention heads, Mamba heads and head channels;
inactive experts are masked in both modes and get no tokens either way)."""

# axis -> (model field holding its full width, layer symbol it lives in; None = every model)
AXIS_SOURCE: dict[str, tuple[str, str | None]] = {
    "embedding": ("hidden_size", None),
    "attn_heads": ("num_attention_heads", "*"),
    "mamba_heads": ("mamba_num_heads", "M"),
    "mamba_head_dim": ("mamba_head_dim", "M"),
    "ffn": ("ffn_hidden_size", "-"),
    "moe_experts": ("num_experts", "E"),
    "moe_ffn": ("moe_ffn_hidden_size", "E"),
}


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
                axis in ELASTIC_AXES,
                f"{where}.widths",
                f"unknown axis {axis!r}; known: {ELASTIC_AXES}",
            )
            require(
                _is_int(width) and width > 0,
                f"{where}.widths.{axis}",
                f"{width!r} must be a positive integer",
            )


class _Rule(NamedTuple):
    """A choice ``c`` passes when ``c * mult % mod == 0``; ``why`` says what that means."""

    mult: int
    mod: int
    why: str


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
        widths = {
            axis: getattr(model, attr)
            for axis, (attr, symbol) in AXIS_SOURCE.items()
            if symbol is None or model.has(symbol)
        }
        if DEPTH in self.axes:
            widths[DEPTH] = model.num_layers
        return widths

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
        if DEPTH in self.axes:
            _check_depth(self.axes[DEPTH], model, other_model)
        for axis in self.axes:
            if axis == DEPTH:
                continue
            attr, symbol = AXIS_SOURCE[axis]
            require(
                axis in full,
                f"elastic.axes.{axis}",
                f"model.pattern {model.pattern!r} has no {symbol!r} layers; remove this axis"
                + other_model,
            )
            first = self.axes[axis][0]
            require(
                first == full[axis],
                f"elastic.axes.{axis}",
                f"first choice {first} must be the full width model.{attr}={full[axis]}; "
                f"start the list with {full[axis]}" + other_model,
            )
        for axis, choices in self.axes.items():
            if axis == DEPTH:
                continue
            rules = self._rules(axis, model, parallel)
            step = math.lcm(*(r.mod // math.gcd(r.mult, r.mod) for r in rules))
            for choice in choices:
                for rule in rules:
                    if choice * rule.mult % rule.mod:
                        raise ConfigError(
                            f"elastic.axes.{axis}: choice {choice} {rule.why}; "
                            f"{_fix_hint(step, full[axis])}"
                        )
                if axis == "moe_experts":
                    require(
                        choice >= model.moe_router_topk,
                        "elastic.axes.moe_experts",
                        f"choice {choice} must be >= model.moe_router_topk="
                        f"{model.moe_router_topk} (each token is routed to that many experts)",
                    )

    def _rules(self, axis: str, model: HybridModelConfig, par: ParallelConfig) -> list[_Rule]:
        """The divisibility rules of ``axis`` under ``model`` and ``par``."""
        tp, qb = par.tp, self.quant_block

        def split(what: str) -> _Rule:
            return _Rule(1, tp, f"must be divisible by parallel.tp={tp} ({what} split over TP)")

        def quant(mult: int, width: str, gemm: str) -> _Rule:
            return _Rule(
                mult,
                tp * qb,
                f"gives a per-rank width {width} that is not a multiple of "
                f"elastic.quant_block={qb} (input of {gemm})",
            )

        def whole(groups: int, name: str) -> _Rule:
            why = f"must be a multiple of model.{name}={groups} (equal whole heads per group)"
            return _Rule(1, groups, why)

        kv = model.kv_channels
        head_dims = self.axes.get("mamba_head_dim", [model.mamba_head_dim])
        heads = self.axes.get("mamba_heads", [model.mamba_num_heads])
        table = {
            # replicated across TP: the whole width is the input of every in-projection
            "embedding": [_Rule(1, qb, f"is not a multiple of elastic.quant_block={qb}")],
            "ffn": [split("channels"), quant(1, f"choice/{tp}", "fc2")],
            "moe_ffn": [split("channels"), quant(1, f"choice/{tp}", "the expert fc2")],
            "attn_heads": [
                whole(model.num_query_groups, "num_query_groups"),
                split("query groups"),
                quant(kv, f"choice*kv_channels/tp = choice*{kv}/{tp}", "linear_proj"),
            ],
            "mamba_heads": [whole(model.mamba_num_groups, "mamba_num_groups"), split("groups")]
            + [quant(d, f"choice*{d}/{tp} with mamba_head_dim {d}", "out_proj") for d in head_dims],
            "mamba_head_dim": [
                quant(h, f"{h}*choice/{tp} with mamba_heads {h}", "out_proj") for h in heads
            ],
            "moe_experts": [_Rule(1, par.ep, f"must be divisible by parallel.ep={par.ep}")],
        }
        return table[axis]


def _check_depth(choices: list[int], model: HybridModelConfig, hint: str = "") -> None:
    """Depth choices: the first is every layer; each keeps at least one layer of every kind.

    The layer ranking keeps the most important layer of each kind first
    (:func:`megatron_ext.elastic.depth.layer_order`), so a depth of at least the number of
    layer kinds keeps every kind the model has.
    """
    where = f"elastic.axes.{DEPTH}"
    require(
        choices[0] == model.num_layers,
        where,
        f"first choice {choices[0]} must be every layer, len(model.pattern)={model.num_layers}; "
        f"start the list with {model.num_layers}" + hint,
    )
    kinds = len(set(model.pattern))
    require(
        choices[-1] >= kinds,
        where,
        f"choice {choices[-1]} would drop a whole layer kind: model.pattern "
        f"{model.pattern!r} has {kinds} kinds, keep at least {kinds} layers",
    )


def _check_choices(axis: str, choices: list[int]) -> None:
    """Check one axis's choices on their own: known axis, positive, unique, descending."""
    require(axis in ELASTIC_AXES, "elastic.axes", f"unknown axis {axis!r}; known: {ELASTIC_AXES}")
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
