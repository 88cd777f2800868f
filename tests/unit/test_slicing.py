"""Exact zero-shot slicing (docs/design.md invariant 1) at TP=1.

The sliced model is a plain megatron-core ``MambaModel`` of a smaller config; its logits must
equal the elastic model's masked logits at the same widths. The weights are striped for
TP=2 / EP=2 (``StripeLayout``), so the active positions of ``ffn``, ``moe_ffn`` and
``moe_experts`` are not a prefix at TP=1 and the selection itself is exercised.

Tolerance. fp32; both models multiply the same weights by the same inputs, the elastic one
with extra exact zeros, and its norms divide a sum of squares by the active count where the
smaller RMSNorm takes a mean: rounding only, ~1e-7 relative per operation over eight layers
(measured <= 4.3e-7 on logits of order 1). A wrong channel, head or expert gives order one.
So: max abs diff <= 1e-5. A reloaded checkpoint holds copies of the same numbers: identical.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.slicing import (
    build_slice,
    load_slice,
    save_slice,
    slice_model,
)
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.run_format import MODEL_CONFIG
from tests.unit.test_elastic_layers import (
    ALONE,
    MODEL,
    SMALL,
    build,
    logits,
    make_world,
    masked_and_narrow,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def world():
    return make_world()


@pytest.fixture(scope="module")
def elastic(world):
    model = build(world, seed=11)
    ctrl = ElasticController(MODEL, StripeLayout(tp=2, ep=2))
    return convert_to_elastic(model, ctrl), ctrl


@pytest.mark.parametrize("widths", [*ALONE, SMALL], ids=[*SMALL, "all"])
def test_sliced_model_logits_equal_elastic_masked_logits(world, elastic, widths):
    model, ctrl = elastic
    with ctrl.at(widths, mode="masked"):
        masked = logits(model)
    config, state = slice_model(model, widths)
    small = build_slice(config, state, pg_collection=world[1]).eval()
    sliced = logits(small)
    assert sliced.shape == masked.shape
    assert (sliced - masked).abs().max().item() <= ATOL


def test_sliced_config_and_shapes_follow_the_widths(world, elastic):
    model, _ = elastic
    config, state = slice_model(model, SMALL)
    assert (config.hidden_size, config.num_attention_heads, config.ffn_hidden_size) == (96, 2, 128)
    assert (config.mamba_num_heads, config.mamba_head_dim) == (4, 8)
    assert (config.num_experts, config.moe_ffn_hidden_size) == (4, 32)
    assert config.num_query_groups == MODEL.num_query_groups
    small = build_slice(config, state, pg_collection=world[1])
    mixer = small.decoder.layers[0].mixer
    # the smaller gated norm groups d_inner / ngroups channels: each group's active ones
    assert mixer.norm.group_size == 4 * 8 // MODEL.mamba_num_groups
    experts = small.decoder.layers[3].mlp.experts.local_experts
    assert len(experts) == 4
    params = sum(p.numel() for p in small.parameters())
    assert params < 0.7 * sum(p.numel() for p in model.parameters())


def test_slice_selects_the_striped_active_experts_in_position_order(elastic):
    model, ctrl = elastic
    _, state = slice_model(model, {"moe_experts": 4})
    kept = ctrl.global_mask("moe_experts", 4).nonzero().flatten().tolist()
    assert kept == [0, 1, 4, 5]  # striped for EP=2: two per EP rank
    prefix = "decoder.layers.3.mlp.experts.local_experts"
    full = model.state_dict()
    for i, j in enumerate(kept):
        key = f"{prefix}.{i}.linear_fc1.weight"
        assert torch.equal(state[key], full[f"{prefix}.{j}.linear_fc1.weight"])
    router = state["decoder.layers.3.mlp.router.weight"]
    assert torch.equal(router, full["decoder.layers.3.mlp.router.weight"][kept])


def test_saved_slice_is_a_standalone_checkpoint_with_the_same_logits(world, elastic, tmp_path):
    model, _ = elastic
    config, state = slice_model(model, SMALL)
    expected = logits(build_slice(config, state, pg_collection=world[1]).eval())
    path = save_slice(model, SMALL, tmp_path / "small", world[1])
    assert (path / "metadata.json").is_file() and any(path.glob("*.distcp"))
    saved = json.loads((tmp_path / "small" / MODEL_CONFIG).read_text())
    assert saved["hidden_size"] == 96 and saved["num_experts"] == 4
    reloaded = load_slice(tmp_path / "small", world[1]).eval()
    assert torch.equal(logits(reloaded), expected)


def test_slice_model_needs_an_elastic_model_or_a_controller(world):
    plain = build(world)
    with pytest.raises(TypeError, match="not elastic"):
        slice_model(plain, SMALL)
    config, _ = slice_model(plain, SMALL, controller=ElasticController(MODEL))
    assert config.hidden_size == 96


def test_gated_linear_unit_halves_are_sliced_and_narrowed_together(world):
    cfg = HybridModelConfig(activation="swiglu")  # fc1 rows are [gate; up]
    model = build(world, cfg, seed=5)
    ctrl = ElasticController(cfg)
    convert_to_elastic(model, ctrl)
    masked, narrow = masked_and_narrow(model, ctrl, SMALL)
    config, state = slice_model(model, SMALL)
    sliced = logits(build_slice(config, state, pg_collection=world[1]).eval())
    assert (narrow - masked).abs().max().item() <= ATOL
    assert (sliced - masked).abs().max().item() <= ATOL
