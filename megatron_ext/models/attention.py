"""Causal attention without an ``s x s`` mask on the local backend: torch's SDPA.

megatron-core's local ``DotProductAttention`` always materialises the attention scores
``[b, heads, s, s]`` and, given no mask, builds its own ``[s, s]`` causal mask on a CUDA
device; the project therefore passed a materialised ``[1, 1, s, s]`` mask. :class:`SDPAttention`
is that class with its forward replaced by ``torch.nn.functional.scaled_dot_product_attention``:
the same constructor (per-partition head counts, ``softmax_scale``, state-dict keys), the same
``[sq, b, np, hn]`` inputs and ``[sq, b, hp]`` output, and with the layer's ``causal`` mask type
and no mask it passes ``is_causal=True`` (queries aligned to the end of the keys), so neither
the mask nor, with torch's fused CPU kernel, the scores are ever ``s x s``. A given boolean mask
(True = masked, megatron's convention) is still honoured. Features SDPA does not express
(packed sequences, attention bias, softmax offsets, sliding windows, query-key layer scaling,
attention dropout) fall back to upstream's forward.

Selected in the layer spec by ``model.core_attention: sdpa`` (the default) for the local
backend; Transformer Engine's attention handles the causal mask type itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor


class SDPAttention(DotProductAttention):
    """megatron's local core attention computed by torch SDPA (module docstring)."""

    def _upstream_only(self, attention_bias, packed_seq_params) -> bool:
        config = self.config
        return (
            packed_seq_params is not None
            or attention_bias is not None
            or self.softmax_offset is not None
            or getattr(config, "window_size", None) is not None
            or bool(config.apply_query_key_layer_scaling)
            or (self.training and self.attention_dropout.p > 0)
        )

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        """Attention of ``[sq, b, np, hn]`` queries over ``[sk, b, ng, hn]`` keys and values."""
        if self._upstream_only(attention_bias, packed_seq_params):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias,
                packed_seq_params,
            )  # fmt: skip
        heads, groups = self.num_attention_heads_per_partition, self.num_query_groups_per_partition
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, hn]
        if heads // groups > 1:
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
        sq, sk = q.shape[2], k.shape[2]
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        keep = None
        is_causal = False
        if attention_mask is not None:
            keep = ~attention_mask.bool()
        elif causal and sq > 1 and sq == sk:
            is_causal = True
        elif causal and sq > 1:  # queries are the last sq of the sk positions
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, is_causal=is_causal, scale=self.softmax_scale
        )
        out = out.permute(2, 0, 1, 3).contiguous()  # [sq, b, np, hn]
        return out.view(sq, out.shape[1], self.hidden_size_per_partition)
