"""What one layer kind owns, for every elastic axis it carries: the :class:`Site` protocol.

A site is the one home of a layer kind (Mamba, attention, MLP, MoE, the residual stream,
depth). For its kind it owns the conversion plan (which module gets which elastic mixin;
the mixins themselves, the masked and narrow compute, are the ``layers_*`` modules it names),
the divisibility rules of its axes, the importance hooks and their reduction, the reorder
permutation, the slicing rules, the cost terms and the names of its model fields in the
Hugging Face and NeMo exports. :mod:`.registry` lists the sites; ``convert``, ``importance``,
``reorder``, ``slicing`` and ``cost`` walk it (ModelOpt's ``DMRegistry`` idea: upstream
class -> what to do with it). Every method has a do-nothing default, so a site writes only
what its kind has.

This module is a leaf of the elastic package: the config and the controller read the axes
through the registry, so nothing here imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Union

from torch import Tensor, nn

from megatron_ext.elastic.layout import active_mask, reorder_permutation
from megatron_ext.errors import require

if TYPE_CHECKING:
    from megatron_ext.elastic.controller import ElasticController
    from megatron_ext.elastic.sites.divisibility import Divisible
    from megatron_ext.models.config import HybridModelConfig
    from megatron_ext.parallel import ParallelConfig

DEPTH = "depth"
"""The depth axis's name (the depth layer class and the controller ask for it by name)."""

Step = tuple[nn.Module, type, dict[str, Any]]
"""One conversion: the module, the elastic mixin it gets, that mixin's per-instance fields."""

Rules = dict[int, Tensor]
"""``{dim: bool mask over that dim}`` of one tensor (slicing keeps the ``True`` positions)."""

Rule = dict[str, Rules]
"""A module's parameter name -> its :data:`Rules`."""

Perms = dict[str, dict[int, Tensor]]
"""``axis -> {layer: permutation}`` (``embedding`` under layer ``-1``)."""

Num = Union[int, float, Tensor]
"""An exact Python number, or a float64 tensor that carries the gradient (cost terms)."""


@dataclass(frozen=True)
class Axis:
    """One elastic axis: where its full width lives and how the layout treats it.

    ``field`` is the :class:`HybridModelConfig` field of its full width, ``symbol`` the layer
    symbol it lives in (``None``: every model has it). ``narrow``: narrow compute slices it.
    ``stripe``: ``"tp"`` / ``"ep"`` when the reorder stripes it round-robin over that many
    ranks. ``group``: ``(heads field, groups field)`` when its positions are ranked within
    groups (whole groups go to TP ranks). ``width``: ``False`` for the layer count (depth).
    """

    name: str
    field: str
    symbol: str | None
    narrow: bool = True
    stripe: str | None = None
    group: tuple[str, str] | None = None
    width: bool = True

    def exists(self, model: HybridModelConfig) -> bool:
        """Whether ``model`` has this axis's layer kind."""
        return self.symbol is None or model.has(self.symbol)

    def full(self, model: Any) -> int:
        """The full width in ``model`` (a ``HybridModelConfig``)."""
        return int(getattr(model, self.field))

    def group_size(self, model: Any) -> int | None:
        """Positions per group (``None``: not grouped); ``model`` may be megatron's config."""
        if self.group is None:
            return None
        heads, groups = (getattr(model, f) for f in self.group)
        return heads // (groups or 1)

    def shards(self, stripe_tp: int, stripe_ep: int) -> int:
        """How many ranks the reorder stripes this axis over."""
        return {"tp": stripe_tp, "ep": stripe_ep}.get(self.stripe or "", 1)


class Scorer(Protocol):
    """What a site's importance hooks get from :class:`megatron_ext.elastic.importance.
    ImportanceScorer`: accumulators, hook registration, the process groups."""

    model: Any
    config: Any
    pgs: Any
    routed: dict[int, Tensor]

    def zeros(self, site: Site, key: tuple[str, int], *shape: int) -> Tensor:
        """A float64 accumulator under ``key`` that ``site.reduce`` turns into scores."""
        ...

    def hook(self, module: nn.Module, fn: Callable, pre: bool = False) -> None:
        """Register a forward (``pre``: forward-pre) hook, removed on exit."""
        ...

    def acc(self, key: tuple[str, int]) -> Tensor | None:
        """The accumulator under ``key`` (``None``: none yet)."""
        ...

    def token_sum(self, t: Tensor) -> Tensor:
        """Sum a per-rank token statistic over every rank that saw other tokens."""
        ...


class Site:
    """One layer kind's home; every method is a no-op until the kind overrides it.

    ``upstream`` are the megatron-core classes of a layer's children this site converts,
    scores and permutes (matched with ``isinstance``, in registry order); the model- and
    layer-level methods serve the kinds that live outside one child (the residual stream,
    depth).
    """

    name: ClassVar[str] = ""
    axes: ClassVar[tuple[Axis, ...]] = ()
    upstream: ClassVar[tuple[type, ...]] = ()
    hf_names: ClassVar[Mapping[str, Mapping[str, str]]] = {}
    """Hugging Face family -> model field -> its ``config.json`` key there."""
    nemo_names: ClassVar[Mapping[str, str]] = {}
    """Model field -> its NeMo 2 ``MambaModelConfig`` field."""

    # ---- conversion plan -------------------------------------------------------------------
    def convert_model(self, model: nn.Module, ctrl: ElasticController) -> Iterator[Step]:
        """Steps for the model-level modules before the layers (embedding, the stack)."""
        return iter(())

    def convert_layer(
        self, layer: nn.Module, index: int, ctrl: ElasticController, where: str
    ) -> Iterator[Step]:
        """Steps for layer ``index`` itself and its own modules (norms)."""
        return iter(())

    def convert(self, module: nn.Module, ctrl: ElasticController, where: str) -> Iterator[Step]:
        """Steps for one layer child of an ``upstream`` class and its submodules."""
        return iter(())

    def convert_model_tail(self, model: nn.Module, ctrl: ElasticController) -> Iterator[Step]:
        """Steps for the model-level modules after the layers (final norm, output layer)."""
        return iter(())

    # ---- the controller ----------------------------------------------------------------------
    def global_mask(self, axis: str, n: int, width: int, stripes: Any, group: int | None) -> Tensor:
        """Bool mask over the ``n`` global positions of ``axis`` that ``width`` keeps under the
        stripe layout ``stripes`` (``group``: positions per group)."""
        return active_mask(n, width, stripes.stripes(axis), group)

    # ---- config ----------------------------------------------------------------------------
    def divisibility(
        self, axis: str, model: HybridModelConfig, par: ParallelConfig, choices: Any
    ) -> list[Divisible]:
        """The divisibility rules of ``axis``; ``choices`` is ``ElasticConfig`` (its axes)."""
        return []

    def check_axis(
        self, axis: Axis, choices: list[int], model: HybridModelConfig, hint: str = ""
    ) -> None:
        """Raise ``ConfigError`` unless ``model`` has the axis's layer kind and the first
        choice is its full width (``hint`` ends each message)."""
        require(
            axis.exists(model),
            f"elastic.axes.{axis.name}",
            f"model.pattern {model.pattern!r} has no {axis.symbol!r} layers; remove this axis"
            + hint,
        )
        full = axis.full(model)
        require(
            choices[0] == full,
            f"elastic.axes.{axis.name}",
            f"first choice {choices[0]} must be the full width model.{axis.field}={full}; "
            f"start the list with {full}" + hint,
        )

    def check_choice(self, axis: str, choice: int, model: HybridModelConfig) -> None:
        """Raise ``ConfigError`` unless one ``choice`` of ``axis`` fits beyond divisibility."""

    def sliced_fields(
        self, model: HybridModelConfig, widths: Mapping[str, int], stripes: Any
    ) -> dict[str, Any]:
        """The sliced config's fields of this site at ``widths`` (its axes' widths)."""
        return {a.field: widths[a.name] for a in self.axes if a.width and a.name in widths}

    # ---- importance ------------------------------------------------------------------------
    def score_layer(
        self, scorer: Scorer, index: int, layer: nn.Module, fed: Collection[str]
    ) -> None:
        """Hooks on layer ``index``'s own modules (norms); ``fed``: its scored children."""

    def score(self, scorer: Scorer, index: int, module: nn.Module) -> None:
        """Hooks on one layer child of an ``upstream`` class."""

    def reduce(self, scorer: Scorer, kind: str, index: int, acc: Tensor) -> dict[str, Tensor]:
        """Global scores ``{axis: tensor}`` of layer ``index`` from this site's accumulator
        ``kind`` (collective; every rank calls it in the same order)."""
        return {}

    # ---- reorder ---------------------------------------------------------------------------
    def permutations(
        self, scores: Mapping[str, dict[int, Tensor]], shape: Any, stripe_tp: int, stripe_ep: int
    ) -> Perms:
        """Permutations of this site's axes present in ``scores``: per layer, the importance
        order striped for the axis's ranks; a grouped axis is ranked within its groups (whole
        groups go to the ``stripe_tp`` ranks)."""
        perms: Perms = {}
        for axis in self.axes:
            if not axis.width or axis.name not in scores:
                continue
            group = axis.group_size(shape)
            shards = stripe_tp if group is not None else axis.shards(stripe_tp, stripe_ep)
            perms[axis.name] = {
                layer: reorder_permutation(s, shards, group_size=group)
                for layer, s in sorted(scores[axis.name].items())
            }
        return perms

    def finish_permutations(self, perms: Perms) -> None:
        """Adjust ``perms`` of every axis in place once all are computed."""

    def permute_model(self, model: Any, emb: Tensor | None) -> None:
        """Reorder the model-level weights of this kind."""

    def permute_layer(self, layer: Any, emb: Tensor | None, fed: Collection[str]) -> None:
        """Reorder layer-level weights (norms) of this kind; ``fed``: its reordered children."""

    def permute(
        self, module: Any, get: Callable[[str], Tensor | None], emb: Tensor | None, gated: bool
    ) -> None:
        """Reorder one ``upstream`` child's weights; ``get(axis)`` is that layer's permutation."""

    # ---- slicing ---------------------------------------------------------------------------
    def slice_rules(self, masks: Mapping[str, Tensor], model: HybridModelConfig) -> dict[str, Rule]:
        """Rules by generic module name (layer and expert index removed); ``masks`` has every
        axis of the model (``embedding`` always)."""
        return {}

    def slice_rename(self, masks: Mapping[str, Tensor]) -> Callable[[str], str | None] | None:
        """Where a full-model state-dict key lands in the slice (``None``: dropped)."""
        return None

    # ---- cost ------------------------------------------------------------------------------
    def params(self, cost: Any, w: Mapping[str, Num]) -> Num:
        """Parameters of this kind at widths ``w`` (routed experts apart)."""
        return 0

    def routed_params(self, cost: Any, w: Mapping[str, Num], active: bool) -> Num:
        """Parameters of the routed experts of this kind: all, or (``active``) those one
        token visits."""
        return 0

    def cache_bytes(self, cost: Any, w: Mapping[str, Num]) -> Num:
        """Inference-cache bytes of this kind (KV cache, SSM state)."""
        return 0

    def sequence_macs(self, cost: Any, w: Mapping[str, Num]) -> Num:
        """Multiply-accumulates per sequence beyond ``params x tokens`` (attention scores)."""
        return 0


def check_width(what: str, got: int, ctrl: ElasticController, axis: str) -> None:
    """Raise ``ValueError`` unless a module's width ``got`` along ``axis`` is the controller's."""
    full = ctrl.full_widths.get(axis)
    if full != got:
        raise ValueError(
            f"{what} has {got} along {axis!r} but the controller's model says {full}; "
            "build the controller from the model's own HybridModelConfig"
        )
