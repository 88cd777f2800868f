"""The typed, validated description of a hybrid model's shape."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.errors import ConfigError as ConfigError
from megatron_ext.errors import require as require
from megatron_ext.run_format import MODEL_CONFIG, read_json, write_json

CORE_ATTENTIONS = ("sdpa", "dot_product")
LAYER_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
ACTIVATIONS = ("squared_relu", "swiglu", "gelu")
POSITION_EMBEDDINGS = ("rope", "none")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class HybridModelConfig:
    """Shape of a hybrid model. ``pattern`` has one symbol per layer: M, *, - or E.

    The defaults are the tiny CPU model; ``conf/model/nano_v3.yaml`` holds the real shape.
    """

    name: str = "tiny_hybrid"
    pattern: str = "M*ME-M*E"
    hidden_size: int = 128
    vocab_size: int = 384
    max_sequence_length: int = 4096
    # attention
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int = 32
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    qk_layernorm: bool = False  # RMSNorm over each query and key head (Qwen3)
    # local backend's core attention: "sdpa" (torch SDPA, causal without an s x s mask) or
    # "dot_product" (megatron's DotProductAttention, which needs a materialised mask on CPU)
    core_attention: str = "sdpa"
    # dense MLP ('-' layers)
    ffn_hidden_size: int = 256
    activation: str = "squared_relu"
    # Mamba ('M' layers)
    mamba_num_heads: int = 8
    mamba_head_dim: int = 16
    mamba_state_dim: int = 16
    mamba_num_groups: int = 2
    mamba_chunk_size: int = 32
    # MoE ('E' layers)
    num_experts: int = 8
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int = 64
    moe_shared_expert_ffn_hidden_size: int = 128
    moe_router_score_function: str = "sigmoid"
    moe_router_topk_scaling_factor: float = 2.5
    moe_router_enable_expert_bias: bool = False
    moe_router_pre_softmax: bool = False  # softmax over all experts, then top-k, no renormalising
    moe_token_dispatcher_type: str = "allgather"
    # the rest
    tie_embeddings: bool = False
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    params_dtype: str = "float32"

    def __post_init__(self) -> None:
        bad = sorted(set(self.pattern) - set(LAYER_SYMBOLS))
        require(
            bool(self.pattern) and not bad,
            "model.pattern",
            f"unknown layer symbols {bad}; use M (Mamba), * (attention), - (MLP), E (MoE)",
        )
        for field in ("hidden_size", "vocab_size", "max_sequence_length"):
            require(getattr(self, field) > 0, f"model.{field}", "must be positive")
        require(
            self.activation in ACTIVATIONS,
            "model.activation",
            f"{self.activation!r} is not one of {ACTIVATIONS}",
        )
        require(
            self.position_embedding_type in POSITION_EMBEDDINGS,
            "model.position_embedding_type",
            f"{self.position_embedding_type!r} is not one of {POSITION_EMBEDDINGS}",
        )
        require(
            self.params_dtype in DTYPES,
            "model.params_dtype",
            f"{self.params_dtype!r} is not one of {DTYPES}",
        )
        require(
            self.core_attention in CORE_ATTENTIONS,
            "model.core_attention",
            f"{self.core_attention!r} is not one of {CORE_ATTENTIONS}",
        )
        if self.has("*"):
            require(
                self.num_attention_heads % self.num_query_groups == 0,
                "model.num_query_groups",
                f"must divide num_attention_heads={self.num_attention_heads}",
            )
        if self.has("M"):
            require(
                self.mamba_num_heads % self.mamba_num_groups == 0,
                "model.mamba_num_groups",
                f"must divide mamba_num_heads={self.mamba_num_heads}",
            )
        if self.has("E"):
            require(
                0 < self.moe_router_topk <= self.num_experts,
                "model.moe_router_topk",
                f"must be in [1, num_experts={self.num_experts}]",
            )
            require(
                self.moe_router_score_function in ("softmax", "sigmoid"),
                "model.moe_router_score_function",
                "must be 'softmax' or 'sigmoid'",
            )

    def has(self, symbol: str) -> bool:
        """Whether the pattern contains at least one layer of kind ``symbol``."""
        return symbol in self.pattern

    def count(self, symbol: str) -> int:
        """How many layers of kind ``symbol`` the pattern has."""
        return self.pattern.count(symbol)

    @property
    def num_layers(self) -> int:
        """Total number of layers."""
        return len(self.pattern)

    @property
    def mamba_d_inner(self) -> int:
        """Mamba inner width: heads × head dim."""
        return self.mamba_num_heads * self.mamba_head_dim


def save_model_config(cfg: HybridModelConfig, directory: str | Path) -> Path:
    """Write ``cfg`` as ``directory/model_config.json``: the shape of the checkpoints there."""
    return write_json(Path(directory) / MODEL_CONFIG, dataclasses.asdict(cfg), indent=1)


def load_model_config(directory: str | Path) -> HybridModelConfig:
    """Read ``directory/model_config.json``; the error names the directory if it is missing."""
    path = Path(directory) / MODEL_CONFIG
    if not path.is_file():
        raise ConfigError(f"{directory}: no {MODEL_CONFIG} (not a run that saved a model)")
    return HybridModelConfig(**read_json(path))
