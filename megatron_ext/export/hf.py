"""The Hugging Face export: safetensors + ``config.json`` of the Nemotron-H architecture.

The target is ``transformers``' ``NemotronHForCausalLM`` (``model_type: nemotron_h``), the
architecture of NVIDIA's Nemotron-H and Nemotron Nano v3 releases. Weights are written under
the names of those releases' checkpoints (``backbone.`` prefix, one 2-D tensor per routed
expert); ``transformers`` >= 5 renames ``backbone.`` to ``model.`` and stacks the experts
when it loads them (its ``conversion_mapping``), and loaders of the original layout read
them as they are.

Name mapping, megatron-core (local spec; the Transformer Engine spec's fused norm names in
brackets) to Nemotron-H. ``L`` is ``decoder.layers.<i>.`` and ``H`` is ``backbone.layers.<i>.``;
the first column is the layer's symbol in the hybrid pattern::

      embedding.word_embeddings.weight           -> backbone.embeddings.weight
      decoder.final_norm.weight                  -> backbone.norm_f.weight
      output_layer.weight (embedding if tied)    -> lm_head.weight
    M L norm.weight                              -> H norm.weight
        [L mixer.in_proj.layer_norm_weight]
    M L mixer.in_proj.weight, conv1d.weight, conv1d.bias, A_log, D, dt_bias, norm.weight,
        out_proj.weight                          -> H mixer.<same name>
    * L input_layernorm.weight                   -> H norm.weight
        [L self_attention.linear_qkv.layer_norm_weight]
    * L self_attention.linear_qkv.weight         -> H mixer.q_proj / k_proj / v_proj.weight
    * L self_attention.linear_proj.weight        -> H mixer.o_proj.weight
    - L pre_mlp_layernorm.weight                 -> H norm.weight
        [L mlp.linear_fc1.layer_norm_weight]
    - L mlp.linear_fc1.weight / linear_fc2       -> H mixer.up_proj.weight / down_proj
    E L pre_mlp_layernorm.weight                 -> H norm.weight
    E L mlp.router.weight                        -> H mixer.gate.weight
    E L mlp.router.expert_bias (zeros if absent) -> H mixer.gate.e_score_correction_bias
    E L mlp.experts.local_experts.<j>.linear_fc1.weight / linear_fc2
                                                 -> H mixer.experts.<j>.up_proj.weight / down_proj
    E L mlp.shared_experts.linear_fc1.weight / linear_fc2
                                            -> H mixer.shared_experts.up_proj.weight / down_proj

megatron's ``linear_qkv`` rows are interleaved per query group: ``[q_0 .. q_{h/g-1}, k, v]``
for each of the ``g`` groups, each ``kv_channels`` rows. ``q_proj`` holds the query heads in
group order (head ``j`` of group ``i`` is head ``i*h/g + j``), which is the order in which
``repeat_kv`` pairs query heads with key/value heads, so the split is exact.

Every tensor maps to exactly one (or, for ``linear_qkv``, three) tensors, unchanged: the
mapping is a permutation of the numbers. Behaviour that the architecture fixes and a
megatron model might not have is checked first (:func:`check_hf_compatible`): the export
refuses RoPE, gated (SwiGLU) MLPs, softmax routers, MoE layers without a shared expert or
with fewer than two experts, and a norm epsilon other than the Mamba gated norm's fixed 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from megatron_ext.data.tokenizer import Tokenizer
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.slicing import slice_model
from megatron_ext.export import ExportError, ExportResult
from megatron_ext.export.tokenizer import write_hf_tokenizer
from megatron_ext.models.config import (
    MODEL_CONFIG_FILE,
    HybridModelConfig,
    load_model_config,
    save_model_config,
)

HF_ARCHITECTURE = "NemotronHForCausalLM"
HF_MODEL_TYPE = "nemotron_h"
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3

MAMBA_GATED_NORM_EPS = 1e-5
"""megatron-core's ``MambaMixer`` builds its gated RMSNorm with this epsilon, whatever the
config says; Nemotron-H uses ``layer_norm_epsilon`` for it and for the residual norms."""

_ACTIVATIONS = {"squared_relu": "relu2", "gelu": "gelu"}
_BLOCK_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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
_LAYER = {
    "M": {
        **{f"mixer.{n}": f"mixer.{n}" for n in _MAMBA},
        "mixer.norm.weight": "mixer.norm.weight",
        "mixer.out_proj.weight": "mixer.out_proj.weight",
    },
    "*": {"self_attention.linear_proj.weight": "mixer.o_proj.weight"},
    "-": {
        "mlp.linear_fc1.weight": "mixer.up_proj.weight",
        "mlp.linear_fc2.weight": "mixer.down_proj.weight",
    },
    "E": {
        "mlp.router.weight": "mixer.gate.weight",
        "mlp.router.expert_bias": "mixer.gate.e_score_correction_bias",
        "mlp.shared_experts.linear_fc1.weight": "mixer.shared_experts.up_proj.weight",
        "mlp.shared_experts.linear_fc2.weight": "mixer.shared_experts.down_proj.weight",
    },
}
_QKV = "self_attention.linear_qkv.weight"
_QKV_HF = ("mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight")
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")


# ---- compatibility and config ----------------------------------------------------------------


def hf_incompatibilities(cfg: HybridModelConfig) -> list[str]:
    """Why ``cfg`` cannot be written as Nemotron-H (empty when it can)."""
    problems = []
    if cfg.has("*") and cfg.position_embedding_type != "none":
        problems.append(
            f"model.position_embedding_type={cfg.position_embedding_type!r}: Nemotron-H "
            "attention has no position embedding (no RoPE); only position_embedding_type=none "
            "models compute the same there"
        )
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


def check_hf_compatible(cfg: HybridModelConfig) -> None:
    """Raise :class:`ExportError` listing every reason ``cfg`` is not a Nemotron-H model."""
    problems = hf_incompatibilities(cfg)
    if problems:
        raise ExportError(
            "cannot export to Hugging Face Nemotron-H (NemotronHForCausalLM) exactly:\n  - "
            + "\n  - ".join(problems)
        )


def conv_kernel(state: dict[str, Any]) -> int:
    """The Mamba conv kernel width of a megatron ``state`` (4 when it has no Mamba layer)."""
    for key, value in state.items():
        if key.endswith("mixer.conv1d.weight"):
            return int(value.shape[-1])
    return 4  # megatron's MambaMixer default d_conv; unused without Mamba layers


def hf_config(
    cfg: HybridModelConfig, tokenizer: Tokenizer | None = None, conv_kernel: int = 4
) -> dict[str, Any]:
    """The Nemotron-H ``config.json`` of ``cfg`` (checked with :func:`check_hf_compatible`).

    ``expand`` is informational (the mixer width is ``mamba_num_heads * mamba_head_dim``).
    ``time_step_min`` is 0: Nemotron-H clamps softplus(dt) from below at ``time_step_min``,
    megatron does not clamp, and softplus is positive, so a floor of 0 is no clamp.
    """
    check_hf_compatible(cfg)
    eod = pad = None
    if tokenizer is not None:
        eod = tokenizer.eod
        try:
            pad = tokenizer.pad
        except AttributeError:
            pad = None
    topk = cfg.moe_router_topk
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "dtype": cfg.params_dtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "hybrid_override_pattern": cfg.pattern,
        "layers_block_type": [_BLOCK_TYPES[s] for s in cfg.pattern],
        "num_hidden_layers": cfg.num_layers,
        "max_position_embeddings": cfg.max_sequence_length,
        "tie_word_embeddings": False,  # lm_head.weight is written even for tied models
        "layer_norm_epsilon": cfg.layernorm_epsilon,
        "initializer_range": cfg.init_method_std,
        "residual_in_fp32": False,
        "use_bias": False,
        # attention
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "attention_bias": False,
        "attention_dropout": 0.0,
        # dense MLP
        "intermediate_size": cfg.ffn_hidden_size,
        "mlp_hidden_act": _ACTIVATIONS.get(cfg.activation, "relu2"),
        "mlp_bias": False,
        # Mamba-2
        "mamba_num_heads": cfg.mamba_num_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "ssm_state_size": cfg.mamba_state_dim,
        "n_groups": cfg.mamba_num_groups,
        "conv_kernel": conv_kernel,
        "expand": max(1, round(cfg.mamba_d_inner / cfg.hidden_size)),
        "chunk_size": cfg.mamba_chunk_size,
        "mamba_hidden_act": "silu",
        "use_conv_bias": True,
        "mamba_proj_bias": False,
        "time_step_min": 0.0,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        # MoE
        "n_routed_experts": cfg.num_experts,
        "n_shared_experts": 1,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_ffn_hidden_size,
        "num_experts_per_tok": topk,
        "routed_scaling_factor": float(cfg.moe_router_topk_scaling_factor or 1.0),
        "norm_topk_prob": topk > 1,  # megatron renormalises sigmoid top-k scores iff k > 1
        "n_group": 1,
        "topk_group": 1,
        # tokens
        "bos_token_id": None,
        "eos_token_id": eod,
        "pad_token_id": pad,
        "use_cache": True,
    }


def _require(hf: dict[str, Any], key: str, expected: Any, why: str) -> None:
    value = hf.get(key, expected)
    if value != expected:
        raise ExportError(f"config.json {key}={value!r}: {why} (megatron needs {expected!r})")


def model_config_from_hf(hf: dict[str, Any], **overrides: Any) -> HybridModelConfig:
    """The :class:`HybridModelConfig` of a Nemotron-H ``config.json``; refuses what megatron
    cannot build the same (latent MoE, grouped routing, k>1 without renormalisation, biases).
    """
    if hf.get("model_type") != HF_MODEL_TYPE:
        raise ExportError(f"config.json model_type={hf.get('model_type')!r} is not nemotron_h")
    if "layers_block_type" in hf:
        inverse = {v: k for k, v in _BLOCK_TYPES.items()}
        pattern = "".join(inverse[t] for t in hf["layers_block_type"])
    else:
        pattern = hf["hybrid_override_pattern"]
    topk = int(hf.get("num_experts_per_tok", 1))
    _require(hf, "n_group", 1, "grouped expert routing has no megatron equivalent here")
    _require(hf, "topk_group", 1, "grouped expert routing has no megatron equivalent here")
    _require(hf, "moe_latent_size", None, "latent MoE projections are not built here")
    _require(hf, "norm_topk_prob", topk > 1, "megatron renormalises top-k scores iff k > 1")
    for key in ("use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias"):
        _require(hf, key, False, "biases are not built here")
    _require(hf, "mamba_hidden_act", "silu", "megatron's Mamba uses SiLU")
    activations = {v: k for k, v in _ACTIVATIONS.items()}
    act = hf.get("mlp_hidden_act", "relu2")
    if act not in activations:
        raise ExportError(f"config.json mlp_hidden_act={act!r} is not one of {list(activations)}")
    fields: dict[str, Any] = dict(
        name="nemotron_h",
        pattern=pattern,
        hidden_size=hf["hidden_size"],
        vocab_size=hf["vocab_size"],
        max_sequence_length=hf.get("max_position_embeddings", 4096),
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        kv_channels=hf["head_dim"],
        position_embedding_type="none",
        ffn_hidden_size=hf["intermediate_size"],
        activation=activations[act],
        mamba_num_heads=hf["mamba_num_heads"],
        mamba_head_dim=hf["mamba_head_dim"],
        mamba_state_dim=hf["ssm_state_size"],
        mamba_num_groups=hf["n_groups"],
        mamba_chunk_size=hf.get("chunk_size", 128),
        num_experts=hf.get("n_routed_experts", 8),
        moe_router_topk=topk,
        moe_ffn_hidden_size=hf.get("moe_intermediate_size", 0),
        moe_shared_expert_ffn_hidden_size=hf.get("moe_shared_expert_intermediate_size", 0),
        moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        init_method_std=hf.get("initializer_range", 0.02),
        params_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
    )
    fields.update(overrides)
    return HybridModelConfig(**fields)


# ---- tensor mapping --------------------------------------------------------------------------


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
            return (f"{head}{_LAYER[symbol][rest]}",)
        if symbol == "*" and rest == _QKV:
            return tuple(head + n for n in _QKV_HF)
        expert = _EXPERT.match(rest) if symbol == "E" else None
        if expert is not None:
            proj = "up_proj" if expert[2] == "1" else "down_proj"
            return (f"{head}mixer.experts.{expert[1]}.{proj}.weight",)
    raise ExportError(f"no Nemotron-H name for megatron tensor {key!r}; this layer has no HF twin")


def _qkv_shape(cfg: HybridModelConfig) -> tuple[int, int, int]:
    groups = cfg.num_query_groups
    return groups, cfg.num_attention_heads // groups, cfg.kv_channels


def split_qkv(weight: Tensor, cfg: HybridModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """megatron's per-group interleaved ``linear_qkv`` weight as (q, k, v) projection weights."""
    groups, per_group, kv = _qkv_shape(cfg)
    w = weight.view(groups, per_group + 2, kv, weight.shape[-1])
    q = w[:, :per_group].reshape(-1, weight.shape[-1])
    k = w[:, per_group].reshape(-1, weight.shape[-1])
    v = w[:, per_group + 1].reshape(-1, weight.shape[-1])
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: HybridModelConfig) -> Tensor:
    """The inverse of :func:`split_qkv`."""
    groups, per_group, kv = _qkv_shape(cfg)
    hidden = q.shape[-1]
    parts = (
        q.view(groups, per_group, kv, hidden),
        k.view(groups, 1, kv, hidden),
        v.view(groups, 1, kv, hidden),
    )
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def megatron_to_hf(state: dict[str, Any], cfg: HybridModelConfig) -> dict[str, Tensor]:
    """Nemotron-H tensors of a megatron (TP=1) state dict; every tensor is used exactly once."""
    check_hf_compatible(cfg)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        names = hf_names(key, cfg)
        if not names:
            continue
        if not isinstance(value, Tensor):
            raise ExportError(f"{key}: expected a tensor, got {type(value).__name__}")
        tensors = split_qkv(value, cfg) if len(names) == 3 else (value,)
        for name, tensor in zip(names, tensors):
            out[name] = tensor.detach().clone().contiguous()
    if "lm_head.weight" not in out:  # tied embeddings: the head is the embedding
        out["lm_head.weight"] = out["backbone.embeddings.weight"].clone()
    for i, symbol in enumerate(cfg.pattern):
        bias = f"backbone.layers.{i}.mixer.gate.e_score_correction_bias"
        if symbol == "E" and bias not in out:  # no expert bias: zeros route the same
            out[bias] = torch.zeros(cfg.num_experts, dtype=torch.float32)
    return out


def hf_to_megatron(
    tensors: dict[str, Tensor], cfg: HybridModelConfig, keys: dict[str, Any]
) -> dict[str, Any]:
    """The megatron state dict with entries ``keys`` (a model's ``state_dict()``) from
    Nemotron-H ``tensors``; refuses tensors left over unless they change nothing."""
    out: dict[str, Any] = {}
    used: set[str] = set()
    for key, template in keys.items():
        names = hf_names(key, cfg)
        if not names:
            out[key] = template
            continue
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ExportError(f"{key}: the Hugging Face checkpoint has no {missing}")
        used.update(names)
        parts = [tensors[n] for n in names]
        value = merge_qkv(parts[0], parts[1], parts[2], cfg) if len(parts) == 3 else parts[0]
        if tuple(value.shape) != tuple(template.shape):
            raise ExportError(f"{key}: shape {tuple(value.shape)} != {tuple(template.shape)}")
        out[key] = value.to(template.dtype)
    for name in sorted(set(tensors) - used):
        value = tensors[name]
        if name.endswith("e_score_correction_bias") and not bool(value.any()):
            continue  # a zero bias routes like no bias
        if name == "lm_head.weight" and torch.equal(value, tensors["backbone.embeddings.weight"]):
            continue  # tied
        raise ExportError(f"{name}: the megatron model of this config has no place for it")
    return out


# ---- files -----------------------------------------------------------------------------------


def write_safetensors(
    tensors: dict[str, Tensor], directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[Path]:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` plus the index."""
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        path = directory / SINGLE_FILE
        save_file(shards[0], str(path), metadata=meta)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=meta)
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return [*paths, directory / INDEX_FILE]


def read_safetensors(directory: str | Path) -> dict[str, Tensor]:
    """Every tensor of a single-file or sharded safetensors checkpoint in ``directory``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        index = json.loads((directory / INDEX_FILE).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}")
    out: dict[str, Tensor] = {}
    for name in files:
        out.update(load_file(str(directory / name)))
    return out


def save_hf(
    cfg: HybridModelConfig,
    state: dict[str, Any],
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a (sliced, TP=1) megatron ``state`` of ``cfg`` as a Nemotron-H checkpoint.

    Also writes the project's ``model_config.json`` (for an exact :func:`load_hf`) and the
    tokenizer files. ``directory`` is replaced if it exists.
    """
    config = hf_config(cfg, tokenizer, conv_kernel(state))
    return write_hf_dir(
        directory, megatron_to_hf(state, cfg), config, cfg, tokenizer, max_shard_bytes
    )


def write_hf_dir(
    directory: str | Path,
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    cfg: HybridModelConfig,
    tokenizer: Tokenizer | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Replace ``directory`` with ``tensors`` (safetensors), ``config`` (``config.json``),
    the project's ``model_config.json`` and the tokenizer files."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    write_safetensors(tensors, directory, max_shard_bytes)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    save_model_config(cfg, directory)
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, directory, cfg.max_sequence_length)
    return directory


def export_hf(
    model: nn.Module,
    widths: dict[str, int],
    out_dir: str | Path,
    *,
    budget: str = "",
    controller: ElasticController | None = None,
    tokenizer: Tokenizer | None = None,
    pg_collection=None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ExportResult:
    """Slice ``model`` (TP=1) at ``widths`` and write it as Nemotron-H into ``out_dir``."""
    del pg_collection  # the slice is in memory; nothing collective happens
    ctrl_cfg = controller.model if controller is not None else None
    if ctrl_cfg is not None:
        check_hf_compatible(ctrl_cfg)  # refuse before slicing
    cfg, state = slice_model(model, widths, controller)
    path = save_hf(cfg, state, out_dir, tokenizer, max_shard_bytes)
    return ExportResult.of("hf", budget, path, architecture=HF_ARCHITECTURE)


def load_hf(directory: str | Path, pg_collection=None, backend: str = "auto") -> nn.Module:
    """The megatron-core model (TP=1) of a Nemotron-H checkpoint directory, weights loaded.

    With the project's ``model_config.json`` beside ``config.json`` (as :func:`save_hf`
    writes it), the fields Nemotron-H does not describe (name, tied embeddings, expert-bias
    updates, dispatcher) come from it, after checking that both describe the same shape;
    otherwise expert bias is enabled iff some ``e_score_correction_bias`` is not zero.
    """
    from megatron_ext.models.builder import build_model
    from megatron_ext.parallel import ParallelConfig

    directory = Path(directory)
    hf = json.loads((directory / CONFIG_FILE).read_text())
    tensors = read_safetensors(directory)
    if (directory / MODEL_CONFIG_FILE).is_file():
        base = load_model_config(directory)
        derived = model_config_from_hf(hf, tie_embeddings=base.tie_embeddings)
        keep = (
            "name",
            "rotary_base",
            "moe_router_enable_expert_bias",
            "init_method_std",
            "moe_token_dispatcher_type",
        )
        cfg = dataclasses.replace(derived, **{f: getattr(base, f) for f in keep})
        if cfg != base:
            diff = [
                f.name
                for f in dataclasses.fields(cfg)
                if getattr(cfg, f.name) != getattr(base, f.name)
            ]
            raise ExportError(f"{directory}: config.json and {MODEL_CONFIG_FILE} differ in {diff}")
    else:
        bias = any(bool(t.any()) for n, t in tensors.items() if n.endswith("correction_bias"))
        cfg = model_config_from_hf(hf, moe_router_enable_expert_bias=bias)
    model = build_model(cfg, ParallelConfig(), pg_collection, backend=backend, initialize=False)
    model.load_state_dict(hf_to_megatron(tensors, cfg, model.state_dict()), strict=True)
    return model


__all__ = [
    "HF_ARCHITECTURE",
    "check_hf_compatible",
    "export_hf",
    "hf_config",
    "hf_incompatibilities",
    "hf_names",
    "hf_to_megatron",
    "load_hf",
    "megatron_to_hf",
    "merge_qkv",
    "model_config_from_hf",
    "read_safetensors",
    "save_hf",
    "write_hf_dir",
    "split_qkv",
]
