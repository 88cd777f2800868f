"""Export round trips: megatron and Hugging Face (Nemotron-H) checkpoints of budgets L and S.

The model is the tiny hybrid (M*ME-M*E, every layer kind) with seeded random weights, its
weights striped for TP=2 / EP=2 so that slicing selects non-prefix positions, and without RoPE
(Nemotron-H has no position embedding).

Tolerances.
* Through the project's own loaders (``load_slice``, ``load_hf``): slicing is exact and the
  HF mapping is a permutation of whole tensors (``linear_qkv`` split into q/k/v rows and
  merged back), so the reloaded model holds the same numbers in the same places and runs
  the same megatron code: bit-identical logits. Bound: 1e-6 (measured 0).
* Through ``transformers``' ``NemotronHForCausalLM``: the same weights in a different
  implementation of the same maths (its reference chunked SSD scan against the project's
  pure-torch Mamba kernels, SDPA against megatron's unfused softmax attention, its RMSNorm,
  a different summation order in the MoE combine). fp32 rounding, ~1e-7 relative per op over
  eight layers on logits of order 1 (measured 3e-7). Bound: 1e-4; a wrong head, channel,
  expert, norm epsilon or router normalisation is of order 1e-2 to 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_ext.config.compose import compose_recipe, section
from megatron_ext.data.tokenizer import ByteTokenizer, HFJsonTokenizer
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.slicing import build_slice, slice_model
from megatron_ext.export import ExportError, export_slice
from megatron_ext.export.hf import (
    check_hf_compatible,
    hf_names,
    load_hf,
    megatron_to_hf,
    merge_qkv,
    read_safetensors,
    split_qkv,
)
from megatron_ext.export.megatron import load_megatron
from megatron_ext.export.tokenizer import byte_tokenizer_json, load_tokenizer
from megatron_ext.models.builder import build_model, causal_mask
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed
from megatron_ext.run_format import MODEL_CONFIG

OWN_ATOL = 1e-6
HF_ATOL = 1e-4
SEQ, BATCH = 64, 2
# Expert bias on, so the router bias mapping is exercised with nonzero values.
MODEL = HybridModelConfig(position_embedding_type="none", moe_router_enable_expert_bias=True)
STRIPES = StripeLayout(tp=2, ep=2)
BUDGETS = ("L", "S")


# ---- helpers (also used by test_nemo_export) -------------------------------------------------


def elastic_config() -> ElasticConfig:
    """``conf/elastic/tiny.yaml``, as the export recipe composes it."""
    return section(compose_recipe("export", []), "elastic", ElasticConfig)


def budget_widths(name: str, cfg: HybridModelConfig = MODEL) -> dict[str, int]:
    """The widths of budget ``name`` of the tiny elastic config."""
    return elastic_config().widths_for(name, cfg)


def build(pgs, cfg: HybridModelConfig = MODEL, seed: int = 13) -> torch.nn.Module:
    """Seeded random weights; norms and expert biases moved off their initial values so a
    mapping that mixes up channels, norms or experts shows in the logits."""
    set_seed(seed)
    model = build_model(cfg, ParallelConfig(), pgs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
        for module in model.modules():
            bias = getattr(module, "expert_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.05 * torch.randn_like(bias))
    return model


def controller(cfg: HybridModelConfig = MODEL) -> ElasticController:
    """The controller of a model whose weights are striped for TP=2 / EP=2."""
    return ElasticController(cfg, STRIPES)


def tokens() -> torch.Tensor:
    """``[BATCH, SEQ]`` byte ids of real text (this Python's ``os.py``)."""
    raw = Path(os.__file__).read_bytes()[4096 : 4096 + BATCH * SEQ]
    return torch.tensor(list(raw)).view(BATCH, SEQ)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    """``[BATCH, SEQ, vocab]`` logits of a megatron model on :func:`tokens`."""
    return model(tokens(), torch.arange(SEQ)[None].expand(BATCH, SEQ), causal_mask(SEQ))


def reference(model, widths, pgs) -> tuple[HybridModelConfig, torch.Tensor]:
    """The slice's config and the logits of the plain megatron model of that slice."""
    cfg, state = slice_model(model, widths, controller())
    return cfg, logits(build_slice(cfg, state, pg_collection=pgs).eval())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pgs():
    return init_distributed(ParallelConfig())


@pytest.fixture(scope="module")
def model(pgs):
    return build(pgs)


@pytest.fixture(scope="module")
def slices(model, pgs):
    return {name: reference(model, budget_widths(name), pgs) for name in BUDGETS}


@pytest.fixture(scope="module")
def hf_dirs(model, pgs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name in BUDGETS:
        export_slice(
            "hf",
            model,
            budget_widths(name),
            root / name,
            budget=name,
            controller=controller(),
            tokenizer=ByteTokenizer(),
        )
    return root


# ---- megatron --------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
def test_megatron_export_reloads_to_identical_logits(model, pgs, slices, budget, tmp_path):
    result = export_slice(
        "megatron",
        model,
        budget_widths(budget),
        tmp_path / budget,
        budget=budget,
        controller=controller(),
        tokenizer=ByteTokenizer(),
        pg_collection=pgs,
    )
    names = {p.name for p in result.path.iterdir()}
    assert {"iter_0000000", MODEL_CONFIG, "tokenizer_config.json"} <= names
    assert result.files > 5 and result.bytes > 0
    assert json.loads((result.path / "tokenizer_config.json").read_text())["eod_id"] == 256
    assert isinstance(load_tokenizer(result.path), ByteTokenizer)
    cfg, expected = slices[budget]
    reloaded = load_megatron(result.path, pgs).eval()
    assert max_diff(logits(reloaded), expected) <= OWN_ATOL


# ---- Hugging Face: the project's own loader --------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
def test_hf_export_reloads_to_identical_logits(hf_dirs, pgs, slices, budget):
    _, expected = slices[budget]
    reloaded = load_hf(hf_dirs / budget, pgs).eval()
    assert max_diff(logits(reloaded), expected) <= OWN_ATOL


@pytest.mark.parametrize("budget", BUDGETS)
def test_hf_config_fields_are_the_slice_shape(hf_dirs, slices, budget):
    cfg, _ = slices[budget]
    hf = json.loads((hf_dirs / budget / "config.json").read_text())
    assert hf["architectures"] == ["NemotronHForCausalLM"] and hf["model_type"] == "nemotron_h"
    assert hf["hybrid_override_pattern"] == "M*ME-M*E"
    assert hf["layers_block_type"][:4] == ["linear_attention", "full_attention"] + [
        "linear_attention",
        "moe",
    ]
    expected = {
        "hidden_size": cfg.hidden_size,
        "vocab_size": 384,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": cfg.ffn_hidden_size,
        "mlp_hidden_act": "relu2",
        "mamba_num_heads": cfg.mamba_num_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "ssm_state_size": 16,
        "n_groups": 2,
        "conv_kernel": 4,
        "n_routed_experts": cfg.num_experts,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": 128,
        "num_experts_per_tok": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
        "eos_token_id": 256,
        "pad_token_id": 257,
    }
    assert {k: hf[k] for k in expected} == expected
    if budget == "S":  # the budget does shrink the shape
        assert (hf["hidden_size"], hf["num_attention_heads"], hf["mamba_num_heads"]) == (64, 2, 4)
        assert (hf["n_routed_experts"], hf["moe_intermediate_size"]) == (4, 32)
    tensors = read_safetensors(hf_dirs / budget)
    assert tensors["backbone.embeddings.weight"].shape == (384, cfg.hidden_size)
    assert tensors["backbone.layers.1.mixer.q_proj.weight"].shape == (
        cfg.num_attention_heads * 32,
        cfg.hidden_size,
    )
    assert tensors["backbone.layers.3.mixer.experts.0.up_proj.weight"].shape == (
        cfg.moe_ffn_hidden_size,
        cfg.hidden_size,
    )


def test_every_megatron_tensor_has_exactly_the_nemotron_h_names(model):
    state = model.state_dict()
    tensors = megatron_to_hf(state, MODEL)
    layer = {
        0: {"norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias"}
        | {"mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.norm.weight"}
        | {"mixer.out_proj.weight"},
        1: {"norm.weight", "mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight"}
        | {"mixer.o_proj.weight"},
        3: {"norm.weight", "mixer.gate.weight", "mixer.gate.e_score_correction_bias"}
        | {f"mixer.experts.{j}.{p}.weight" for j in range(8) for p in ("up_proj", "down_proj")}
        | {"mixer.shared_experts.up_proj.weight", "mixer.shared_experts.down_proj.weight"},
        4: {"norm.weight", "mixer.up_proj.weight", "mixer.down_proj.weight"},
    }
    for i, names in layer.items():
        head = f"backbone.layers.{i}."
        assert {k.removeprefix(head) for k in tensors if k.startswith(head)} == names, i
    assert {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"} <= set(
        tensors
    )
    # a permutation of the numbers: as many elements out as in
    assert sum(t.numel() for t in tensors.values()) == sum(
        v.numel() for k, v in state.items() if isinstance(v, torch.Tensor)
    )
    # TE's fused norm names map to the same place as the local spec's
    assert hf_names("decoder.layers.0.mixer.in_proj.layer_norm_weight", MODEL) == (
        "backbone.layers.0.norm.weight",
    )
    assert hf_names("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", MODEL) == (
        "backbone.layers.1.norm.weight",
    )
    with pytest.raises(ExportError, match="no Nemotron-H name"):
        hf_names("decoder.layers.0.mixer.in_proj.bias", MODEL)


def test_qkv_split_follows_megatrons_per_group_interleaving():
    cfg = MODEL  # 4 query heads in 2 groups, kv_channels 32
    # row r of linear_qkv gets value r: group g holds [q_{2g}, q_{2g+1}, k_g, v_g]
    weight = torch.arange(2 * 4 * 32, dtype=torch.float32)[:, None].expand(-1, 3).contiguous()
    q, k, v = split_qkv(weight, cfg)
    rows = lambda t: t[::32, 0].long().tolist()  # noqa: E731 (first row of each head)
    assert rows(q) == [0, 32, 128, 160]  # heads 0,1 from group 0, heads 2,3 from group 1
    assert rows(k) == [64, 192] and rows(v) == [96, 224]
    assert torch.equal(merge_qkv(q, k, v, cfg), weight)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"position_embedding_type": "rope"}, "no RoPE"),
        ({"activation": "swiglu"}, "not gated"),
        ({"moe_router_score_function": "softmax"}, "sigmoid router"),
        ({"moe_shared_expert_ffn_hidden_size": 0}, "shared expert"),
        ({"layernorm_epsilon": 1e-6}, "gated norm"),
    ],
)
def test_hf_export_refuses_what_nemotron_h_computes_differently(change, message):
    cfg = HybridModelConfig(**{**vars(MODEL), **change})
    with pytest.raises(ExportError, match=message):
        check_hf_compatible(cfg)


def test_hf_load_without_the_project_config_infers_the_shape(hf_dirs, pgs, slices, tmp_path):
    target = tmp_path / "plain"
    target.mkdir()
    for f in (hf_dirs / "S").iterdir():
        if f.name != MODEL_CONFIG:
            (target / f.name).write_bytes(f.read_bytes())
    reloaded = load_hf(target, pgs).eval()
    assert max_diff(logits(reloaded), slices["S"][1]) <= OWN_ATOL


def test_sharded_safetensors_round_trip(model, pgs, slices, tmp_path):
    result = export_slice(
        "hf",
        model,
        budget_widths("S"),
        tmp_path / "S",
        controller=controller(),
        max_shard_bytes=200_000,
    )
    shards = sorted(result.path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (result.path / "model.safetensors.index.json").is_file()
    assert max_diff(logits(load_hf(result.path, pgs).eval()), slices["S"][1]) <= OWN_ATOL


# ---- tokenizer -------------------------------------------------------------------------------

TEXT = "déjà vu\n\tx = {'a': 1}  # €😀 <eod>after<think>hm</think>\x00\x7f\xff"


def test_generated_byte_tokenizer_json_encodes_exactly_like_the_byte_tokenizer(hf_dirs):
    byte = ByteTokenizer()
    tok = load_tokenizer(hf_dirs / "S")
    assert isinstance(tok, HFJsonTokenizer)
    assert (tok.eod, tok.pad, tok.vocab_size) == (256, 257, 260)
    for parse in (True, False):
        assert tok.encode(TEXT, parse_special=parse) == byte.encode(TEXT, parse_special=parse)
    ids = byte.encode(TEXT)
    assert tok.decode(ids) == byte.decode(ids) == TEXT
    assert json.loads(byte_tokenizer_json())["model"]["type"] == "BPE"


def test_hf_tokenizer_json_is_copied_unchanged(model, tmp_path):
    source = tmp_path / "tok.json"
    source.write_text(byte_tokenizer_json())
    tok = HFJsonTokenizer(source)
    for fmt in ("megatron", "hf"):
        out = export_slice(
            fmt, model, budget_widths("S"), tmp_path / fmt, controller=controller(), tokenizer=tok
        ).path
        assert (out / "tokenizer.json").read_text() == source.read_text()
        assert load_tokenizer(out).encode(TEXT) == tok.encode(TEXT)


# ---- Hugging Face: transformers --------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
def test_transformers_nemotron_h_gives_the_same_logits(hf_dirs, slices, budget):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (extras 'hf' or 'dev')"
    )
    if not hasattr(transformers, "NemotronHForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no NemotronHForCausalLM")
    hf_model, info = transformers.NemotronHForCausalLM.from_pretrained(
        hf_dirs / budget, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    with torch.no_grad():
        out = hf_model.eval()(tokens()).logits
    assert max_diff(out, slices[budget][1]) <= HF_ATOL


def test_transformers_auto_tokenizer_reads_the_exported_byte_tokenizer(hf_dirs):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (extras 'hf' or 'dev')"
    )
    tok = transformers.AutoTokenizer.from_pretrained(hf_dirs / "L")
    byte = ByteTokenizer()
    assert tok(TEXT)["input_ids"] == byte.encode(TEXT)
    assert (tok.eos_token_id, tok.pad_token_id) == (256, 257)


# ---- the recipe ------------------------------------------------------------------------------


def test_export_recipe_writes_the_table_and_the_storage_comparison(model, pgs, tmp_path, capsys):
    from megatron_ext.checkpoint import CheckpointManager
    from megatron_ext.models.config import save_model_config
    from recipes import export

    source = tmp_path / "source"
    CheckpointManager(source / "checkpoints", pgs).save(0, model, None, {})
    STRIPES.save(source / "checkpoints")
    save_model_config(MODEL, source)
    cfg = compose_recipe(
        "export",
        [f"source.dir={source}", f"run.dir={tmp_path / 'run'}", "budget=all", "format=hf"],
    )
    summary = export.run(cfg)
    assert [e["budget"] for e in summary["exports"]] == ["L", "M", "S"]
    assert all(e["format"] == "hf" and e["bytes"] > 0 for e in summary["exports"])
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["elastic_bytes"] == summary["elastic_bytes"] > 0
    # three nested budgets stored apart take more room than the one elastic checkpoint,
    # which is about the size of the largest (L = the full model)
    assert set(summary["separate_slices"]) == {"L", "M", "S"}
    assert summary["separate_slices_bytes"] > 1.5 * summary["elastic_bytes"]
    assert (
        abs(summary["separate_slices"]["L"] - summary["elastic_bytes"])
        < 0.05 * (summary["elastic_bytes"])
    )
    assert "separate checkpoints" in capsys.readouterr().out
    exported = Path(summary["exports"][2]["path"])
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()
