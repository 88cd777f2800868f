"""Our model config and megatron-core's: the one mapping converts each way and back unchanged."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_ext.models.builder import transformer_config
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.models.megatron_config import (
    PAIRS,
    from_megatron,
    mamba_model_arguments,
    to_megatron,
)
from megatron_ext.parallel import ParallelConfig

# fields with no megatron counterpart: the run's label, the local spec's core attention
# (a layer-spec choice, megatron_ext.models.specs), the SSD scan's chunk (the CPU kernels')
OWN_FIELDS = {"name", "core_attention", "mamba_chunk_size"}

SHAPES = [
    HybridModelConfig(),
    HybridModelConfig(pattern="M*M-", activation="swiglu", params_dtype="bfloat16"),
    HybridModelConfig(
        pattern="*E*E",
        activation="gelu",
        qk_layernorm=True,
        moe_shared_expert_ffn_hidden_size=0,
        moe_router_pre_softmax=True,
        moe_router_score_function="softmax",
    ),
]


def test_every_field_of_ours_has_one_place_in_the_mapping():
    # MambaModel's arguments, by our names
    arguments = ["vocab_size", "max_sequence_length", "pattern", "tie_embeddings"]
    arguments += ["position_embedding_type", "rotary_base"]
    assert len(mamba_model_arguments(HybridModelConfig())) == len(arguments)
    mapped = [p.ours for p in PAIRS] + ["activation", "params_dtype"] + arguments
    assert len(mapped) == len(set(mapped))  # written once
    ours = {f.name for f in dataclasses.fields(HybridModelConfig)}
    assert set(mapped) | OWN_FIELDS == ours


@pytest.mark.parametrize("cfg", SHAPES, ids=["default", "swiglu_bf16", "attention_moe"])
def test_a_built_transformer_config_converts_back_to_the_same_fields(cfg):
    config = transformer_config(cfg, ParallelConfig())
    back = from_megatron(config)
    assert back == {k: getattr(cfg, k) for k in back}
    assert {"activation", "params_dtype"} <= back.keys()
    assert ("num_experts" in back) == cfg.has("E")
    # and the mapping is what the builder passed (the builder adds only layout and CPU settings)
    for name, value in to_megatron(cfg).items():
        if name != "activation_func":
            assert getattr(config, name) == value, name


def test_a_stack_without_moe_layers_maps_no_moe_field():
    cfg = HybridModelConfig(pattern="M*M-")
    assert not any(k.startswith(("moe_", "num_moe")) for k in to_megatron(cfg))
    assert "num_experts" not in from_megatron(transformer_config(cfg, ParallelConfig()))
