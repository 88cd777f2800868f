"""Make a built megatron-core ``MambaModel`` elastic in place, and turn it back.

:func:`convert_to_elastic` swaps the class of each module that an elastic axis touches for a
generated ``Elastic<Upstream>`` subclass (ModelOpt ``DynamicModule`` style, see
:mod:`.layers_base`); nothing is copied or re-registered, so ``state_dict`` and
``sharded_state_dict`` keys are upstream's. :func:`export` swaps every module back.

The plan is a walk over the registry of sites (:mod:`megatron_ext.elastic.sites`): each
site yields the steps of its layer kind (``Site.convert_model``, ``convert_layer``,
``convert``, ``convert_model_tail``); a layer child goes to the site of its upstream class.

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

from torch import nn

from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.layers_base import is_elastic_module, make_elastic, make_plain
from megatron_ext.elastic.sites.base import Step
from megatron_ext.elastic.sites.registry import site_for, sites

_RECORD = "_elastic_record"
_QUANT_RECORD = "_quant_record"  # megatron_ext.quant.convert's; quantization comes after


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


# ---- the plan: a walk over the registry of sites ---------------------------------------------


def _plan(model: nn.Module, ctrl: ElasticController) -> Iterator[Step]:
    """Every site's steps: model-level ones, then per layer its own and its children's."""
    walk = sites()
    for site in walk:
        yield from site.convert_model(model, ctrl)
    decoder: Any = model.decoder
    for i, layer in enumerate(decoder.layers):
        where = f"decoder.layers.{i}"
        index = layer.layer_number - 1  # global: layer_number counts from 1 across PP stages
        if not 0 <= index < ctrl.full_widths["depth"]:
            raise ValueError(
                f"{where} is layer {index + 1} but the controller's model has "
                f"{ctrl.full_widths['depth']} layers"
            )
        for site in walk:
            yield from site.convert_layer(layer, index, ctrl, where)
        for name, child in layer.named_children():
            owner = site_for(child)
            if owner is not None:
                yield from owner.convert(child, ctrl, f"{where}.{name}")
    for site in walk:
        yield from site.convert_model_tail(model, ctrl)
