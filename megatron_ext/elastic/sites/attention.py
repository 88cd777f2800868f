"""Attention layers: the ``attn_heads`` axis (query heads, ranked within their query group).

Compute: :mod:`megatron_ext.elastic.layers_attention` (masked: the input of ``linear_proj``
per head; narrow: the ``self_attention`` computes only the active query heads). Importance:
``sum_{b,l} ||o_h||_2`` per head, ``o_h`` the head's slice of the attention output (the input
of ``linear_proj``). Key/value heads are the query groups, which the axis does not change.

Tensors: ``linear_qkv`` rows ``[q heads of g, k, v]`` blocks of ``kv_channels`` per group
``g``, ``linear_proj`` columns per head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from megatron.core.transformer.attention import Attention
from torch import Tensor, nn

from megatron_ext.elastic.layers_attention import ElasticQKVLinearMixin, ElasticSelfAttentionMixin
from megatron_ext.elastic.shard import Shard
from megatron_ext.elastic.sites import linear
from megatron_ext.elastic.sites.base import Axis, Num, Rule, Scorer, Site, Step, check_width
from megatron_ext.elastic.sites.divisibility import Divisible, quant_block, tp_split, whole_groups
from megatron_ext.elastic.sites.tensors import all_gather, all_reduce, token_rows

if TYPE_CHECKING:
    from megatron_ext.elastic.controller import ElasticController

HEADS = Axis(
    "attn_heads", "num_attention_heads", "*", group=("num_attention_heads", "num_query_groups")
)


class AttentionSite(Site):
    """Self-attention query heads."""

    name = "attention"
    axes = (HEADS,)
    upstream = (Attention,)
    hf_names = {f: {"num_attention_heads": "num_attention_heads"} for f in ("nemotron_h", "llama")}
    nemo_names = {"num_attention_heads": "num_attention_heads"}

    def convert(self, module: nn.Module, ctrl: ElasticController, where: str) -> Iterator[Step]:
        """The attention, its fused QKV projection and its output projection (per head)."""
        attn: Any = module
        check_width("self_attention", attn.config.num_attention_heads, ctrl, "attn_heads")
        shard = Shard.of(attn.tp_group)
        heads = ("attn_heads", shard, attn.hidden_size_per_attention_head)
        yield attn, ElasticSelfAttentionMixin, {"elastic_heads": shard}
        yield attn.linear_qkv, ElasticQKVLinearMixin, {"elastic_rows": None}
        yield linear.row(attn.linear_proj, heads)

    def divisibility(self, axis, model, par, choices) -> list[Divisible]:
        """Whole heads per query group, groups split over TP, ``linear_proj``'s per-rank
        input a multiple of the quantization block."""
        tp, qb, kv = par.tp, choices.quant_block, model.kv_channels
        return [
            whole_groups(model.num_query_groups, "num_query_groups"),
            tp_split(tp, "query groups"),
            quant_block(kv, tp, qb, f"choice*kv_channels/tp = choice*{kv}/{tp}", "linear_proj"),
        ]

    def score(self, scorer: Scorer, index: int, module: nn.Module) -> None:
        """``sum ||o_h||_2`` per head at ``linear_proj``'s input."""
        attn: Any = module
        heads = attn.num_attention_heads_per_partition
        acc = scorer.zeros(self, ("attn_heads", index), heads)

        def hook(_m, args):
            o = token_rows(args[0])
            acc.add_(o.view(o.shape[0], heads, -1).norm(dim=-1).sum(0))

        scorer.hook(attn.linear_proj, hook, pre=True)

    def reduce(self, scorer: Scorer, kind: str, index: int, acc: Tensor) -> dict[str, Tensor]:
        """Gathered over TP (heads are TP-split), summed over DP."""
        return {"attn_heads": all_reduce(all_gather(acc, scorer.pgs.tp), scorer.pgs.dp)}

    def permute(
        self, module: Any, get: Callable[[str], Tensor | None], emb: Tensor | None, gated: bool
    ) -> None:
        """The hidden side, then query heads within their group (k, v stay)."""
        attn = module
        heads = get("attn_heads")
        if emb is not None:
            linear.permute_cols(attn.linear_qkv, emb)
            linear.permute_rows(attn.linear_proj, emb)
        if heads is None:
            return
        kv = attn.hidden_size_per_attention_head
        groups = attn.num_query_groups_per_partition
        per = attn.num_attention_heads_per_partition // groups
        rows = []
        for g in range(groups):  # [q heads of g, k, v] blocks of kv rows, heads kept in g
            local = heads[g * per : (g + 1) * per] - g * per
            if bool((local < 0).any() or (local >= per).any()):
                raise ValueError(f"attn_heads permutation moves a head out of query group {g}")
            block = torch.cat([local, torch.tensor([per, per + 1])])
            rows.append(g * (per + 2) * kv + linear.blocks(block, kv))
        linear.permute_rows(attn.linear_qkv, torch.cat(rows))
        linear.permute_cols(attn.linear_proj, linear.blocks(heads, kv))

    def slice_rules(self, masks: Mapping[str, Tensor], model) -> dict[str, Rule]:
        """The kept query heads' rows of ``linear_qkv`` and columns of ``linear_proj``."""
        if "attn_heads" not in masks:
            return {}
        h, kv = masks["embedding"], model.kv_channels
        heads = masks["attn_heads"].view(model.num_query_groups, -1)  # [groups, per group]
        qkv = torch.ones(heads.shape[0], heads.shape[1] + 2, kv, dtype=torch.bool)
        qkv[:, : heads.shape[1]] = heads[:, :, None]  # [q heads.., k, v] per group
        head_cols = masks["attn_heads"].repeat_interleave(kv)
        return {
            "self_attention.linear_qkv": linear.linear_rule(qkv.reshape(-1), h),
            "self_attention.linear_proj": linear.linear_rule(h, head_cols),
        }

    def params(self, cost: Any, w: Mapping[str, Num]) -> Num:
        """Per layer: norm ``H``, linear_qkv ``H*(a + 2g)*k``, linear_proj ``a*k*H``."""
        m, h = cost.model, w["embedding"]
        if not m.has("*"):
            return 0
        q = w["attn_heads"] * m.kv_channels
        attn = h + h * (q + 2 * m.num_query_groups * m.kv_channels) + q * h
        return cost.layers(w, "*") * attn

    def cache_bytes(self, cost: Any, w: Mapping[str, Num]) -> Num:
        """The KV cache of every kept attention layer (the query groups' keys and values)."""
        m, s = cost.model, cost.spec
        kv = 2 * s.batch * s.seq_length * m.num_query_groups * m.kv_channels * s.kv_bytes
        return cost.layers(w, "*") * kv

    def sequence_macs(self, cost: Any, w: Mapping[str, Num]) -> Num:
        """Scores and weighted values: ``2 * heads * kv_channels * seq**2`` per layer."""
        attn = 2 * w["attn_heads"] * cost.model.kv_channels * cost.spec.seq_length**2
        return cost.layers(w, "*") * attn
