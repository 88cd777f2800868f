"""Make a built megatron-core ``MambaModel`` elastic in place, and turn it back.

:func:`convert_to_elastic` swaps the class of each module that an elastic axis touches for a
generated ``Elastic<Upstream>`` subclass (ModelOpt ``DynamicModule`` style, see
:mod:`.layers_base`); nothing is copied or re-registered, so ``state_dict`` and
``sharded_state_dict`` keys are upstream's. :func:`export` swaps every module back.

Where each axis acts (names are upstream's):

=================  ===========================================================================
axis               modules
=================  ===========================================================================
``embedding``      ``embedding`` output; the residual norms (``norm``, ``input_layernorm``,
                   ``pre_mlp_layernorm``, ``final_norm``); the outputs of ``mixer.out_proj``,
                   ``linear_proj``, dense ``linear_fc2`` and the whole MoE layer; narrow:
                   the stream holds the active channels, every reader of it (``in_proj``,
                   ``linear_qkv``, ``linear_fc1``, router, shared experts, ``output_layer``)
                   reads their columns and every writer computes their rows
``attn_heads``     input of ``self_attention.linear_proj`` (per head); narrow: the
                   ``self_attention`` computes only the active query heads
``mamba_heads``,   ``mixer.norm``: SSM output masked, per-group RMS over active channels;
``mamba_head_dim`` narrow: the ``mixer`` computes only the active heads / head channels
``ffn``            dense ``linear_fc2`` input; narrow: ``linear_fc1`` rows / ``linear_fc2`` cols
``moe_experts``    ``mlp.router``: inactive logits ``-inf`` before top-k
``moe_ffn``        each routed expert's ``linear_fc2`` input; narrow as ``ffn``
``depth``          every ``decoder.layers.<i>``: a skipped layer returns its input (masked:
                   after running, gated; narrow: not run, no inference cache)
=================  ===========================================================================

Under pipeline parallelism a stage's model holds only its own layers (the embedding on the
first stage, the final norm and output layer on the last); each converts what it holds, and
the stage's ``decoder`` passes full-width tensors between stages (:mod:`.layers_stack`).

Every shard comes from the module's own process group (``tp_group`` of the layer, the
experts' expert-TP group), never from ``parallel_state``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import megatron_ext.models  # noqa: F401  (applies the compat shims before megatron-core's mixer)

# isort: split
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.ssm.mamba_block import MambaStack
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from megatron_ext.elastic.controller import ElasticController, Shard
from megatron_ext.elastic.layers_attention import ElasticQKVLinearMixin, ElasticSelfAttentionMixin
from megatron_ext.elastic.layers_base import is_elastic_module, make_elastic, make_plain
from megatron_ext.elastic.layers_depth import ElasticLayerMixin
from megatron_ext.elastic.layers_linear import ElasticColumnLinearMixin, ElasticRowLinearMixin
from megatron_ext.elastic.layers_mamba import ElasticGatedNormMixin, ElasticMambaMixerMixin
from megatron_ext.elastic.layers_moe import ElasticMoELayerMixin, ElasticRouterMixin
from megatron_ext.elastic.layers_residual import ElasticEmbeddingMixin, ElasticRMSNormMixin
from megatron_ext.elastic.layers_stack import ElasticStackMixin

_RECORD = "_elastic_record"
_QUANT_RECORD = "_quant_record"  # megatron_ext.quant.convert's; quantization comes after

Step = tuple[nn.Module, type, dict[str, Any]]


@dataclass
class ElasticRecord:
    """What :func:`convert_to_elastic` did to a model: its controller and converted modules."""

    controller: ElasticController
    modules: list[nn.Module] = field(default_factory=list)


def convert_to_elastic(model: nn.Module, controller: ElasticController) -> nn.Module:
    """Make ``model`` (a built ``MambaModel``) elastic in place; returns it.

    Raises ``TypeError`` naming the module when a layer kind cannot be made elastic (fused
    TE norm+linear, LayerNorm, grouped-GEMM experts, ...) and ``ValueError`` when the model's
    shapes disagree with ``controller.model``. Nothing is changed when it raises.
    """
    if _RECORD in model.__dict__:
        raise TypeError("the model is already elastic; export() it first")
    if _QUANT_RECORD in model.__dict__:
        raise TypeError("the model is quantized: convert to elastic first, then quantize")
    steps = list(_plan(model, controller))
    record = ElasticRecord(controller)
    for module, mixin, fields in steps:
        record.modules.append(make_elastic(module, mixin, controller, **fields))
    model.__dict__[_RECORD] = record
    return model


def export(model: nn.Module) -> nn.Module:
    """Turn every elastic module of ``model`` back into its upstream class; returns ``model``.

    The weights are untouched: slicing to a budget is :func:`megatron_ext.elastic.slicing.
    slice_model`.
    """
    if _QUANT_RECORD in model.__dict__:
        raise TypeError("the model is quantized; megatron_ext.quant.export_quantized() it first")
    model.__dict__.pop(_RECORD, None)
    for module in model.modules():
        make_plain(module)
    return model


def is_elastic(model: nn.Module) -> bool:
    """Whether ``model`` was converted and not exported since."""
    return _RECORD in model.__dict__


def elastic_controller(model: nn.Module) -> ElasticController:
    """The controller ``model`` was converted with."""
    record = model.__dict__.get(_RECORD)
    if record is None:
        raise TypeError("the model is not elastic; call convert_to_elastic first")
    return record.controller


def elastic_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` whose class is elastic now."""
    return [name for name, m in model.named_modules() if is_elastic_module(m)]


# ---- the plan: which module gets which mixin -----------------------------------------------


def _check(what: str, got: int, ctrl: ElasticController, axis: str) -> None:
    full = ctrl.full_widths.get(axis)
    if full != got:
        raise ValueError(
            f"{what} has {got} along {axis!r} but the controller's model says {full}; "
            "build the controller from the model's own HybridModelConfig"
        )


def _plan(model: nn.Module, ctrl: ElasticController) -> Iterator[Step]:
    embedding = getattr(model, "embedding", None)
    if isinstance(embedding, LanguageModelEmbedding):
        _check("embedding", embedding.word_embeddings.weight.shape[1], ctrl, "embedding")
        yield embedding, ElasticEmbeddingMixin, {}
    decoder: Any = model.decoder
    if isinstance(decoder, MambaStack) and not (decoder.pre_process and decoder.post_process):
        yield decoder, ElasticStackMixin, {}  # a pipeline stage: full width at its boundaries
    for i, layer in enumerate(decoder.layers):
        where = f"decoder.layers.{i}"
        index = layer.layer_number - 1  # global: layer_number counts from 1 across PP stages
        if not 0 <= index < ctrl.full_widths["depth"]:
            raise ValueError(
                f"{where} is layer {index + 1} but the controller's model has "
                f"{ctrl.full_widths['depth']} layers"
            )
        context = isinstance(layer, TransformerLayer)
        yield layer, ElasticLayerMixin, {"elastic_index": index, "elastic_context": context}
        for attr, feeds in (
            ("norm", "mixer"),
            ("input_layernorm", "self_attention"),
            ("pre_mlp_layernorm", "mlp"),
        ):
            yield from _residual_norm(layer, attr, feeds, where)
        for name, child in layer.named_children():
            if isinstance(child, MambaMixer):
                yield from _mamba(child, ctrl, f"{where}.{name}")
            elif isinstance(child, Attention):
                yield from _attention(child, ctrl)
            elif isinstance(child, MoELayer):
                yield from _moe(child, ctrl, f"{where}.{name}")
            elif isinstance(child, MLP):
                yield from _mlp(child, ctrl, "ffn")
    if getattr(decoder, "final_norm", None) is not None:
        yield from _residual_norm(decoder, "final_norm", None, "decoder")
    output = getattr(model, "output_layer", None)
    if isinstance(output, ColumnParallelLinear):
        yield output, ElasticColumnLinearMixin, {"elastic_rows": None, "elastic_glu": False}


def _residual_norm(owner: nn.Module, attr: str, feeds: str | None, where: str) -> Iterator[Step]:
    norm = getattr(owner, attr, None)
    if norm is None:
        return
    if isinstance(norm, IdentityOp):
        fed = getattr(owner, feeds, None) if feeds else None
        if fed is not None and not isinstance(fed, IdentityOp):
            raise TypeError(
                f"{where}.{attr} is fused into the next linear (Transformer Engine "
                "LayerNormLinear); elastic embedding needs separate norms (the local backend)"
            )
        return
    if not isinstance(norm, torch.nn.RMSNorm):
        raise TypeError(
            f"{where}.{attr} is {type(norm).__name__}; elastic embedding supports "
            "torch.nn.RMSNorm (megatron_ext.compat.norms.TorchNorm with normalization=RMSNorm)"
        )
    yield norm, ElasticRMSNormMixin, {}


def _mamba(mixer: MambaMixer, ctrl: ElasticController, where: str) -> Iterator[Step]:
    if not mixer.rmsnorm:
        raise TypeError(f"{where}: elastic Mamba heads need the mixer's gated norm (rmsnorm=True)")
    if mixer.cp.cp_size > 1:
        raise TypeError(f"{where}: elastic Mamba heads do not support context parallelism yet")
    _check(f"{where} (heads)", mixer.nheads, ctrl, "mamba_heads")
    _check(f"{where} (head dim)", mixer.headdim, ctrl, "mamba_head_dim")
    heads = {"elastic_heads": Shard.of(mixer.tp_group)}
    yield mixer, ElasticMambaMixerMixin, heads
    yield mixer.in_proj, ElasticColumnLinearMixin, {"elastic_rows": None, "elastic_glu": False}
    yield mixer.norm, ElasticGatedNormMixin, heads
    yield mixer.out_proj, ElasticRowLinearMixin, {"elastic_in": None, "elastic_out": True}


def _attention(attn: Attention, ctrl: ElasticController) -> Iterator[Step]:
    _check("self_attention", attn.config.num_attention_heads, ctrl, "attn_heads")
    shard = Shard.of(attn.tp_group)
    site = ("attn_heads", shard, attn.hidden_size_per_attention_head)
    yield attn, ElasticSelfAttentionMixin, {"elastic_heads": shard}
    yield attn.linear_qkv, ElasticQKVLinearMixin, {"elastic_rows": None}
    yield attn.linear_proj, ElasticRowLinearMixin, {"elastic_in": site, "elastic_out": True}


def _mlp(mlp: MLP, ctrl: ElasticController, axis: str) -> Iterator[Step]:
    shard = Shard.of(mlp.tp_group)
    width = mlp.linear_fc2.weight.shape[1] * shard.count
    _check("mlp.linear_fc2 input", width, ctrl, axis)
    glu = bool(mlp.config.gated_linear_unit)
    rows = {"elastic_rows": (axis, shard), "elastic_glu": glu}
    yield mlp.linear_fc1, ElasticColumnLinearMixin, rows
    # routed experts' outputs are masked once, at the MoE layer's output
    out = {"elastic_in": (axis, shard, 1), "elastic_out": axis == "ffn"}
    yield mlp.linear_fc2, ElasticRowLinearMixin, out


def _moe(moe: MoELayer, ctrl: ElasticController, where: str) -> Iterator[Step]:
    if not isinstance(moe.router, TopKRouter):
        raise TypeError(f"{where}.router is {type(moe.router).__name__}, not a TopKRouter")
    if not isinstance(moe.experts, SequentialMLP):
        raise TypeError(
            f"{where}.experts is {type(moe.experts).__name__}; elastic experts need "
            "SequentialMLP (moe_grouped_gemm=False)"
        )
    _check(f"{where}.router", moe.router.weight.shape[0], ctrl, "moe_experts")
    yield moe, ElasticMoELayerMixin, {}
    yield moe.router, ElasticRouterMixin, {}
    for expert in moe.experts.local_experts:
        yield from _mlp(expert, ctrl, "moe_ffn")
    shared = getattr(moe, "shared_experts", None)
    if shared is not None:
        if getattr(shared, "use_shared_expert_gate", False):
            raise TypeError(f"{where}.shared_experts: a shared-expert gate is not elastic yet")
        yield (
            shared.linear_fc1,
            ElasticColumnLinearMixin,
            {"elastic_rows": None, "elastic_glu": False},
        )
        yield shared.linear_fc2, ElasticRowLinearMixin, {"elastic_in": None, "elastic_out": False}
