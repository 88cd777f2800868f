"""Build megatron-core's ``MambaModel`` (the hybrid stack) from a :class:`HybridModelConfig`."""

from __future__ import annotations

import contextlib

import torch
from megatron.core.models.mamba.mamba_model import MambaModel
from megatron.core.transformer import TransformerConfig

from megatron_ext.models.config import HybridModelConfig
from megatron_ext.models.megatron_config import (  # noqa: F401 (squared_relu: re-exported)
    DTYPES,
    mamba_model_arguments,
    squared_relu,
    to_megatron,
)
from megatron_ext.models.specs import backend_provider, hybrid_stack_spec
from megatron_ext.parallel import ParallelConfig


def transformer_config(
    model: HybridModelConfig, parallel: ParallelConfig, *, initialize: bool = True
) -> TransformerConfig:
    """Translate the model and parallel configs into megatron-core's ``TransformerConfig``.

    The model's shape comes from the one mapping :func:`.megatron_config.to_megatron`; this
    adds the parallel layout and the settings for building on any device (CPU initialisation,
    no fused kernels, no dropout).
    """
    parallel.check_model(model)
    dtype = DTYPES[model.params_dtype]
    return TransformerConfig(
        **to_megatron(model, eager_activation=True),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_mamba_mem_eff_path=False,
        tensor_model_parallel_size=parallel.tp,
        expert_model_parallel_size=parallel.ep,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        pipeline_dtype=dtype,
        sequence_parallel=parallel.use_sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=initialize,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
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
            pg_collection=pg_collection,
            **mamba_model_arguments(model),
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
