"""Quantize a built (elastic) megatron-core model in place by conversion, and turn it back.

Order of conversions: elastic first, then quantization (:func:`convert_to_quantized` accepts
a plain or an elastic model; :func:`megatron_ext.elastic.convert.convert_to_elastic` refuses
a quantized one, and the elastic ``export`` needs :func:`export_quantized` first).

Which linears are quantized (:func:`plan`): every megatron-core ``ColumnParallelLinear`` and
``RowParallelLinear`` (attention ``linear_qkv``/``linear_proj``, Mamba ``in_proj``/``out_proj``,
MLP, routed and shared experts), except

* names matching ``quant.skip`` (the LM head ``output_layer`` by default);
* with ``quant.attention_high_precision``, every linear of an attention layer and of the
  nearest Mamba layer before it (the Nano v3 NVFP4 release policy);
* NVFP4 only: a GEMM whose input dimension is not a multiple of 16, and (``quant.misaligned
  = high_precision``) one whose active input channels at some budget do not fill whole
  16-element blocks, so that its block scales could not slice exactly (docs/design.md
  invariant 5; see :func:`block_misalignment`).

The MoE routers (``TopKRouter``) and the embedding are not linears and stay as they are.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import Attention
from torch import Tensor, nn

from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.slicing import Rules, slice_rules
from megatron_ext.models.config import ConfigError
from megatron_ext.quant.config import QuantConfig
from megatron_ext.quant.formats import NVFP4_BLOCK
from megatron_ext.quant.layers import (
    QuantController,
    is_quantized_module,
    make_plain_linear,
    make_quantized,
)
from megatron_ext.quant.parallel import global_names

_RECORD = "_quant_record"


@dataclass
class QuantRecord:
    """What :func:`convert_to_quantized` did: the controller, and each linear's fate."""

    controller: QuantController
    config: QuantConfig
    modules: dict[str, Any] = field(default_factory=dict)  # quantized linears, by name
    high_precision: dict[str, str] = field(default_factory=dict)  # name -> why


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
    }


def _attention_layers(model: nn.Module) -> set[str]:
    """Prefixes (``decoder.layers.<i>.``, unsharded numbers) of attention layers and of the
    Mamba layer before each: from the model's whole hybrid pattern when it has one (a pipeline
    stage's own layers may not hold the Mamba layer before its first attention layer)."""
    pattern = getattr(model, "hybrid_override_pattern", None)
    if isinstance(pattern, str) and pattern:
        kinds = list(pattern)
    else:
        # imported here: ssm/mamba_mixer.py needs compat.ensure_compat where triton is absent,
        # and this package is reached from the config dataclasses, which load without shims
        from megatron.core.ssm.mamba_mixer import MambaMixer

        kinds = []
        for layer in list(getattr(getattr(model, "decoder", None), "layers", [])):
            attn = isinstance(getattr(layer, "self_attention", None), Attention)
            mamba = isinstance(getattr(layer, "mixer", None), MambaMixer)
            kinds.append("*" if attn else "M" if mamba else "")
    out = set()
    for i, kind in enumerate(kinds):
        if kind != "*":
            continue
        out.add(f"decoder.layers.{i}.")
        before = [j for j in range(i) if kinds[j] == "M"]
        if before:
            out.add(f"decoder.layers.{before[-1]}.")
    return out


def budget_rules(
    controller: ElasticController, budgets: Mapping[str, Mapping[str, int]]
) -> dict[str, Callable[[str], Rules]]:
    """Per budget, the slicing rules (:func:`megatron_ext.elastic.slicing.slice_rules`)."""
    return {name: slice_rules(controller, dict(widths)) for name, widths in budgets.items()}


def block_misalignment(
    name: str, rules: Mapping[str, Callable[[str], Rules]], block: int = NVFP4_BLOCK
) -> str | None:
    """Why linear ``name``'s input blocks of ``block`` would not slice exactly, or ``None``.

    ``rules``: per budget, its slicing rules (:func:`budget_rules`). At every budget each
    block of ``block`` consecutive input channels must be kept whole or dropped whole;
    otherwise a block of the slice mixes channels of different blocks of the full tensor
    and gets another scale.
    """
    for budget, rule in rules.items():
        cols = rule(f"{name}.weight").get(1)
        if cols is None or cols.numel() % block:
            continue
        per_block = cols.view(-1, block).sum(dim=1)
        if bool(((per_block != 0) & (per_block != block)).any()):
            return f"budget {budget} keeps input channels that split {block}-element blocks"
    return None


def plan(
    model: nn.Module,
    cfg: QuantConfig,
    controller: ElasticController | None = None,
    budgets: Mapping[str, Mapping[str, int]] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(names of the linears to quantize, ``{name: why}`` of those that stay unquantized)."""
    linears = _linears(model)
    if not linears:
        raise TypeError(
            "no megatron-core ColumnParallelLinear / RowParallelLinear in the model: fake "
            "quantization needs the local layer spec (model_backend=local), or use quant.backend=te"
        )
    attention = _attention_layers(model) if cfg.attention_high_precision else set()
    rules = budget_rules(controller, budgets) if controller is not None and budgets else {}
    chosen, kept = [], {}
    unsharded = global_names(model)  # patterns and rules name the unsharded model's modules
    for name, module in linears.items():
        if is_quantized_module(module):
            raise TypeError(f"{name} is already quantized; export_quantized() it first")
        glob = unsharded[name]
        skip = next((p for p in cfg.skip if fnmatch.fnmatch(glob, p)), None)
        why = None
        if skip is not None:
            why = f"quant.skip pattern {skip!r}"
        elif getattr(module, "weight", None) is None:
            why = "no weight of its own (shared with the embedding)"
        elif any(glob.startswith(prefix) for prefix in attention):
            why = "attention policy (quant.attention_high_precision)"
        elif cfg.format == "nvfp4":
            k = int(cast(Tensor, module.weight).shape[1])
            if k % NVFP4_BLOCK:
                why = f"input dimension {k} is not a multiple of {NVFP4_BLOCK}"
            elif rules:
                why = block_misalignment(glob, rules)
                if why is not None and cfg.misaligned == "error":
                    raise ConfigError(f"quant.misaligned: {glob}: {why}")
        if why is None:
            chosen.append(name)
        else:
            kept[name] = why
    return chosen, kept


def convert_to_quantized(
    model: nn.Module,
    cfg: QuantConfig,
    *,
    backend: str = "fake",
    controller: ElasticController | None = None,
    budgets: Mapping[str, Mapping[str, int]] | None = None,
    scales: Mapping[str, Mapping[str, float | None]] | None = None,
    prequantized: Sequence[str] = (),
) -> QuantRecord:
    """Quantize ``model``'s linears in place (see :func:`plan`); returns the record.

    ``controller`` and ``budgets`` (the elastic controller and the widths of every budget)
    enable the NVFP4 block-alignment check. ``scales`` gives per module its
    ``input_scale`` and ``weight_scale`` (``None``: follow the weight), e.g. a loaded quant
    state; when given, exactly its modules are quantized. ``prequantized`` names modules
    whose weights already hold dequantized values (inputs are still quantized).
    """
    if _RECORD in model.__dict__:
        raise TypeError("the model is already quantized; export_quantized() it first")
    ctrl = QuantController(cfg.format, backend)
    record = QuantRecord(ctrl, cfg)
    linears = _linears(model)
    if scales is not None:
        unknown = sorted(set(scales) - set(linears))
        if unknown:
            raise KeyError(f"quant state names modules the model does not have: {unknown[:5]}")
        chosen = list(scales)
        record.high_precision = {
            n: "not quantized in the quant state" for n in linears if n not in scales
        }
    else:
        chosen, record.high_precision = plan(model, cfg, controller, budgets)
    for name in chosen:
        given = (scales or {}).get(name, {})
        record.modules[name] = make_quantized(
            linears[name],
            ctrl,
            quant_weight=name not in prequantized,
            input_scale=given.get("input_scale"),
            weight_scale=given.get("weight_scale"),
        )
    model.__dict__[_RECORD] = record
    return record


def export_quantized(model: nn.Module) -> nn.Module:
    """Turn every quantized linear of ``model`` back into its previous class."""
    model.__dict__.pop(_RECORD, None)
    for module in model.modules():
        make_plain_linear(module)
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` was quantized and not exported since."""
    return _RECORD in model.__dict__


def quant_record(model: nn.Module) -> QuantRecord:
    """The record of :func:`convert_to_quantized` on ``model``."""
    record = model.__dict__.get(_RECORD)
    if record is None:
        raise TypeError("the model is not quantized; call convert_to_quantized first")
    return record
