"""Soft router masks: the forward pass is unchanged, the gradient reaches every axis.

Each axis's mask is ``sum_i y_i * mask(choice_i)`` with ``y = hard - soft.detach() + soft``
a straight-through one-hot; forward, it is exactly the chosen 0/1 mask, so the logits must be
bit-identical with and without it.
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
CHOICES = {
    "embedding": [128, 96],
    "attn_heads": [4, 2],
    "mamba_heads": [8, 4],
    "mamba_head_dim": [16, 8],
    "ffn": [256, 128],
    "moe_experts": [8, 4],
    "moe_ffn": [64, 32],
}
SMALL = {axis: choices[-1] for axis, choices in CHOICES.items()}


def _batch(seq: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.tensor(list(inspect.getsource(json).encode()[: 2 * seq]), dtype=torch.long)
    tokens = data.view(2, seq)
    return tokens, torch.arange(seq)[None].expand_as(tokens)


def _st_onehot(logits: torch.Tensor, index: int) -> torch.Tensor:
    soft = torch.softmax(logits, dim=-1)
    hard = torch.nn.functional.one_hot(torch.tensor(index), logits.numel()).to(soft)
    return hard - soft.detach() + soft


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
    logits = {axis: torch.zeros(2, requires_grad=True) for axis in CHOICES}
    index = 0 if not widths else 1
    ctrl.set_gates({a: (_st_onehot(lg, index), CHOICES[a]) for a, lg in logits.items()})
    gated = model(tokens, pos, mask)
    assert torch.equal(gated, plain)
    gated.float().square().mean().backward()
    ctrl.set_gates(None)
    ctrl.set_full()
    grads = {a: 0.0 if lg.grad is None else float(lg.grad.abs().max()) for a, lg in logits.items()}
    # A gradient that is only rounding noise must count as silent. When no path reaches an
    # axis's inactive components, its two choices' gate gradients are sums of the same active
    # terms in a different order, and the logits' gradient is their fp32 rounding difference:
    # exactly 0 or about 1e-7 of a gate gradient depending on the CPU's summation kernel. Real
    # signals here are within 3e-3 of the largest axis's gradient, noise below 1e-6 of it.
    floor = 1e-4 * max(grads.values())
    silent = [a for a, g in grads.items() if not g > floor]
    # At a reduced width, an inactive expert receives no tokens, so nothing tells the router
    # what it would add: experts only learn to shrink from the task loss (the cost term makes
    # them grow). Every other axis's cut components still have activations to weigh.
    expected_silent = ["moe_experts"] if widths else []
    assert silent == expected_silent, f"no gradient reaches the router for {silent}"
