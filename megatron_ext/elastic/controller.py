"""The model-level elastic controller: the active width of every axis, and the masks it implies.

One :class:`ElasticController` is handed to :func:`megatron_ext.elastic.convert.convert_to_elastic`
and kept by every converted layer; nothing is global. Per step the caller sets the widths
(``set_widths``, ``set_full`` or the ``at`` context manager) and each layer asks the controller
for the boolean mask, or the active prefix length, of *its own shard* of an axis.

Two layouts meet here:

* the *stripe* layout the weights were reordered for (``elastic_layout.json``,
  :class:`StripeLayout`): it decides which global positions a width keeps
  (:func:`megatron_ext.elastic.layout.active_mask`);
* the *shard* a module holds, from the module's own process group (:class:`Shard`): megatron
  splits an axis into contiguous blocks, one per rank; the local mask is this rank's block.

Masks are built on the device of the tensor they apply to and cached per
(axis, width, shard, unit, device, dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from megatron_ext.elastic.config import COMPUTE_MODES, DEPTH, ELASTIC_AXES
from megatron_ext.elastic.shard import WHOLE, Shard
from megatron_ext.elastic.sites import registry
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.run_format import read_elastic_layout, write_elastic_layout

T = TypeVar("T")


@dataclass(frozen=True)
class StripeLayout:
    """The TP / EP stripe counts an elastic checkpoint's weights were reordered for, and its
    layer ranking.

    ``ffn`` and ``moe_ffn`` are striped over ``tp`` ranks (expert-TP defaults to TP),
    ``moe_experts`` over ``ep``; the other axes are never striped (docs/design.md invariant 3).
    ``layer_order`` ranks the layers for the ``depth`` axis, most important first (global
    layer indices, 0-based; :func:`megatron_ext.elastic.depth.layer_order`); a depth ``d``
    keeps ``layer_order[:d]``. Empty: no ranking, only the full depth.
    """

    tp: int = 1
    ep: int = 1
    layer_order: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.tp < 1 or self.ep < 1:
            raise ValueError(f"stripe layout needs tp, ep >= 1, got tp={self.tp} ep={self.ep}")
        order = tuple(int(i) for i in self.layer_order)
        if sorted(order) != list(range(len(order))):
            raise ValueError(f"layer_order {list(order)} is not a permutation of the layers")
        object.__setattr__(self, "layer_order", order)

    def stripes(self, axis: str) -> int:
        """How many shards ``axis`` is striped round-robin over."""
        try:
            return registry.axis(axis).shards(self.tp, self.ep)
        except KeyError:
            return 1

    def save(self, directory: str | Path) -> Path:
        """Write ``elastic_layout.json`` (``{"tp": T, "ep": E, "layer_order": [...]}``)."""
        data: dict[str, object] = {"tp": self.tp, "ep": self.ep}
        if self.layer_order:
            data["layer_order"] = list(self.layer_order)
        return write_elastic_layout(directory, data)

    @classmethod
    def load(cls, directory: str | Path) -> StripeLayout:
        """Read ``elastic_layout.json`` from ``directory`` (no ``layer_order``: unranked)."""
        data = read_elastic_layout(directory)
        order = tuple(int(i) for i in data.get("layer_order", ()))
        return cls(tp=int(data["tp"]), ep=int(data["ep"]), layer_order=order)

    def kept_layers(self, depth: int, num_layers: int) -> list[int]:
        """The global indices (ascending) of the layers a depth of ``depth`` keeps."""
        if depth == num_layers:
            return list(range(num_layers))
        if len(self.layer_order) != num_layers:
            raise ValueError(
                f"depth {depth} < {num_layers} layers needs a layer ranking of all "
                f"{num_layers} layers (elastic_layout.json layer_order, written by the "
                f"importance recipe); this layout ranks {len(self.layer_order)}"
            )
        if not 1 <= depth <= num_layers:
            raise ValueError(f"depth must be in [1, {num_layers}], got {depth}")
        return sorted(self.layer_order[:depth])


def model_full_widths(model: HybridModelConfig) -> dict[str, int]:
    """Full width of every elastic axis whose layer kind exists in ``model``, and its depth."""
    return {a.name: a.full(model) for a in registry.axes() if not a.width or a.exists(model)}


def _narrows(axis: str) -> bool:
    """Whether narrow compute slices ``axis`` (``depth``: a skipped layer is not run; the
    experts are masked in both modes, an inactive expert gets no tokens either way)."""
    try:
        return registry.axis(axis).narrow
    except KeyError:
        return False


class ElasticController:
    """Current widths, compute mode and layout that every converted layer reads.

    ``model`` gives the full widths and the per-group head counts (attention heads per query
    group, Mamba heads per Mamba group); ``stripes`` is the reorder layout of the weights.
    Widths not given are full. ``mode`` is ``"masked"`` (full width times a mask) or
    ``"narrow"`` (the axes whose :class:`~megatron_ext.elastic.sites.base.Axis` is ``narrow``
    compute on their active components only).
    """

    def __init__(
        self,
        model: HybridModelConfig,
        stripes: StripeLayout | None = None,
        mode: str = "masked",
        widths: Mapping[str, int] | None = None,
    ) -> None:
        self._cache: dict[tuple, object] = {}
        self.model = model
        self.stripes = stripes or StripeLayout()
        self.full_widths: dict[str, int] = model_full_widths(model)
        self.group_sizes: dict[str, int] = {
            a.name: size
            for a in registry.axes()
            if a.name in self.full_widths and (size := a.group_size(model)) is not None
        }
        self.widths: dict[str, int] = dict(self.full_widths)
        self.soft: dict[str, tuple[Tensor, list[int]]] = {}
        self.mode = "masked"
        self.set_mode(mode)
        # serving: keep the narrowed weights of each budget between calls (see ``frozen``)
        self.keep_narrow_weights = False
        if widths:
            self.set_widths(widths)

    # ---- state ----------------------------------------------------------------------------

    def set_widths(self, widths: Mapping[str, int]) -> None:
        """Set the active width of the axes in ``widths``; every other axis goes to full width.

        Raises ``ValueError`` for an unknown axis, a width outside ``[1, full]``, or one the
        stripe/group layout cannot split evenly.
        """
        new = dict(self.full_widths)
        for axis, width in widths.items():
            if axis not in self.full_widths:
                known = sorted(self.full_widths)
                hint = "" if axis in ELASTIC_AXES else f"; the axes are {ELASTIC_AXES}"
                raise ValueError(f"axis {axis!r} is not in this model (has {known}){hint}")
            full = self.full_widths[axis]
            if not isinstance(width, int) or not 1 <= width <= full:
                raise ValueError(f"width of {axis!r} must be an int in [1, {full}], got {width!r}")
            self._global_mask(axis, width)  # validates the split
            new[axis] = width
        self.widths = new

    def set_full(self) -> None:
        """Every axis at its full width."""
        self.widths = dict(self.full_widths)

    def set_gates(self, gates: Mapping[str, tuple[Tensor, Sequence[int]]] | None = None) -> None:
        """Per axis, the router's straight-through one-hot over the axis's width choices.

        The soft mask of an axis is ``sum_i y_i * mask(choice_i)``: in the forward pass it is
        exactly the chosen 0/1 mask (``y`` is a hard one-hot there), in the backward pass each
        choice's logit receives the activation-gradient product over its own components, so
        what every choice shares cancels and the marginal components decide. ``None`` clears.
        """
        self.soft = {
            axis: (y, [int(c) for c in choices]) for axis, (y, choices) in (gates or {}).items()
        }

    def soft_mask(self, axis: str, shard: Shard = WHOLE, device=None) -> Tensor | None:
        """The soft mask over this shard's positions of ``axis``, or ``None`` when unset."""
        entry = self.soft.get(axis)
        if entry is None:
            return None
        onehot, choices = entry
        key = ("stack", axis, tuple(choices), shard, str(device))
        stack = self._cache.get(key)
        if not isinstance(stack, Tensor):
            stack = torch.stack([self._local(axis, w, shard) for w in choices]).float()
            stack = stack.to(device) if device is not None else stack
            self._cache[key] = stack
        return onehot.to(stack.dtype) @ stack

    def apply_gate(self, x: Tensor, axis: str, shard: Shard = WHOLE, unit: int = 1) -> Tensor:
        """``x`` times the soft mask of ``axis`` on its last dimension (``x`` when unset).

        A narrow input holds only the active local channels; the mask's entries there are used.
        """
        mask = self.soft_mask(axis, shard, x.device)
        if mask is None:
            return x
        if unit > 1:
            mask = mask.repeat_interleave(unit)
        if x.shape[-1] != mask.numel():
            mask = mask[self.local_index(axis, shard, unit, x.device)]
        return x * mask.to(x.dtype)

    def local_index(self, axis: str, shard: Shard = WHOLE, unit: int = 1, device=None) -> Tensor:
        """Indices of this shard's active channels of ``axis`` (each position covers ``unit``)."""
        key = ("index", axis, self.widths[axis], shard, unit, str(device))
        hit = self._cache.get(key)
        if hit is None:
            mask = self.local_mask(axis, shard, device).repeat_interleave(unit)
            hit = mask.nonzero().flatten()
            self._cache[key] = hit
        return hit  # type: ignore[return-value]

    def set_mode(self, mode: str) -> None:
        """Switch between ``"masked"`` and ``"narrow"`` compute."""
        if mode not in COMPUTE_MODES:
            raise ValueError(f"compute mode {mode!r} is not one of {COMPUTE_MODES}")
        self.mode = mode

    @contextmanager
    def at(self, widths: Mapping[str, int], mode: str | None = None) -> Iterator[ElasticController]:
        """Run a block at ``widths`` (and ``mode``), restoring the previous state afterwards."""
        saved = (dict(self.widths), self.mode)
        try:
            self.set_widths(widths)
            if mode is not None:
                self.set_mode(mode)
            yield self
        finally:
            self.widths, self.mode = saved

    # ---- queries --------------------------------------------------------------------------

    def width(self, axis: str) -> int:
        """The active width of ``axis``."""
        return self.widths[axis]

    def is_full(self, axis: str) -> bool:
        """Whether ``axis`` is at full width (an axis absent from the model counts as full)."""
        return axis not in self.widths or self.widths[axis] == self.full_widths[axis]

    def is_narrow(self, axis: str) -> bool:
        """Whether layers on ``axis`` compute on its active components now (narrow, not full)."""
        return self.mode == "narrow" and _narrows(axis) and not self.is_full(axis)

    def global_mask(self, axis: str, width: int | None = None) -> Tensor:
        """Bool mask over the global positions of ``axis`` (CPU) at ``width`` (default: current)."""
        return self._global_mask(axis, self.widths[axis] if width is None else width)

    def local_mask(self, axis: str, shard: Shard = WHOLE, device=None) -> Tensor:
        """Bool mask over this shard's positions of ``axis`` at the current width."""
        return self._local(axis, self.widths[axis], shard, device)

    def _local(self, axis: str, width: int, shard: Shard = WHOLE, device=None) -> Tensor:
        key = ("local", axis, width, shard, str(device))
        hit = self._cache.get(key)
        if hit is None:
            full = self._global_mask(axis, width)
            if full.numel() % shard.count:
                raise ValueError(
                    f"{axis}: {full.numel()} positions do not split into {shard.count} shards"
                )
            hit = full.view(shard.count, -1)[shard.index]
            if device is not None:
                hit = hit.to(device)
            self._cache[key] = hit
        return hit  # type: ignore[return-value]

    def channel_mask(
        self, axis: str, shard: Shard = WHOLE, unit: int = 1, *, device=None, dtype=None
    ) -> Tensor:
        """Float mask over this shard's channels: each position of ``axis`` covers ``unit``."""
        key = ("channels", axis, self.widths[axis], shard, unit, str(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            mask = self.local_mask(axis, shard, device)
            hit = mask.repeat_interleave(unit).to(dtype or torch.float32)
            self._cache[key] = hit
        return hit  # type: ignore[return-value]

    def mask_last_dim(self, x: Tensor, axis: str, shard: Shard = WHOLE, unit: int = 1) -> Tensor:
        """``x`` with the inactive channels of ``axis`` (its last dimension) set to zero.

        With a soft mask set (training), that mask is used: the same 0/1 values forward, and a
        gradient towards every width choice backward.
        """
        if axis in self.soft:
            return self.apply_gate(x, axis, shard, unit)
        if self.is_full(axis):
            return x
        mask = self.channel_mask(axis, shard, unit, device=x.device, dtype=x.dtype)
        if x.shape[-1] != mask.numel():
            return x  # narrow: ``x`` holds only the active channels
        return x * mask

    def memo(self, key: tuple, build: Callable[[], T]) -> T:
        """``build()``, cached under ``key`` plus the current widths (layers' derived indices)."""
        full_key = ("memo", key, tuple(sorted(self.widths.items())))
        hit = self._cache.get(full_key)
        if hit is None:
            hit = build()
            self._cache[full_key] = hit
        return hit  # type: ignore[return-value]

    def frozen(self, owner: object, tag: str, params: Sequence[Tensor | None], build):
        """``build()``: narrowed copies of ``params``, reused while they and the widths stay.

        Only with :attr:`keep_narrow_weights` on and gradients off (serving a budget): one
        decoding step after another then reads the same narrowed weights instead of gathering
        them again. A parameter updated in place (its version counter moves) or other widths
        make a new copy; one copy is kept per (module, tag, widths).
        """
        if not self.keep_narrow_weights or torch.is_grad_enabled():
            return build()
        key = ("frozen", id(owner), tag, tuple(sorted(self.widths.items())))
        versions = tuple(None if p is None else p._version for p in params)
        hit = self._cache.get(key)
        if isinstance(hit, tuple) and hit[0] == versions:
            return hit[1]
        value = build()
        self._cache[key] = (versions, value)
        return value

    def local_prefix_len(self, axis: str, shard: Shard = WHOLE) -> int:
        """Active positions of this shard of ``axis``; they must be the shard's leading ones.

        That holds when the weights are striped for the shard count megatron uses now
        (``StripeLayout`` equal to the run's TP / EP); otherwise a ``ValueError`` says how to
        restripe.
        """
        key = ("prefix", axis, self.widths[axis], shard)
        hit = self._cache.get(key)
        if hit is None:
            mask = self.local_mask(axis, shard)
            count = int(mask.sum())
            if not bool(mask[:count].all()):
                raise ValueError(
                    f"{axis}: the active positions of shard {shard.index}/{shard.count} are not "
                    f"a prefix (weights striped for {self.stripes.stripes(axis)} shards); narrow "
                    "compute needs the weights restriped for this layout "
                    "(layout.restripe_permutation), or use mode='masked'"
                )
            hit = count
            self._cache[key] = hit
        return hit  # type: ignore[return-value]

    def layer_gate(self, index: int, device=None) -> Tensor | None:
        """The soft ``depth`` gate of global layer ``index`` (0-dim), or ``None`` when unset."""
        mask = self.soft_mask(DEPTH, WHOLE, device)
        return None if mask is None else mask[index]

    def layer_kept(self, index: int) -> bool:
        """Whether global layer ``index`` is kept at the current depth."""
        return bool(self._global_mask(DEPTH, self.widths[DEPTH])[index])

    def _global_mask(self, axis: str, width: int) -> Tensor:
        key = ("global", axis, width)
        hit = self._cache.get(key)
        if hit is None:
            n = self.full_widths[axis]
            try:
                site = registry.site_of_axis(axis)
                hit = site.global_mask(axis, n, width, self.stripes, self.group_sizes.get(axis))
            except ValueError as e:
                raise ValueError(f"width {width} of {axis!r} does not fit the layout: {e}") from e
            self._cache[key] = hit
        return hit  # type: ignore[return-value]

    def __repr__(self) -> str:
        changed = {a: w for a, w in self.widths.items() if not self.is_full(a)}
        return f"ElasticController(mode={self.mode!r}, stripes={self.stripes}, widths={changed})"
