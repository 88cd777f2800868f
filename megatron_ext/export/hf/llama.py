"""The RoPE + SwiGLU + GQA transformer (``LlamaForCausalLM``; ``Qwen3ForCausalLM``;
``Qwen3MoeForCausalLM``) <-> the hybrid stack with pattern ``*-*-...`` (one attention and one
MLP layer per HF layer), or ``*E*E...`` for Qwen3-MoE.

Qwen3 is Llama plus an RMSNorm over every query and key head before RoPE (``q_norm`` /
``k_norm``), which is megatron's ``qk_layernorm``: a config with ``qk_layernorm`` is written
as Qwen3, one without as Llama, one with MoE layers as Qwen3-MoE. Qwen3-MoE's router is a
softmax over all experts then top-k, renormalised iff ``norm_topk_prob``: megatron's softmax
router renormalises (top-k, then softmax over the k) unless ``moe_router_pre_softmax``.

Tensor names, megatron-core (local spec; TE fused norm names in brackets) to HF. HF layer
``i`` is megatron layers ``2i`` (``*``) and ``2i+1`` (``-``); ``A`` is
``decoder.layers.<2i>.``, ``F`` is ``decoder.layers.<2i+1>.`` and ``H`` is
``model.layers.<i>.``::

    embedding.word_embeddings.weight                <-> model.embed_tokens.weight
    decoder.final_norm.weight                       <-> model.norm.weight
    output_layer.weight (absent if tied)            <-> lm_head.weight (absent if tied)
    A input_layernorm.weight [A self_attention.linear_qkv.layer_norm_weight]
                                                    <-> H input_layernorm.weight
    A self_attention.linear_qkv.weight              <-> H self_attn.q_proj / k_proj / v_proj
    A self_attention.linear_proj.weight             <-> H self_attn.o_proj.weight
    A self_attention.q_layernorm / k_layernorm      <-> H self_attn.q_norm / k_norm (Qwen3)
    F pre_mlp_layernorm.weight [F mlp.linear_fc1.layer_norm_weight]
                                                    <-> H post_attention_layernorm.weight
    F mlp.linear_fc1.weight = [gate; up]            <-> H mlp.gate_proj / up_proj.weight
    F mlp.linear_fc2.weight                         <-> H mlp.down_proj.weight
    E pre_mlp_layernorm.weight                      <-> H post_attention_layernorm.weight
    E mlp.router.weight                             <-> H mlp.gate.weight
    E mlp.experts.local_experts.<j>.linear_fc1.weight = [gate; up]
                                                    <-> H mlp.experts.<j>.gate_proj / up_proj
    E mlp.experts.local_experts.<j>.linear_fc2.weight <-> H mlp.experts.<j>.down_proj.weight

megatron's RoPE (``rotary_interleaved=False``) rotates halves, as HF's ``rotate_half``; both
use the inverse frequencies ``base^(-2j/d)`` over the whole head, and both scale attention by
``1/sqrt(head_dim)``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from megatron_ext.data.tokenizer import Tokenizer
from megatron_ext.export import ExportError
from megatron_ext.export.hf.family import HFFamily
from megatron_ext.export.hf.mapping import (
    Convert,
    Fixed,
    Pair,
    axis_pairs,
    config_from_hf,
    config_to_hf,
)
from megatron_ext.models.config import HybridModelConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_LAYER_PATTERN = re.compile(r"^(\*-)+$")
_MOE_PATTERN = re.compile(r"^(\*E)+$")


def _rope_to_hf(base: int) -> dict[str, Any]:
    return {"rope_theta": float(base), "rope_type": "default"}


def _rope_from_hf(rope: dict[str, Any]) -> int:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ExportError(
            f"config.json rope_parameters.rope_type={kind!r}: only the default (unscaled) RoPE "
            "is built here"
        )
    theta = float(rope["rope_theta"])
    if theta != int(theta):
        raise ExportError(f"config.json rope_theta={theta}: megatron's rotary_base is an integer")
    return int(theta)


# ---- config: ours <-> config.json, one line per pair -----------------------------------------
# The elastic axes' fields (widths, the pattern) take their keys from the sites
# (megatron_ext.elastic.sites, ``hf_names``); this family says how their values convert.

PAIRS = (
    Pair("vocab_size", "vocab_size"),
    Pair("max_sequence_length", "max_position_embeddings", default=2048),
    Pair("num_query_groups", "num_key_value_heads"),
    Pair("kv_channels", "head_dim"),
    Pair("rotary_base", "rope_parameters", _rope_to_hf, _rope_from_hf),
    Pair("tie_embeddings", "tie_word_embeddings", bool, bool, default=False),
    Pair("layernorm_epsilon", "rms_norm_eps", default=1e-6),
    Pair("init_method_std", "initializer_range", default=0.02),
)
"""The fields of no elastic axis, in every model type."""

FIXED = (
    Fixed("hidden_act", "silu", "the MLP is SwiGLU (silu(gate) * up)"),
    Fixed("attention_bias", False, "biases are not built here"),
    Fixed("mlp_bias", False, "biases are not built here"),
    Fixed("attention_dropout", 0.0, "attention dropout is not built here"),
)
_DENSE_LAYERS = Convert(lambda p: len(p) // 2, lambda n: "*-" * n)
_MOE_LAYERS = Convert(lambda p: len(p) // 2, lambda n: "*E" * int(n))
_AXES_BY_TYPE: dict[str, tuple[str, dict[str, Convert]]] = {
    # the layer symbols whose sites' fields the type has (Qwen3-MoE keeps the dense MLP's
    # intermediate_size), and how the layer count converts
    "llama": ("*-", {"pattern": _DENSE_LAYERS}),
    "qwen3": ("*-", {"pattern": _DENSE_LAYERS}),
    "qwen3_moe": ("*-E", {"pattern": _MOE_LAYERS}),
}
_PAIRS_BY_TYPE = {
    "llama": (),
    "qwen3": (),
    "qwen3_moe": (
        Pair("moe_router_topk", "num_experts_per_tok"),
        Pair("moe_router_pre_softmax", "norm_topk_prob", lambda p: not p, lambda n: not n),
    ),
}
_NO_SLIDING = Fixed("use_sliding_window", False, "sliding-window attention is not built here")
_FIXED_BY_TYPE = {
    "llama": (Fixed("pretraining_tp", 1, "the sliced-matmul emulation of pretraining_tp"),),
    "qwen3": (_NO_SLIDING,),
    "qwen3_moe": (
        _NO_SLIDING,
        Fixed("decoder_sparse_step", 1, "every layer's MLP is the MoE (pattern *E)"),
        Fixed("mlp_only_layers", [], "every layer's MLP is the MoE (pattern *E)"),
    ),
}


def pairs(kind: str) -> tuple[Pair, ...]:
    """Every field's pair in model type ``kind``: the common and the type's own fields, and
    the registered sites' axis fields."""
    symbols, convert = _AXES_BY_TYPE[kind]
    return PAIRS + _PAIRS_BY_TYPE[kind] + axis_pairs("llama", convert, symbols)


def model_type(cfg: HybridModelConfig) -> str:
    """``qwen3_moe`` with MoE layers, else ``qwen3`` with query/key norms, else ``llama``."""
    if cfg.has("E"):
        return "qwen3_moe"
    return "qwen3" if cfg.qk_layernorm else "llama"


def to_hf_config(
    cfg: HybridModelConfig, tokenizer: Tokenizer | None = None, conv_kernel: int = 4
) -> dict[str, Any]:
    """The Llama / Qwen3 ``config.json`` of ``cfg`` (checked by the caller: :attr:`FAMILY`
    .check; ``conv_kernel`` is unused)."""
    del conv_kernel
    kind = model_type(cfg)
    eod = tokenizer.eod if tokenizer is not None else None
    extra: dict[str, Any] = {}
    if kind != "llama":
        extra = {"layer_types": ["full_attention"] * (cfg.num_layers // 2), "sliding_window": None}
    return {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "dtype": cfg.params_dtype,
        **config_to_hf(pairs(kind), FIXED + _FIXED_BY_TYPE[kind], cfg),
        **extra,
        "bos_token_id": None,
        "eos_token_id": eod,
        "pad_token_id": None,
        "use_cache": True,
    }


def from_hf_config(hf: dict[str, Any], **overrides: Any) -> HybridModelConfig:
    """The :class:`HybridModelConfig` of a Llama or Qwen3 ``config.json``."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise ExportError(f"config.json model_type={kind!r} is not one of {list(ARCHITECTURES)}")
    hf = dict(hf)
    if hf.get("rope_parameters") is None:  # transformers < 5 kept rope_theta at the top
        hf["rope_parameters"] = {
            "rope_theta": hf.get("rope_theta", 10000.0),
            **(hf.get("rope_scaling") or {"rope_type": "default"}),
        }
    if hf.get("num_key_value_heads") is None:
        hf["num_key_value_heads"] = hf["num_attention_heads"]
    if hf.get("num_local_experts") is None and hf.get("num_experts") is not None:  # an alias
        hf["num_local_experts"] = hf["num_experts"]
    if hf.get("head_dim") is None:
        hf["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    if kind != "llama" and any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise ExportError(f"config.json layer_types={hf['layer_types']}: only full attention")
    fields = config_from_hf(pairs(kind), FIXED + _FIXED_BY_TYPE[kind], hf)
    if kind == "qwen3_moe":
        fields.update(
            moe_router_score_function="softmax",
            moe_router_topk_scaling_factor=1.0,
            moe_shared_expert_ffn_hidden_size=0,
        )
    fields.update(
        name=kind,
        activation="swiglu",
        position_embedding_type="rope",
        qk_layernorm=kind != "llama",
        params_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
    )
    fields.update(overrides)
    return HybridModelConfig(**fields)


def incompatibilities(cfg: HybridModelConfig) -> list[str]:
    """Why ``cfg`` cannot be written as Llama / Qwen3 (empty when it can)."""
    problems = []
    if not (_LAYER_PATTERN.match(cfg.pattern) or _MOE_PATTERN.match(cfg.pattern)):
        problems.append(
            f"model.pattern={cfg.pattern!r}: a Llama / Qwen3 layer is one attention and one MLP "
            "layer, so the pattern must be '*-' (or, for Qwen3-MoE, '*E') repeated"
        )
    if cfg.has("E"):
        if cfg.moe_router_score_function != "softmax" or cfg.moe_router_enable_expert_bias:
            problems.append(
                "model.moe_router_score_function: the Qwen3-MoE router is a softmax router "
                "without expert bias"
            )
        if cfg.moe_shared_expert_ffn_hidden_size or not cfg.qk_layernorm:
            problems.append(
                "model.moe_shared_expert_ffn_hidden_size / qk_layernorm: Qwen3-MoE has no "
                "shared expert and has query/key norms"
            )
        if float(cfg.moe_router_topk_scaling_factor or 1.0) != 1.0:
            problems.append("model.moe_router_topk_scaling_factor: Qwen3-MoE does not scale")
    if cfg.position_embedding_type != "rope":
        problems.append(
            f"model.position_embedding_type={cfg.position_embedding_type!r}: Llama / Qwen3 "
            "attention applies RoPE"
        )
    if cfg.activation != "swiglu":
        problems.append(
            f"model.activation={cfg.activation!r}: the Llama / Qwen3 MLP is SwiGLU "
            "(model.activation=swiglu)"
        )
    return problems


# ---- tensors: ours <-> HF, one line per pair -------------------------------------------------

_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_norm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_LAYER: dict[str, dict[str, tuple[str, ...]]] = {
    "*": {
        "input_layernorm.weight": ("input_layernorm.weight",),
        "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
        "self_attention.linear_qkv.weight": (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
        ),
        "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
        "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
        "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    },
    "-": {
        "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
        "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight",),
        "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    },
}
_LAYER["E"] = {
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.router.weight": ("mlp.gate.weight",),
}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")


def hf_names(key: str, cfg: HybridModelConfig) -> tuple[str, ...]:
    """The Llama / Qwen3 tensor name(s) of megatron state-dict entry ``key``."""
    if key.endswith("._extra_state"):
        return ()
    if key in _GLOBAL:
        return (_GLOBAL[key],)
    match = _LAYER_KEY.match(key)
    if match is not None:
        layer, rest = int(match[1]), match[2]
        head = f"model.layers.{layer // 2}."
        names = _LAYER.get(cfg.pattern[layer], {}).get(rest)
        if names is not None:
            return tuple(head + n for n in names)
        expert = _EXPERT.match(rest) if cfg.pattern[layer] == "E" else None
        if expert is not None:
            j = f"{head}mlp.experts.{expert[1]}."
            if expert[2] == "1":
                return (f"{j}gate_proj.weight", f"{j}up_proj.weight")
            return (f"{j}down_proj.weight",)
    raise ExportError(f"no Llama / Qwen3 name for megatron tensor {key!r}")


def complete(out: dict[str, Tensor], cfg: HybridModelConfig) -> None:
    """Nothing to add: a tied model has no ``lm_head.weight`` (``transformers`` ties it)."""
    del out, cfg


def redundant(name: str, value: Tensor, tensors: dict[str, Tensor]) -> bool:
    """A head equal to the embedding is the tied one."""
    return name == "lm_head.weight" and torch.equal(value, tensors["model.embed_tokens.weight"])


FAMILY = HFFamily(
    name="llama",
    model_types=tuple(ARCHITECTURES),
    architecture=lambda cfg: (ARCHITECTURES[model_type(cfg)], model_type(cfg)),
    incompatibilities=incompatibilities,
    config_to_hf=to_hf_config,
    config_from_hf=from_hf_config,
    names=hf_names,
    complete=complete,
    redundant=redundant,
)
