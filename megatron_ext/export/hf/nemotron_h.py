"""Nemotron-H (``NemotronHForCausalLM``, ``model_type: nemotron_h``) <-> the hybrid stack.

The architecture of NVIDIA's Nemotron-H and Nemotron Nano v2 / v3 releases. Weights use the
names of those releases' checkpoints (``backbone.`` prefix, one 2-D tensor per routed
expert), which is also what ``transformers`` >= 5 writes with ``save_pretrained``.

Tensor names, megatron-core (local spec; the Transformer Engine spec's fused norm names in
brackets) to Nemotron-H. ``L`` is ``decoder.layers.<i>.`` and ``H`` is ``backbone.layers.<i>.``;
the first column is the layer's symbol in the hybrid pattern::

      embedding.word_embeddings.weight           <-> backbone.embeddings.weight
      decoder.final_norm.weight                  <-> backbone.norm_f.weight
      output_layer.weight (embedding if tied)    <-> lm_head.weight
    M L norm.weight [L mixer.in_proj.layer_norm_weight]          <-> H norm.weight
    M L mixer.in_proj.weight, conv1d.weight, conv1d.bias, A_log, D, dt_bias, norm.weight,
        out_proj.weight                                          <-> H mixer.<same name>
    * L input_layernorm.weight [L self_attention.linear_qkv.layer_norm_weight] <-> H norm.weight
    * L self_attention.linear_qkv.weight         <-> H mixer.q_proj / k_proj / v_proj.weight
    * L self_attention.linear_proj.weight        <-> H mixer.o_proj.weight
    - L pre_mlp_layernorm.weight [L mlp.linear_fc1.layer_norm_weight] <-> H norm.weight
    - L mlp.linear_fc1.weight / linear_fc2       <-> H mixer.up_proj.weight / down_proj
    E L pre_mlp_layernorm.weight                 <-> H norm.weight
    E L mlp.router.weight                        <-> H mixer.gate.weight
    E L mlp.router.expert_bias (zeros if absent) <-> H mixer.gate.e_score_correction_bias
    E L mlp.experts.local_experts.<j>.linear_fc1.weight / linear_fc2
                                                 <-> H mixer.experts.<j>.up_proj.weight / down_proj
    E L mlp.shared_experts.linear_fc1.weight / linear_fc2
                                                 <-> H mixer.shared_experts.up_proj / down_proj

Every tensor maps to exactly one (``linear_qkv``: three) tensors, unchanged. What the
architecture fixes and a megatron model might not have is checked first
(:func:`incompatibilities`): RoPE, gated (SwiGLU) MLPs, softmax routers, MoE layers without
a shared expert or with fewer than two experts, a norm epsilon other than the Mamba gated
norm's fixed 1e-5.
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

ARCHITECTURE = "NemotronHForCausalLM"
MODEL_TYPE = "nemotron_h"

MAMBA_GATED_NORM_EPS = 1e-5
"""megatron-core's ``MambaMixer`` builds its gated RMSNorm with this epsilon, whatever the
config says; Nemotron-H uses ``layer_norm_epsilon`` for it and for the residual norms."""

_ACTIVATIONS = {"squared_relu": "relu2", "gelu": "gelu"}
_FROM_ACT = {v: k for k, v in _ACTIVATIONS.items()}
_BLOCK_TYPES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
_V5_BLOCK_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_FROM_BLOCK = {v: k for types in (_BLOCK_TYPES, _V5_BLOCK_TYPES) for k, v in types.items()}


def _activation_from_hf(act: str) -> str:
    if act not in _FROM_ACT:
        raise ExportError(f"config.json mlp_hidden_act={act!r} is not one of {list(_FROM_ACT)}")
    return _FROM_ACT[act]


# ---- config: ours <-> config.json, one line per pair -----------------------------------------
# The elastic axes' fields (widths, the pattern) take their keys from the sites
# (megatron_ext.elastic.sites, ``hf_names``); this family says how their values convert.

AXIS_CONVERT = {
    "pattern": Convert(
        lambda p: [_V5_BLOCK_TYPES[s] for s in p], lambda t: "".join(_FROM_BLOCK[x] for x in t)
    ),
    "num_experts": Convert(default=8),
    "moe_ffn_hidden_size": Convert(default=0),
}

PAIRS = (
    Pair("vocab_size", "vocab_size"),
    Pair("max_sequence_length", "max_position_embeddings", default=4096),
    Pair("num_query_groups", "num_key_value_heads"),
    Pair("kv_channels", "head_dim"),
    Pair("activation", "mlp_hidden_act", _ACTIVATIONS.__getitem__, _activation_from_hf,
         default="squared_relu"),
    Pair("mamba_state_dim", "ssm_state_size"),
    Pair("mamba_num_groups", "n_groups"),
    Pair("mamba_chunk_size", "chunk_size", default=128),
    Pair("moe_router_topk", "num_experts_per_tok", default=1),
    Pair("moe_shared_expert_ffn_hidden_size", "moe_shared_expert_intermediate_size", default=0),
    Pair("moe_router_topk_scaling_factor", "routed_scaling_factor", float, float, default=1.0),
    Pair("tie_embeddings", "tie_word_embeddings", bool, bool, default=False),
    Pair("layernorm_epsilon", "layer_norm_epsilon", default=1e-5),
    Pair("init_method_std", "initializer_range", default=0.02),
)  # fmt: skip
"""The fields of no elastic axis."""


def pairs() -> tuple[Pair, ...]:
    """Every field's pair: :data:`PAIRS` and the registered sites' axis fields."""
    return PAIRS + axis_pairs(MODEL_TYPE, AXIS_CONVERT)


FIXED = (
    Fixed("n_group", 1, "grouped expert routing has no megatron equivalent here"),
    Fixed("topk_group", 1, "grouped expert routing has no megatron equivalent here"),
    Fixed("moe_latent_size", None, "latent MoE projections are not built here"),
    Fixed("n_shared_experts", 1, "megatron's MoE layer has one shared expert"),
    Fixed("use_bias", False, "biases are not built here"),
    Fixed("mlp_bias", False, "biases are not built here"),
    Fixed("attention_bias", False, "biases are not built here"),
    Fixed("mamba_proj_bias", False, "biases are not built here"),
    Fixed("use_conv_bias", True, "megatron's Mamba conv1d has a bias"),
    Fixed("mamba_hidden_act", "silu", "megatron's Mamba uses SiLU"),
    Fixed("residual_in_fp32", False, "the residual stays in the model's dtype"),
    Fixed("num_nextn_predict_layers", 0, "multi-token prediction layers are not built here"),
)


def to_hf_config(
    cfg: HybridModelConfig, tokenizer: Tokenizer | None = None, conv_kernel: int = 4
) -> dict[str, Any]:
    """The Nemotron-H ``config.json`` of ``cfg`` (checked by the caller: :attr:`FAMILY`.check).

    ``expand`` is informational (the mixer width is ``mamba_num_heads * mamba_head_dim``).
    ``time_step_min`` and ``time_step_limit[0]`` are 0: Nemotron-H clamps softplus(dt) from
    below, megatron does not clamp, and softplus is positive, so a floor of 0 is no clamp.
    """
    eod, pad = _special_ids(tokenizer)
    topk = cfg.moe_router_topk
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "dtype": cfg.params_dtype,
        **config_to_hf(pairs(), FIXED, cfg),
        "hybrid_override_pattern": cfg.pattern,  # the field of pre-v5 loaders
        "num_hidden_layers": cfg.num_layers,
        "attention_dropout": 0.0,
        "conv_kernel": conv_kernel,
        "expand": max(1, round(cfg.mamba_d_inner / cfg.hidden_size)),
        "time_step_min": 0.0,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "time_step_limit": [0.0, float("inf")],
        "norm_topk_prob": topk > 1,  # megatron renormalises sigmoid top-k scores iff k > 1
        "bos_token_id": None,
        "eos_token_id": eod,
        "pad_token_id": pad,
        "use_cache": True,
    }


def from_hf_config(hf: dict[str, Any], **overrides: Any) -> HybridModelConfig:
    """The :class:`HybridModelConfig` of a Nemotron-H ``config.json``; refuses what megatron
    cannot build the same (latent MoE, grouped routing, k>1 without renormalisation, biases)."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ExportError(f"config.json model_type={hf.get('model_type')!r} is not {MODEL_TYPE}")
    hf = dict(hf)
    if "layers_block_type" not in hf and "hybrid_override_pattern" in hf:
        hf["layers_block_type"] = [_BLOCK_TYPES[s] for s in hf["hybrid_override_pattern"]]
    if hf.get("num_key_value_heads") is None:
        hf["num_key_value_heads"] = hf.get("num_attention_heads")
    fields = config_from_hf(pairs(), FIXED, hf)
    topk = fields["moe_router_topk"]
    if "E" in fields["pattern"] and bool(hf.get("norm_topk_prob", topk > 1)) != (topk > 1):
        raise ExportError(
            f"config.json norm_topk_prob={hf.get('norm_topk_prob')!r} with num_experts_per_tok="
            f"{topk}: megatron renormalises top-k scores iff k > 1"
        )
    fields.update(
        name=MODEL_TYPE,
        position_embedding_type="none",
        moe_router_score_function="sigmoid",
        params_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
    )
    fields.update(overrides)
    return HybridModelConfig(**fields)


def _special_ids(tokenizer: Tokenizer | None) -> tuple[int | None, int | None]:
    if tokenizer is None:
        return None, None
    try:
        pad = tokenizer.pad
    except AttributeError:
        pad = None
    return tokenizer.eod, pad


def incompatibilities(cfg: HybridModelConfig) -> list[str]:
    """Why ``cfg`` cannot be written as Nemotron-H (empty when it can)."""
    problems = []
    if cfg.has("*") and cfg.position_embedding_type != "none":
        problems.append(
            f"model.position_embedding_type={cfg.position_embedding_type!r}: Nemotron-H "
            "attention has no position embedding (no RoPE); only position_embedding_type=none "
            "models compute the same there"
        )
    if cfg.qk_layernorm:
        problems.append("model.qk_layernorm=true: Nemotron-H attention has no query/key norm")
    if (cfg.has("-") or cfg.has("E")) and cfg.activation not in _ACTIVATIONS:
        problems.append(
            f"model.activation={cfg.activation!r}: Nemotron-H MLPs and experts are not gated "
            f"(up_proj -> act -> down_proj); supported: {sorted(_ACTIVATIONS)}"
        )
    if cfg.has("E"):
        if cfg.moe_router_score_function != "sigmoid":
            problems.append(
                f"model.moe_router_score_function={cfg.moe_router_score_function!r}: the "
                "Nemotron-H router is a sigmoid router"
            )
        if not cfg.moe_shared_expert_ffn_hidden_size:
            problems.append(
                "model.moe_shared_expert_ffn_hidden_size=0: every Nemotron-H MoE layer adds a "
                "shared expert"
            )
        if cfg.num_experts < 2:
            problems.append(
                f"model.num_experts={cfg.num_experts}: the Nemotron-H router ranks expert "
                "groups by their two best scores, so it needs at least 2 experts"
            )
    if cfg.has("M") and cfg.layernorm_epsilon != MAMBA_GATED_NORM_EPS:
        problems.append(
            f"model.layernorm_epsilon={cfg.layernorm_epsilon}: megatron's Mamba gated norm "
            f"uses {MAMBA_GATED_NORM_EPS} and Nemotron-H uses layer_norm_epsilon for every "
            f"norm, so they agree only at {MAMBA_GATED_NORM_EPS}"
        )
    return problems


# ---- tensors: ours <-> HF, one line per pair -------------------------------------------------

_GLOBAL = {
    "embedding.word_embeddings.weight": "backbone.embeddings.weight",
    "decoder.final_norm.weight": "backbone.norm_f.weight",
    "output_layer.weight": "lm_head.weight",
}
_NORMS = {  # the pre-norm of each layer kind, local name and TE fused name
    "M": ("norm.weight", "mixer.in_proj.layer_norm_weight"),
    "*": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    "-": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    "E": ("pre_mlp_layernorm.weight",),
}
_MAMBA = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias")
_LAYER: dict[str, dict[str, tuple[str, ...]]] = {
    "M": {
        **{f"mixer.{n}": (f"mixer.{n}",) for n in _MAMBA},
        "mixer.norm.weight": ("mixer.norm.weight",),
        "mixer.out_proj.weight": ("mixer.out_proj.weight",),
    },
    "*": {
        "self_attention.linear_qkv.weight": (
            "mixer.q_proj.weight",
            "mixer.k_proj.weight",
            "mixer.v_proj.weight",
        ),
        "self_attention.linear_proj.weight": ("mixer.o_proj.weight",),
    },
    "-": {
        "mlp.linear_fc1.weight": ("mixer.up_proj.weight",),
        "mlp.linear_fc2.weight": ("mixer.down_proj.weight",),
    },
    "E": {
        "mlp.router.weight": ("mixer.gate.weight",),
        "mlp.router.expert_bias": ("mixer.gate.e_score_correction_bias",),
        "mlp.shared_experts.linear_fc1.weight": ("mixer.shared_experts.up_proj.weight",),
        "mlp.shared_experts.linear_fc2.weight": ("mixer.shared_experts.down_proj.weight",),
    },
}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")


def hf_names(key: str, cfg: HybridModelConfig) -> tuple[str, ...]:
    """The Nemotron-H tensor name(s) of megatron state-dict entry ``key`` (``()``: none, for
    ``_extra_state``); :class:`ExportError` for a tensor Nemotron-H has no place for."""
    if key.endswith("._extra_state"):
        return ()
    if key in _GLOBAL:
        return (_GLOBAL[key],)
    match = _LAYER_KEY.match(key)
    if match is not None:
        i, rest = int(match[1]), match[2]
        symbol = cfg.pattern[i]
        head = f"backbone.layers.{i}."
        if rest in _NORMS[symbol]:
            return (f"{head}norm.weight",)
        if rest in _LAYER[symbol]:
            return tuple(head + n for n in _LAYER[symbol][rest])
        expert = _EXPERT.match(rest) if symbol == "E" else None
        if expert is not None:
            proj = "up_proj" if expert[2] == "1" else "down_proj"
            return (f"{head}mixer.experts.{expert[1]}.{proj}.weight",)
    raise ExportError(f"no Nemotron-H name for megatron tensor {key!r}; this layer has no HF twin")


def complete(out: dict[str, Tensor], cfg: HybridModelConfig) -> None:
    """Add ``lm_head`` for tied models and a zero expert bias where megatron has none."""
    if "lm_head.weight" not in out:  # tied embeddings: the head is the embedding
        out["lm_head.weight"] = out["backbone.embeddings.weight"].clone()
    for i, symbol in enumerate(cfg.pattern):
        bias = f"backbone.layers.{i}.mixer.gate.e_score_correction_bias"
        if symbol == "E" and bias not in out:  # no expert bias: zeros route the same
            out[bias] = torch.zeros(cfg.num_experts, dtype=torch.float32)


def redundant(name: str, value: Tensor, tensors: dict[str, Tensor]) -> bool:
    """A zero expert bias routes like none; a head equal to the embedding is tied."""
    if name.endswith("e_score_correction_bias"):
        return not bool(value.any())
    if name == "lm_head.weight":
        return torch.equal(value, tensors["backbone.embeddings.weight"])
    return False


FAMILY = HFFamily(
    name=MODEL_TYPE,
    model_types=(MODEL_TYPE,),
    architecture=lambda cfg: (ARCHITECTURE, MODEL_TYPE),
    incompatibilities=incompatibilities,
    config_to_hf=to_hf_config,
    config_from_hf=from_hf_config,
    names=hf_names,
    complete=complete,
    redundant=redundant,
)
