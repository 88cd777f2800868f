"""Attention heads, narrow: the self-attention computes only its active query heads.

The ``attn_heads`` axis keeps the top heads of every query group (the grouped layout of
:mod:`megatron_ext.elastic.layout`); keys and values, one per query group, stay whole. In
masked compute ``linear_proj`` zeroes the inactive heads' input columns
(:class:`~megatron_ext.elastic.layers_linear.ElasticRowLinearMixin`). In narrow compute the
attention runs upstream's forward with its per-partition head counts set to the active
count for the call: ``linear_qkv`` computes only the active query rows of each group (with
the group's key and value rows, in upstream's interleaved order), the core attention sees
that many heads, and ``linear_proj`` reads only their input columns. Every group keeps the
same number of heads, so upstream's query-to-key/value grouping holds.

Decoding with a static inference context runs narrow too: the KV cache holds one key and
value per query group, which the axis leaves whole. Narrow compute falls back to masked
compute where upstream's layout or kernels would not follow the head count: dynamic
batching and flash decoding, gated attention output, fewer query groups than TP ranks, and
core attention other than megatron's local ``DotProductAttention`` (or its SDPA form,
:class:`~megatron_ext.models.attention.SDPAttention`, which reads the same head counts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import Tensor, nn

from megatron_ext.elastic.layers_base import ElasticMixin
from megatron_ext.elastic.layers_linear import column_linear_on, hidden_cols
from megatron_ext.elastic.shard import Shard
from megatron_ext.models.attention import SDPAttention

if TYPE_CHECKING:
    from megatron_ext.elastic.controller import ElasticController


def qkv_rows(ctrl: ElasticController, shard: Shard, groups: int, head_dim: int, device) -> Tensor:
    """Rows of the local ``linear_qkv`` output that the active heads need, in upstream's order.

    Per local query group: the active query heads' rows, then the group's key and value rows.
    """

    def build() -> Tensor:
        heads = ctrl.local_mask("attn_heads", shard, device).view(groups, -1)
        per_group = heads.shape[1]
        block = (per_group + 2) * head_dim
        dims = torch.arange(head_dim, device=device)
        rows = []
        for g in range(groups):
            active = heads[g].nonzero().flatten()
            rows.append((g * block + active[:, None] * head_dim + dims).flatten())
            rows.append(
                g * block + per_group * head_dim + torch.arange(2 * head_dim, device=device)
            )
        return torch.cat(rows)

    return ctrl.memo(("qkv_rows", shard, groups, head_dim, str(device)), build)


class ElasticQKVLinearMixin(ElasticMixin):
    """``linear_qkv`` that computes only ``elastic_rows`` while its attention runs narrow.

    Setting: ``elastic_rows``, set by the owning attention for the length of a narrow call
    (``None`` otherwise: upstream's forward, unless the hidden input is narrow).
    """

    elastic_fields = ("elastic_rows",)
    elastic_rows: Tensor | None

    def forward(self, x: Tensor, *args, **kwargs):
        """Upstream's forward, or ``F.linear`` on the selected rows (and, with a narrow hidden
        input, the active hidden columns) with upstream's communication."""
        rows = self.elastic_rows
        layer: Any = self
        if rows is None and x.shape[-1] == layer.weight.shape[1]:
            return self.elastic_upstream.forward(self, x, *args, **kwargs)
        ctrl = self.elastic_ctrl

        def narrow() -> tuple[Tensor, Tensor | None]:
            weight, bias = layer.weight, layer.bias
            if rows is not None:
                weight = weight.index_select(0, rows)
                bias = None if bias is None else bias.index_select(0, rows)
            return hidden_cols(ctrl, x, weight), bias

        weight, bias = ctrl.frozen(self, "qkv", (layer.weight, layer.bias), narrow)
        return column_linear_on(self, x, weight, bias)


class ElasticSelfAttentionMixin(ElasticMixin):
    """Self-attention that, in narrow mode, computes only its active query heads.

    Setting: ``elastic_heads``, the shard of query heads this rank holds (its TP group).
    """

    elastic_fields = ("elastic_heads",)
    elastic_heads: Shard

    def elastic_can_narrow(self, args: tuple, kwargs: dict) -> bool:
        """Whether this call can run narrow (see the module docstring for when it cannot)."""
        attn: Any = self
        config = attn.config
        context = kwargs.get("inference_context") or kwargs.get("inference_params")
        return (
            self.elastic_ctrl.is_narrow("attn_heads")
            and len(args) <= 1  # (attention_mask,): everything else by keyword, as upstream
            and (context is None or (context.is_static_batching() and not config.flash_decode))
            and not getattr(config, "attention_output_gate", False)
            and config.num_query_groups >= attn.world_size
            and type(attn.core_attention) in (DotProductAttention, SDPAttention)
        )

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        """Upstream's forward; in narrow mode with the active head count set for the call."""
        if not self.elastic_can_narrow(args, kwargs):
            return self.elastic_upstream.forward(self, hidden_states, *args, **kwargs)
        attn: Any = self
        core: nn.Module = attn.core_attention
        groups, head_dim = attn.num_query_groups_per_partition, attn.hidden_size_per_attention_head
        rows = qkv_rows(
            self.elastic_ctrl, self.elastic_heads, groups, head_dim, hidden_states.device
        )
        heads = rows.numel() // head_dim - 2 * groups
        saved = (
            attn.num_attention_heads_per_partition,
            core.num_attention_heads_per_partition,
            core.hidden_size_per_partition,
        )
        attn.num_attention_heads_per_partition = heads
        core.num_attention_heads_per_partition = heads
        core.hidden_size_per_partition = heads * head_dim
        attn.linear_qkv.elastic_rows = rows
        try:
            return self.elastic_upstream.forward(self, hidden_states, *args, **kwargs)
        finally:
            attn.linear_qkv.elastic_rows = None
            (
                attn.num_attention_heads_per_partition,
                core.num_attention_heads_per_partition,
                core.hidden_size_per_partition,
            ) = saved
