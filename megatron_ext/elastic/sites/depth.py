"""The ``depth`` axis: how many layers are kept, the top-ranked ones by layer importance.

A choice is a layer count; the layers kept are ``StripeLayout.layer_order[:depth]`` (the
ranking of :mod:`megatron_ext.elastic.depth`). Compute: :mod:`megatron_ext.elastic.
layers_depth` (a skipped layer is the identity on the residual stream: masked, it runs and
is gated; narrow, it is not run) and :mod:`megatron_ext.elastic.layers_stack` (a pipeline
stage passes full-width tensors between stages). Slicing drops a skipped layer and renumbers
the kept ones ``decoder.layers.0..`` in layer order; the pattern shortens to theirs. Cost:
every per-layer term counts the kept layers of its kind (``CostModel.layers``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from megatron.core.ssm.mamba_block import MambaStack
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor, nn

from megatron_ext.elastic.depth import kept_pattern
from megatron_ext.elastic.layers_depth import ElasticLayerMixin
from megatron_ext.elastic.layers_stack import ElasticStackMixin
from megatron_ext.elastic.sites.base import DEPTH, Axis, Site, Step
from megatron_ext.elastic.sites.tensors import kept_positions, renumbering
from megatron_ext.errors import require

if TYPE_CHECKING:
    from megatron_ext.elastic.controller import ElasticController

LAYERS = Axis(DEPTH, "num_layers", None, width=False)

_LAYER = re.compile(r"^(?P<head>decoder\.layers\.)(?P<i>\d+)(?P<tail>\..*)$")


class DepthSite(Site):
    """The layer count."""

    name = "depth"
    axes = (LAYERS,)
    hf_names = {
        "nemotron_h": {"pattern": "layers_block_type"},
        "llama": {"pattern": "num_hidden_layers"},
    }
    nemo_names = {"pattern": "hybrid_override_pattern"}

    def convert_model(self, model: nn.Module, ctrl: ElasticController) -> Iterator[Step]:
        """A pipeline stage's stack: full width at its boundaries."""
        decoder: Any = model.decoder
        if isinstance(decoder, MambaStack) and not (decoder.pre_process and decoder.post_process):
            yield decoder, ElasticStackMixin, {}

    def convert_layer(
        self, layer: nn.Module, index: int, ctrl: ElasticController, where: str
    ) -> Iterator[Step]:
        """The layer itself: skipped or gated by its global ``index``."""
        context = isinstance(layer, TransformerLayer)
        yield layer, ElasticLayerMixin, {"elastic_index": index, "elastic_context": context}

    def global_mask(self, axis, n, width, stripes, group) -> Tensor:
        """The layers ``stripes.layer_order`` ranks first, ``width`` of them."""
        mask = torch.zeros(n, dtype=torch.bool)
        mask[stripes.kept_layers(width, n)] = True
        return mask

    def check_axis(self, axis: Axis, choices: list[int], model, hint: str = "") -> None:
        """The first choice is every layer; each keeps at least one layer of every kind.

        The layer ranking keeps the most important layer of each kind first
        (:func:`megatron_ext.elastic.depth.layer_order`), so a depth of at least the number of
        layer kinds keeps every kind the model has.
        """
        where = f"elastic.axes.{DEPTH}"
        require(
            choices[0] == model.num_layers,
            where,
            f"first choice {choices[0]} must be every layer, len(model.pattern)="
            f"{model.num_layers}; start the list with {model.num_layers}" + hint,
        )
        kinds = len(set(model.pattern))
        require(
            choices[-1] >= kinds,
            where,
            f"choice {choices[-1]} would drop a whole layer kind: model.pattern "
            f"{model.pattern!r} has {kinds} kinds, keep at least {kinds} layers",
        )

    def sliced_fields(self, model, widths: Mapping[str, int], stripes: Any) -> dict[str, Any]:
        """The kept layers' pattern."""
        depth = widths.get(DEPTH, model.num_layers)
        kept = stripes.kept_layers(depth, model.num_layers)
        return {"pattern": kept_pattern(model.pattern, kept)}

    def slice_rename(self, masks: Mapping[str, Tensor]) -> Callable[[str], str | None] | None:
        """Kept layers renumbered in layer order; a skipped layer's keys gone."""
        return renumbering(_LAYER, "i", kept_positions(masks[DEPTH]))
