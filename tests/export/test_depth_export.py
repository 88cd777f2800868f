"""Export round trips of depth slices: fewer layers, renumbered, the hybrid pattern shortened.

The elastic model at a budget with ``depth`` 5 of 8 layers (and the small widths) is sliced
and exported to megatron and Hugging Face (Nemotron-H, ``hybrid_override_pattern`` of the
kept layers). Tolerances as in test_export_roundtrip: the project's own loaders reload the
same numbers into the same megatron code (bound 1e-6 against the elastic model's masked
logits, which equal the slice's exactly); ``transformers``' NemotronH is another
implementation of the same maths (bound 1e-4).
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.export import export_slice
from megatron_ext.export.hf import load_hf, read_safetensors
from megatron_ext.export.megatron import load_megatron
from megatron_ext.models.config import load_model_config
from megatron_ext.parallel import ParallelConfig, init_distributed
from tests.export.test_export_roundtrip import (
    HF_ATOL,
    MODEL,
    OWN_ATOL,
    budget_widths,
    build,
    logits,
    max_diff,
    tokens,
)

# depth 5 keeps layers 0, 1, 3, 4, 6: "M*E-*" (every kind, one Mamba, one MoE dropped)
STRIPES = StripeLayout(tp=2, ep=2, layer_order=(1, 0, 3, 4, 6, 5, 2, 7))
KEPT_PATTERN = "M*E-*"


def depth_widths() -> dict[str, int]:
    return {**budget_widths("S"), "depth": 5}


@pytest.fixture(scope="module")
def pgs():
    return init_distributed(ParallelConfig())


@pytest.fixture(scope="module")
def elastic(pgs):
    model = build(pgs)
    ctrl = ElasticController(MODEL, STRIPES)
    convert_to_elastic(model, ctrl)
    with ctrl.at(depth_widths(), mode="masked"):
        expected = logits(model)
    return model, ctrl, expected


@pytest.mark.parametrize("fmt", ["megatron", "hf"])
def test_depth_slice_exports_and_reloads_to_the_elastic_logits(elastic, pgs, fmt, tmp_path):
    model, ctrl, expected = elastic
    result = export_slice(
        fmt,
        model,
        depth_widths(),
        tmp_path / fmt,
        budget="S_shallow",
        controller=ctrl,
        tokenizer=ByteTokenizer(),
        pg_collection=pgs,
    )
    load = load_megatron if fmt == "megatron" else load_hf
    reloaded = load(result.path, pgs).eval()
    assert len(reloaded.decoder.layers) == 5
    assert max_diff(logits(reloaded), expected) <= OWN_ATOL
    if fmt == "megatron":
        assert load_model_config(result.path).pattern == KEPT_PATTERN
        return
    hf = json.loads((result.path / "config.json").read_text())
    assert hf["hybrid_override_pattern"] == KEPT_PATTERN and hf["num_hidden_layers"] == 5
    layers = {int(k.split(".")[2]) for k in read_safetensors(result.path) if ".layers." in k}
    assert layers == set(range(5))  # renumbered, no gaps


def test_transformers_nemotron_h_runs_the_depth_slice_to_the_same_logits(elastic, pgs, tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (extras 'hf' or 'dev')"
    )
    if not hasattr(transformers, "NemotronHForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no NemotronHForCausalLM")
    model, ctrl, expected = elastic
    out = tmp_path / "hf"
    export_slice("hf", model, depth_widths(), out, controller=ctrl, tokenizer=ByteTokenizer())
    hf_model, info = transformers.NemotronHForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf_model.config.num_hidden_layers == 5
    with torch.no_grad():
        got = hf_model.eval()(tokens()).logits
    assert max_diff(got, expected) <= HF_ATOL
