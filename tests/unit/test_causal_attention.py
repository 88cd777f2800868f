"""Causal attention without a materialised ``s x s`` mask gives today's logits.

Today's path is megatron's ``DotProductAttention`` with the ``[1, 1, s, s]`` mask of
``causal_mask``; the new default is :class:`SDPAttention` given no mask (``is_causal``). Both
models hold the same weights (same seed; the core attention has no parameters). Tolerance 1e-5
absolute on logits of order 1: the two compute the same softmax(q k^T * scale) v in float32,
only in a different summation order (a fused kernel vs baddbmm + softmax + bmm), measured
~1e-6; a wrong scale, an off-by-one causal diagonal or a dropped GQA repeat changes the
logits by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.models.attention import SDPAttention
from megatron_ext.models.builder import attention_mask, build_model, causal_mask
from megatron_ext.models.config import ConfigError, HybridModelConfig
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed

ATOL = 1e-5


@pytest.fixture(scope="module")
def pgs():
    return init_distributed(ParallelConfig())


def built(pgs, core_attention: str):
    set_seed(3)
    return build_model(HybridModelConfig(core_attention=core_attention), ParallelConfig(), pgs)


def inputs(seq: int, batch: int = 2):
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 384, (batch, seq), generator=gen)
    return tokens, torch.arange(seq)[None].expand(batch, seq)


@pytest.mark.parametrize("seq", [1, 7, 64])
def test_sdpa_without_a_mask_gives_the_logits_of_dot_product_with_the_full_mask(pgs, seq):
    today, sdpa = built(pgs, "dot_product"), built(pgs, "sdpa")
    assert any(isinstance(m, SDPAttention) for m in sdpa.modules())
    assert attention_mask(sdpa, seq) is None
    assert attention_mask(today, seq).shape == (1, 1, seq, seq)
    tokens, pos = inputs(seq)
    with torch.no_grad():
        want = today(tokens, pos, causal_mask(seq))
        got = sdpa(tokens, pos, attention_mask(sdpa, seq))
        masked = sdpa(tokens, pos, causal_mask(seq))  # a given mask is still honoured
    assert (got - want).abs().max().item() <= ATOL
    assert (masked - want).abs().max().item() <= ATOL
    assert want.abs().max().item() > 0.1


def test_the_mask_is_causal_a_later_token_does_not_change_earlier_logits(pgs):
    model = built(pgs, "sdpa")
    tokens, pos = inputs(16)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 384
    with torch.no_grad():
        a, b = model(tokens, pos, None), model(changed, pos, None)
    # not bit-equal: the Mamba scan's chunk GEMMs include the later (zero-weighted) positions
    assert (a[:, :10] - b[:, :10]).abs().max().item() <= 1e-6
    assert (a[:, 10:] - b[:, 10:]).abs().max().item() > 1e-4


def test_an_unknown_core_attention_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="model.core_attention"):
        HybridModelConfig(core_attention="flash")
