"""The NeMo 2 export, read back with nemo-toolkit itself (run by ``make test-nemo``).

nemo-toolkit 2.7.3 cannot share an environment with this project's main one (it pins
nvidia-modelopt 0.37 and needs four install fixes), so these tests run in ``.venv-nemo`` and
are skipped elsewhere. They check that NeMo's own ``load_context(ckpt/"context",
subpath="model")`` reads the model config and tokenizer back, that the weights are a
``torch_dist`` checkpoint under the Transformer Engine spec's names, and that they load into
the megatron model of the config read back: the same numbers, so the same logits (bound
1e-6, measured 0; see test_export_roundtrip for the reasoning).
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ext.data.tokenizer import ByteTokenizer, HFJsonTokenizer
from megatron_ext.export import export_slice
from megatron_ext.export.nemo import (
    NemoUnavailable,
    nemo_config_kwargs,
    require_nemo,
    te_checkpoint_key,
)
from megatron_ext.export.tokenizer import byte_tokenizer_json
from tests.export.test_export_roundtrip import (
    BUDGETS,
    MODEL,
    OWN_ATOL,
    budget_widths,
    build,
    controller,
    logits,
    max_diff,
    reference,
)

try:
    require_nemo()
    NEMO_MISSING = ""
except NemoUnavailable as err:
    NEMO_MISSING = str(err)

# `make test` deselects these (-m "not nemo"); `make test-nemo` runs them in .venv-nemo.
needs_nemo = pytest.mark.nemo


def test_checkpoint_keys_follow_the_transformer_engine_spec():
    pattern = MODEL.pattern  # M*ME-M*E
    assert (
        te_checkpoint_key("module.decoder.layers.0.norm.weight", pattern)
        == "module.decoder.layers.0.mixer.in_proj.layer_norm_weight"
    )
    assert (
        te_checkpoint_key("module.decoder.layers.1.input_layernorm.weight", pattern)
        == "module.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    )
    assert (
        te_checkpoint_key("module.decoder.layers.4.pre_mlp_layernorm.weight", pattern)
        == "module.decoder.layers.4.mlp.linear_fc1.layer_norm_weight"
    )
    for unchanged in (
        "module.decoder.layers.3.pre_mlp_layernorm.weight",  # MoE: a TENorm there too
        "module.decoder.layers.0.mixer.norm.weight",  # the gated norm inside the mixer
        "module.decoder.final_norm.weight",
    ):
        assert te_checkpoint_key(unchanged, pattern) == unchanged


def test_nemo_is_importable_or_the_error_names_the_extra():
    if NEMO_MISSING:
        assert "'nemo' extra" in NEMO_MISSING and "make test-nemo" in NEMO_MISSING
    else:
        require_nemo()  # must not raise once nemo imports


@pytest.fixture(scope="module")
def pgs():
    from megatron_ext.parallel import ParallelConfig, init_distributed

    return init_distributed(ParallelConfig())


@pytest.fixture(scope="module")
def model(pgs):
    return build(pgs)


@needs_nemo
@pytest.mark.parametrize("budget", BUDGETS)
def test_nemo_reads_the_context_back_and_the_weights_load(model, pgs, budget, tmp_path):
    from nemo.lightning.io import load_context

    from megatron_ext.export.nemo import load_nemo

    cfg, expected = reference(model, budget_widths(budget), pgs)
    result = export_slice(
        "nemo",
        model,
        budget_widths(budget),
        tmp_path / budget,
        budget=budget,
        controller=controller(),
        tokenizer=ByteTokenizer(),
        pg_collection=pgs,
    )
    ckpt = result.path
    assert (ckpt / "context" / "io.json").is_file() and (ckpt / "context" / "model.yaml").is_file()
    meta = json.loads((ckpt / "weights" / "metadata.json").read_text())
    assert meta["sharded_backend"] == "torch_dist"

    nemo_model = load_context(ckpt / "context", subpath="model")
    config = nemo_model.config
    assert type(nemo_model).__name__ == "MambaModel" and type(config).__name__ == "SSMConfig"
    expected_fields = {
        k: v for k, v in nemo_config_kwargs(cfg, 260).items() if k != "activation_func"
    }
    assert {k: getattr(config, k) for k in expected_fields} == expected_fields
    assert config.hidden_size == cfg.hidden_size and config.num_moe_experts == cfg.num_experts
    assert config.activation_func.__name__ == "squared_relu"
    tok = nemo_model.tokenizer
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (260, 256, 257)
    assert tok.text_to_ids("déjà") == list("déjà".encode())

    from torch.distributed.checkpoint import FileSystemReader

    stored = set(FileSystemReader(str(ckpt / "weights")).read_metadata().state_dict_metadata)
    assert "module.decoder.layers.0.mixer.in_proj.layer_norm_weight" in stored
    assert "module.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in stored
    assert not any(k.endswith(".input_layernorm.weight") for k in stored)

    reloaded = load_nemo(ckpt, pgs).eval()
    assert max_diff(logits(reloaded), expected) <= OWN_ATOL


@needs_nemo
def test_nemo_keeps_a_hugging_face_tokenizer_as_a_context_artifact(model, pgs, tmp_path):
    from nemo.lightning.io import load_context

    source = tmp_path / "tok.json"
    source.write_text(byte_tokenizer_json())
    ckpt = export_slice(
        "nemo",
        model,
        budget_widths("S"),
        tmp_path / "S",
        controller=controller(),
        tokenizer=HFJsonTokenizer(source),
        pg_collection=pgs,
    ).path
    artifacts = [p for p in (ckpt / "context").rglob("tokenizer.json")]
    assert artifacts, "the tokenizer files were not copied into context/"
    tok = load_context(ckpt / "context", subpath="model").tokenizer
    text = "déjà vu"
    assert tok.text_to_ids(text) == ByteTokenizer().encode(text)
    assert torch.tensor(tok.text_to_ids(text)).max() < 256


@needs_nemo
def test_nemo_exports_a_depth_slice_with_the_shortened_pattern(pgs, tmp_path):
    """A budget with 5 of 8 layers: NeMo's config reads the kept layers' pattern back, and
    the weights (renumbered layers) load to the elastic model's logits."""
    from nemo.lightning.io import load_context

    from megatron_ext.elastic.controller import ElasticController
    from megatron_ext.elastic.convert import convert_to_elastic
    from megatron_ext.export.nemo import load_nemo
    from tests.export.test_depth_export import KEPT_PATTERN, STRIPES, depth_widths

    model = build(pgs)
    ctrl = ElasticController(MODEL, STRIPES)
    convert_to_elastic(model, ctrl)
    with ctrl.at(depth_widths(), mode="masked"):
        expected = logits(model)
    result = export_slice(
        "nemo",
        model,
        depth_widths(),
        tmp_path / "nemo",
        controller=ctrl,
        tokenizer=ByteTokenizer(),
        pg_collection=pgs,
    )
    config = load_context(result.path / "context", subpath="model").config
    assert config.num_layers == 5 and config.hybrid_override_pattern == KEPT_PATTERN
    reloaded = load_nemo(result.path, pgs).eval()
    assert max_diff(logits(reloaded), expected) <= OWN_ATOL
