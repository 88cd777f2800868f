"""Straight-through router gates: the forward pass is unchanged, the gradient reaches every axis.

Each gate is ``hard - soft.detach() + soft`` for the chosen width, so its value is exactly
1.0 and ``x * 1.0 == x`` in fp32: logits must be bit-identical with and without gates.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.models.builder import build_model, causal_mask
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed

MODEL = HybridModelConfig()
SMALL = {
    "embedding": 96,
    "attn_heads": 2,
    "mamba_heads": 4,
    "mamba_head_dim": 8,
    "ffn": 128,
    "moe_experts": 4,
    "moe_ffn": 32,
}


def _batch(seq: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.tensor(list(inspect.getsource(json).encode()[: 2 * seq]), dtype=torch.long)
    tokens = data.view(2, seq)
    return tokens, torch.arange(seq)[None].expand_as(tokens)


def _st_gate(logit: torch.Tensor) -> torch.Tensor:
    soft = torch.sigmoid(logit)
    return torch.ones_like(soft) - soft.detach() + soft


@pytest.fixture(scope="module")
def elastic():
    init_distributed(ParallelConfig())
    set_seed(3)
    model = build_model(MODEL, ParallelConfig(), None)
    ctrl = ElasticController(MODEL, stripes=StripeLayout())
    return convert_to_elastic(model, ctrl), ctrl


@pytest.mark.parametrize("widths", [{}, SMALL], ids=["full", "small"])
def test_gates_leave_logits_bit_identical_and_reach_every_axis(elastic, widths):
    model, ctrl = elastic
    tokens, pos = _batch()
    mask = causal_mask(tokens.shape[1])
    ctrl.set_widths(widths)
    ctrl.set_gates(None)
    with torch.no_grad():
        plain = model(tokens, pos, mask)
    logits = {axis: torch.zeros((), requires_grad=True) for axis in SMALL}
    ctrl.set_gates({axis: _st_gate(logit) for axis, logit in logits.items()})
    gated = model(tokens, pos, mask)
    assert torch.equal(gated, plain)
    gated.float().square().mean().backward()
    ctrl.set_gates(None)
    ctrl.set_full()
    silent = [axis for axis, logit in logits.items() if logit.grad is None or logit.grad == 0]
    assert not silent, f"no gradient reaches the router for {silent}"
