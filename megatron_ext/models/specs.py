"""Layer specs for the hybrid stack, from upstream megatron-core modules only.

The stack is megatron-core's ``MambaStack`` with its four layer kinds. Which linear, norm
and attention classes fill them comes from a megatron-core ``BackendSpecProvider``: the
local provider (plain PyTorch, CPU-capable) or Transformer Engine's when it is installed.
"""

from __future__ import annotations

from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_ext.compat import have_transformer_engine
from megatron_ext.compat.norms import TorchNorm
from megatron_ext.models.attention import SDPAttention
from megatron_ext.models.config import ConfigError

BACKENDS = ("auto", "local", "te")


def backend_provider(name: str) -> BackendSpecProvider:
    """The spec provider for ``name``: ``local``, ``te``, or ``auto`` (TE when installed)."""
    if name not in BACKENDS:
        raise ConfigError(f"model_backend: {name!r} is not one of {BACKENDS}")
    if name == "auto":
        name = "te" if have_transformer_engine() else "local"
    if name == "te":
        if not have_transformer_engine():
            raise ConfigError("model_backend: 'te' needs transformer-engine (extra 'gpu')")
        return TESpecProvider()
    return LocalSpecProvider()


def _norm(backend: BackendSpecProvider) -> type:
    """The backend's RMSNorm; for the local backend, :class:`TorchNorm` (works with SP)."""
    if isinstance(backend, LocalSpecProvider):
        return TorchNorm
    return backend.layer_norm(rms_norm=True)


def _norm_and_input_linear(backend: BackendSpecProvider):
    """(pre-norm, input linear): fused norm+linear where the backend has it."""
    if backend.fuse_layernorm_and_linear():
        return IdentityOp, backend.column_parallel_layer_norm_linear()
    return _norm(backend), backend.column_parallel_linear()


def core_attention_spec(backend: BackendSpecProvider, core_attention: str = "sdpa") -> type:
    """The core attention class: the backend's, or :class:`SDPAttention` on the local one."""
    if isinstance(backend, LocalSpecProvider) and core_attention == "sdpa":
        return SDPAttention
    return backend.core_attention()


def hybrid_stack_spec(
    backend: BackendSpecProvider,
    num_experts: int,
    *,
    qk_layernorm: bool = False,
    core_attention: str = "sdpa",
) -> ModuleSpec:
    """A ``MambaStack`` spec with Mamba, attention, MLP and MoE layers for ``backend``.

    ``qk_layernorm`` adds upstream's per-head query and key RMSNorm (Qwen3's q_norm/k_norm);
    ``core_attention`` picks the local backend's core attention (:func:`core_attention_spec`).
    """
    norm, in_linear = _norm_and_input_linear(backend)
    qk_norm = _norm(backend) if qk_layernorm else None
    row = backend.row_parallel_linear()
    mamba_layer = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=norm,
            mixer=ModuleSpec(
                module=MambaMixer,
                submodules=MambaMixerSubmodules(in_proj=in_linear, out_proj=row),
            ),
            mamba_bda=get_bias_dropout_add,
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=in_linear,
                    core_attention=core_attention_spec(backend, core_attention),
                    linear_proj=row,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP, submodules=MLPSubmodules(linear_fc1=in_linear, linear_fc2=row)
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    moe = get_moe_module_spec_for_backend(backend, num_experts=max(num_experts, 1))
    moe_layer = ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=_norm(backend),
            mlp=moe,
            mlp_bda=get_bias_dropout_add,
        ),
    )
    return ModuleSpec(
        module=MambaStack,
        submodules=MambaStackSubmodules(
            mamba_layer=mamba_layer,
            attention_layer=attention_layer,
            mlp_layer=mlp_layer,
            moe_layer=moe_layer,
        ),
    )
