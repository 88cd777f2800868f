"""Our :class:`HybridModelConfig` and megatron-core's model configuration: one mapping, both ways.

:data:`PAIRS` lists, per field, our name and megatron-core's ``TransformerConfig`` name with
the conversion each way (``to`` ours → megatron, ``back`` megatron → ours); ``moe`` pairs
apply to stacks with MoE layers only. :data:`FIXED` (and :data:`FIXED_MOE`) are megatron
settings the project always uses, with no field of ours. The activation and the parameter
dtype map to more than one megatron field and are written out in :func:`to_megatron` and
:func:`from_megatron`, next to each other.

:func:`mamba_model_arguments` are the fields megatron takes as ``MambaModel`` arguments
rather than config fields. The builder (:func:`megatron_ext.models.builder.transformer_config`)
adds the parallel layout and the CPU settings; the NeMo exporter adds NeMo's own fields
(:mod:`megatron_ext.export.nemo`: NeMo's ``SSMConfig`` is a ``TransformerConfig``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_ext.models.config import HybridModelConfig


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)², Nano v3's expert activation.

    Upstream's ``megatron.core.activations.squared_relu`` is wrapped in ``torch.compile``,
    which recompiles for every new expert token count (dynamic MoE shapes); eager is faster.
    """
    return torch.relu(x).square()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ACTIVATION_FUNCTIONS: dict[str, tuple[str, str, bool]] = {
    # ours: (module, function, gated_linear_unit) of megatron's activation_func
    "squared_relu": ("megatron.core.activations", "squared_relu", False),
    "swiglu": ("torch.nn.functional", "silu", True),
    "gelu": ("torch.nn.functional", "gelu", False),
}
_FROM_FUNCTION = {"squared_relu": "squared_relu", "silu": "swiglu", "gelu": "gelu"}


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Pair:
    """One field of ours and its megatron ``TransformerConfig`` field, converted both ways."""

    ours: str
    megatron: str
    to: Callable[[Any], Any] = _same
    back: Callable[[Any], Any] = _same
    moe: bool = False


PAIRS = (
    Pair("hidden_size", "hidden_size"),
    Pair("num_attention_heads", "num_attention_heads"),
    Pair("num_query_groups", "num_query_groups"),
    Pair("kv_channels", "kv_channels"),
    Pair("qk_layernorm", "qk_layernorm", bool, bool),
    Pair("ffn_hidden_size", "ffn_hidden_size"),
    Pair("mamba_num_heads", "mamba_num_heads"),
    Pair("mamba_head_dim", "mamba_head_dim"),
    Pair("mamba_state_dim", "mamba_state_dim"),
    Pair("mamba_num_groups", "mamba_num_groups"),
    Pair("layernorm_epsilon", "layernorm_epsilon"),
    Pair("init_method_std", "init_method_std"),
    Pair("num_experts", "num_moe_experts", moe=True),
    Pair("moe_router_topk", "moe_router_topk", moe=True),
    Pair("moe_ffn_hidden_size", "moe_ffn_hidden_size", moe=True),
    Pair("moe_shared_expert_ffn_hidden_size", "moe_shared_expert_intermediate_size",
         lambda n: n or None, lambda n: n or 0, moe=True),
    Pair("moe_router_score_function", "moe_router_score_function", moe=True),
    Pair("moe_router_topk_scaling_factor", "moe_router_topk_scaling_factor", moe=True),
    Pair("moe_router_enable_expert_bias", "moe_router_enable_expert_bias", moe=True),
    Pair("moe_router_pre_softmax", "moe_router_pre_softmax", bool, bool, moe=True),
    Pair("moe_token_dispatcher_type", "moe_token_dispatcher_type", moe=True),
)  # fmt: skip

FIXED: dict[str, Any] = {"normalization": "RMSNorm", "add_bias_linear": False}
FIXED_MOE: dict[str, Any] = {
    "moe_router_load_balancing_type": "none",  # the elastic losses only; no auxiliary loss
    "moe_aux_loss_coeff": 0.0,
    "moe_grouped_gemm": False,
    "moe_router_dtype": "fp32",
}


def activation_function(name: str, *, eager: bool = False) -> Callable:
    """megatron's ``activation_func`` for our ``activation`` (``eager``: :func:`squared_relu`
    instead of upstream's compiled one, for training; exports name upstream's)."""
    import importlib

    if eager and name == "squared_relu":
        return squared_relu
    module, function, _ = ACTIVATION_FUNCTIONS[name]
    return getattr(importlib.import_module(module), function)


def to_megatron(cfg: HybridModelConfig, *, eager_activation: bool = False) -> dict[str, Any]:
    """``TransformerConfig`` keyword arguments describing ``cfg``'s shape (see the module)."""
    moe = cfg.has("E")
    out: dict[str, Any] = {
        p.megatron: p.to(getattr(cfg, p.ours)) for p in PAIRS if moe or not p.moe
    }
    dtype = DTYPES[cfg.params_dtype]
    out.update(
        num_layers=cfg.num_layers,
        activation_func=activation_function(cfg.activation, eager=eager_activation),
        gated_linear_unit=ACTIVATION_FUNCTIONS[cfg.activation][2],
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        **FIXED,
        **(FIXED_MOE if moe else {}),
    )
    return out


def from_megatron(config: Any) -> dict[str, Any]:
    """Our fields from a megatron ``TransformerConfig`` (or NeMo's ``SSMConfig``): the inverse
    of :func:`to_megatron`. Raises ``ValueError`` for an activation we do not build."""
    moe = bool(getattr(config, "num_moe_experts", None))
    out = {p.ours: p.back(getattr(config, p.megatron)) for p in PAIRS if moe or not p.moe}
    out["num_query_groups"] = config.num_query_groups or config.num_attention_heads
    func = config.activation_func
    gated = bool(config.gated_linear_unit)
    activation = _FROM_FUNCTION.get(getattr(func, "__name__", ""), "")
    if activation not in ACTIVATION_FUNCTIONS or activation == "swiglu" and not gated:
        raise ValueError(f"activation_func {func!r} (gated={gated}) is not supported")
    out["activation"] = activation
    out["params_dtype"] = {v: k for k, v in DTYPES.items()}[config.params_dtype]
    return out


def mamba_model_arguments(cfg: HybridModelConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that megatron's ``MambaModel`` takes as arguments."""
    return dict(
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        hybrid_override_pattern=cfg.pattern,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rotary_base,
    )
