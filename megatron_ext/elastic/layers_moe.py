"""Elastic MoE: the router drops inactive experts; the layer output keeps the residual zero.

``moe_experts``: the router is replicated, so it sees every expert. Setting the inactive
experts' logits to ``-inf`` before top-k gives them score 0 under softmax and sigmoid alike,
so top-k never picks them while at least top-k experts are active (the config checks that),
and they receive no tokens. With an expert bias (sigmoid routing with aux-loss-free
balancing) top-k ranks ``score + bias``; the inactive experts' bias is ``-inf`` for the call.
The probabilities of the chosen experts are then those of the sliced router.

``embedding``: the MoE layer's output (routed plus shared experts) is masked on the inactive
hidden channels. ``moe_ffn`` lives in the experts' own linears (:mod:`.layers_linear`).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from torch import Tensor

from megatron_ext.elastic.layers_base import ElasticMixin
from megatron_ext.elastic.layers_linear import hidden_cols


class ElasticRouterMixin(ElasticMixin):
    """``TopKRouter`` that never routes to an inactive expert."""

    expert_bias: Tensor | None

    def gating(self, input: Tensor) -> Tensor:
        """Upstream's logits with the inactive experts' set to ``-inf``.

        A narrow hidden input (narrow ``embedding``) meets the active columns of the weight.
        """
        ctrl = self.elastic_ctrl
        router: Any = self
        if input.shape[-1] != router.weight.shape[1]:
            weight = ctrl.frozen(
                self, "gating", (router.weight,), lambda: hidden_cols(ctrl, input, router.weight)
            )
            dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
                router.config.moe_router_dtype, input.dtype
            )
            logits = router_gating_linear(input, weight, router.bias, dtype)
        else:
            logits = self.elastic_upstream.gating(self, input)
        if ctrl.is_full("moe_experts"):
            return logits
        active = ctrl.local_mask("moe_experts", device=logits.device)
        return logits.masked_fill(~active, float("-inf"))

    def routing(self, logits: Tensor, *args, **kwargs):
        """Upstream's routing (an expert bias is ``-inf`` on inactive experts meanwhile); the
        routing probabilities are then scaled by the experts' soft mask when one is set."""
        probs, routing_map = self._routing(logits, *args, **kwargs)
        soft = self.elastic_ctrl.soft_mask("moe_experts", device=probs.device)
        return (probs if soft is None else probs * soft.to(probs.dtype)), routing_map

    def _routing(self, logits: Tensor, *args, **kwargs):
        ctrl = self.elastic_ctrl
        bias = self.expert_bias
        if bias is None or ctrl.is_full("moe_experts"):
            return self.elastic_upstream.routing(self, logits, *args, **kwargs)
        active = ctrl.local_mask("moe_experts", device=bias.device)
        buffers = self._buffers  # type: ignore[attr-defined]
        buffers["expert_bias"] = bias.masked_fill(~active, float("-inf"))
        try:
            return self.elastic_upstream.routing(self, logits, *args, **kwargs)
        finally:
            buffers["expert_bias"] = bias


class ElasticMoELayerMixin(ElasticMixin):
    """``MoELayer`` whose combined output is zero on the inactive hidden channels."""

    def postprocess(self, output: Tensor, shared_expert_output: Tensor | None) -> Tensor:
        """Upstream's combine with the shared experts, then the ``embedding`` mask."""
        out = self.elastic_upstream.postprocess(self, output, shared_expert_output)
        return self.elastic_ctrl.mask_last_dim(out, "embedding")
