"""Build megatron-core's ``MambaModel`` (the hybrid stack) from a :class:`HybridModelConfig`."""

from __future__ import annotations

import contextlib

import torch
from megatron.core.models.mamba.mamba_model import MambaModel
from megatron.core.transformer import TransformerConfig

from megatron_ext.models.config import HybridModelConfig
from megatron_ext.models.specs import backend_provider, hybrid_stack_spec
from megatron_ext.parallel import ParallelConfig


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)², Nano v3's expert activation.

    Upstream's ``megatron.core.activations.squared_relu`` is wrapped in ``torch.compile``,
    which recompiles for every new expert token count (dynamic MoE shapes); eager is faster.
    """
    return torch.relu(x).square()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_config(
    model: HybridModelConfig, parallel: ParallelConfig, *, initialize: bool = True
) -> TransformerConfig:
    """Translate the model and parallel configs into megatron-core's ``TransformerConfig``."""
    parallel.check_model(model)
    dtype = _DTYPES[model.params_dtype]
    activation = {
        "squared_relu": (squared_relu, False),
        "swiglu": (torch.nn.functional.silu, True),
        "gelu": (torch.nn.functional.gelu, False),
    }[model.activation]
    moe = {}
    if model.has("E"):
        moe = dict(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_ffn_hidden_size or None,
            moe_router_score_function=model.moe_router_score_function,
            moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
            moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
            moe_router_pre_softmax=model.moe_router_pre_softmax,
            moe_token_dispatcher_type=model.moe_token_dispatcher_type,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            moe_router_dtype="fp32",
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        activation_func=activation[0],
        gated_linear_unit=activation[1],
        normalization="RMSNorm",
        layernorm_epsilon=model.layernorm_epsilon,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        mamba_state_dim=model.mamba_state_dim,
        mamba_head_dim=model.mamba_head_dim,
        mamba_num_groups=model.mamba_num_groups,
        mamba_num_heads=model.mamba_num_heads,
        use_mamba_mem_eff_path=False,
        tensor_model_parallel_size=parallel.tp,
        expert_model_parallel_size=parallel.ep,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        pipeline_dtype=dtype,
        sequence_parallel=parallel.use_sequence_parallel,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        use_cpu_initialization=True,
        perform_initialization=initialize,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        qk_layernorm=model.qk_layernorm,
        **moe,
    )


def build_model(
    model: HybridModelConfig,
    parallel: ParallelConfig,
    pg_collection=None,
    *,
    backend: str = "auto",
    meta: bool = False,
    initialize: bool = True,
) -> MambaModel:
    """Build the hybrid ``MambaModel`` for this rank's shard.

    With ``meta=True`` no memory is allocated and nothing is initialised: use it to count
    parameters of shapes that do not fit on the machine. ``initialize=False`` allocates but
    skips the random initialisation, for weights that are loaded right after.
    """
    config = transformer_config(model, parallel, initialize=initialize and not meta)
    spec = hybrid_stack_spec(
        backend_provider(backend),
        model.num_experts,
        qk_layernorm=model.qk_layernorm,
        core_attention=model.core_attention,
    )
    first, last = pipeline_stage(pg_collection)
    device = torch.device("meta") if meta else contextlib.nullcontext()
    with device:
        return MambaModel(
            config=config,
            mamba_stack_spec=spec,
            pre_process=first,
            post_process=last,
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_sequence_length,
            hybrid_override_pattern=model.pattern,
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type=model.position_embedding_type,
            rotary_base=model.rotary_base,
            pg_collection=pg_collection,
        )


def pipeline_stage(pg_collection) -> tuple[bool, bool]:
    """(first stage, last stage) of this rank in ``pg_collection.pp``; (True, True) without PP.

    The first stage holds the embedding, the last the final norm and the output layer
    (megatron-core's ``pre_process`` / ``post_process``).
    """
    group = getattr(pg_collection, "pp", None)
    if group is None or group.size() == 1:
        return True, True
    return group.rank() == 0, group.rank() == group.size() - 1


def causal_mask(seq_length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``[1, 1, s, s]`` boolean causal mask (True = masked) megatron's attention expects."""
    return torch.ones(seq_length, seq_length, dtype=torch.bool, device=device).triu(1)[None, None]


def needs_materialised_mask(model: torch.nn.Module) -> bool:
    """Whether some core attention of ``model`` needs :func:`causal_mask` passed in.

    Megatron's local ``DotProductAttention`` does (without one it builds its own on a CUDA
    device); :class:`~megatron_ext.models.attention.SDPAttention` and Transformer Engine's
    attention apply the layers' ``causal`` mask type themselves. A model without attention
    needs none.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return any(type(m) is DotProductAttention for m in model.modules())


def attention_mask(
    model: torch.nn.Module, seq_length: int, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """The mask to pass ``model``'s forward: ``None`` unless its attention needs one."""
    return causal_mask(seq_length, device) if needs_materialised_mask(model) else None
