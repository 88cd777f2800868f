"""The Hugging Face format: safetensors + ``config.json`` of a ``transformers`` architecture.

One module per concern: :mod:`.files` (safetensors and configs on disk), :mod:`.mapping`
(the pieces a mapping is written with), :mod:`.family` (the registry: which family a config
or a ``config.json`` is), one module per family with both directions side by side
(:mod:`.nemotron_h`: ``NemotronHForCausalLM``; :mod:`.llama`: ``LlamaForCausalLM`` and
``Qwen3ForCausalLM``) and :mod:`.import_run` (a checkpoint as a parent run).

The functions here dispatch on the family: :func:`save_hf` / :func:`export_hf` write a
(sliced) megatron model, :func:`load_hf` reads any supported checkpoint back into a
megatron-core model. Every tensor maps to one (fused QKV: three; gated ``linear_fc1``: two)
HF tensors, unchanged: the mapping is a permutation of the numbers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from megatron_ext.data.tokenizer import Tokenizer
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.slicing import slice_model
from megatron_ext.export import ExportError, ExportResult
from megatron_ext.export.hf.family import HFFamily, family_for_config, family_for_hf
from megatron_ext.export.hf.files import (
    CONFIG_FILE,
    DEFAULT_SHARD_BYTES,
    INDEX_FILE,
    SINGLE_FILE,
    read_hf_config,
    read_safetensors,
    write_hf_dir,
    write_safetensors,
)
from megatron_ext.export.hf.mapping import merge_qkv, merge_tensors, split_qkv, split_tensor
from megatron_ext.models.config import HybridModelConfig, load_model_config
from megatron_ext.run_format import MODEL_CONFIG

HF_ARCHITECTURE = "NemotronHForCausalLM"  # the hybrid's architecture (see .nemotron_h)


def hf_architecture(cfg: HybridModelConfig) -> str:
    """The ``transformers`` class a config is exported as."""
    return family_for_config(cfg).architecture(cfg)[0]


def hf_incompatibilities(cfg: HybridModelConfig) -> list[str]:
    """Why ``cfg`` cannot be written in its HF family exactly (empty when it can)."""
    return family_for_config(cfg).incompatibilities(cfg)


def check_hf_compatible(cfg: HybridModelConfig) -> None:
    """Raise :class:`ExportError` listing every reason ``cfg`` cannot be written exactly."""
    family_for_config(cfg).check(cfg)


def conv_kernel(state: dict[str, Any]) -> int:
    """The Mamba conv kernel width of a megatron ``state`` (4 when it has no Mamba layer)."""
    for key, value in state.items():
        if key.endswith("mixer.conv1d.weight"):
            return int(value.shape[-1])
    return 4  # megatron's MambaMixer default d_conv; unused without Mamba layers


def hf_config(
    cfg: HybridModelConfig, tokenizer: Tokenizer | None = None, conv_kernel: int = 4
) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` in its family (checked first)."""
    check_hf_compatible(cfg)
    return family_for_config(cfg).config_to_hf(cfg, tokenizer, conv_kernel)


def model_config_from_hf(hf: dict[str, Any], **overrides: Any) -> HybridModelConfig:
    """The :class:`HybridModelConfig` of a ``config.json`` of any supported family."""
    return family_for_hf(hf).config_from_hf(hf, **overrides)


def hf_names(key: str, cfg: HybridModelConfig) -> tuple[str, ...]:
    """The HF tensor name(s) of megatron state-dict entry ``key`` in ``cfg``'s family."""
    return family_for_config(cfg).names(key, cfg)


def megatron_to_hf(state: dict[str, Any], cfg: HybridModelConfig) -> dict[str, Tensor]:
    """HF tensors of a megatron (TP=1) state dict; every tensor is used exactly once."""
    check_hf_compatible(cfg)
    family = family_for_config(cfg)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        names = family.names(key, cfg)
        if not names:
            continue
        if not isinstance(value, Tensor):
            raise ExportError(f"{key}: expected a tensor, got {type(value).__name__}")
        for name, tensor in zip(names, split_tensor(value, len(names), cfg)):
            out[name] = tensor.detach().clone().contiguous()
    family.complete(out, cfg)
    return out


def hf_to_megatron(
    tensors: dict[str, Tensor], cfg: HybridModelConfig, keys: dict[str, Any]
) -> dict[str, Any]:
    """The megatron state dict with entries ``keys`` (a model's ``state_dict()``) from HF
    ``tensors``; refuses tensors left over unless they change nothing."""
    family = family_for_config(cfg)
    out: dict[str, Any] = {}
    used: set[str] = set()
    for key, template in keys.items():
        names = family.names(key, cfg)
        if not names:
            out[key] = template
            continue
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ExportError(f"{key}: the Hugging Face checkpoint has no {missing}")
        used.update(names)
        value = merge_tensors([tensors[n] for n in names], cfg)
        if tuple(value.shape) != tuple(template.shape):
            raise ExportError(f"{key}: shape {tuple(value.shape)} != {tuple(template.shape)}")
        out[key] = value.to(template.dtype)
    for name in sorted(set(tensors) - used):
        if not family.redundant(name, tensors[name], tensors):
            raise ExportError(f"{name}: the megatron model of this config has no place for it")
    return out


def save_hf(
    cfg: HybridModelConfig,
    state: dict[str, Any],
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a (sliced, TP=1) megatron ``state`` of ``cfg`` as an HF checkpoint of its family.

    Also writes the project's ``model_config.json`` (for an exact :func:`load_hf`) and the
    tokenizer files. ``directory`` is replaced if it exists.
    """
    config = hf_config(cfg, tokenizer, conv_kernel(state))
    return write_hf_dir(
        directory, megatron_to_hf(state, cfg), config, cfg, tokenizer, max_shard_bytes
    )


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
    """Slice ``model`` (TP=1) at ``widths`` and write it in its HF family into ``out_dir``."""
    del pg_collection  # the slice is in memory; nothing collective happens
    ctrl_cfg = controller.model if controller is not None else None
    if ctrl_cfg is not None:
        check_hf_compatible(ctrl_cfg)  # refuse before slicing
    cfg, state = slice_model(model, widths, controller)
    path = save_hf(cfg, state, out_dir, tokenizer, max_shard_bytes)
    return ExportResult.of("hf", budget, path, architecture=hf_architecture(cfg))


_KEEP_FROM_PROJECT = (
    "name",
    "moe_router_enable_expert_bias",
    "init_method_std",
    "moe_token_dispatcher_type",
)
"""Fields ``config.json`` does not describe, taken from ``model_config.json`` when present."""


def hf_model_config(directory: str | Path, tensors: dict[str, Tensor]) -> HybridModelConfig:
    """The :class:`HybridModelConfig` of an HF checkpoint directory.

    With the project's ``model_config.json`` beside ``config.json`` (as :func:`save_hf` writes
    it), the fields HF does not describe come from it, after checking that both describe the
    same shape; otherwise expert bias is enabled iff some ``e_score_correction_bias`` is not
    zero.
    """
    directory = Path(directory)
    hf = read_hf_config(directory)
    family = family_for_hf(hf)
    if (directory / MODEL_CONFIG).is_file():
        base = load_model_config(directory)
        derived = family.config_from_hf(hf, tie_embeddings=base.tie_embeddings)
        keep = _KEEP_FROM_PROJECT + (("rotary_base",) if family.name == "nemotron_h" else ())
        cfg = dataclasses.replace(derived, **{f: getattr(base, f) for f in keep})
        if cfg != base:
            diff = [
                f.name
                for f in dataclasses.fields(cfg)
                if getattr(cfg, f.name) != getattr(base, f.name)
            ]
            raise ExportError(f"{directory}: config.json and {MODEL_CONFIG} differ in {diff}")
        return cfg
    bias = any(bool(t.any()) for n, t in tensors.items() if n.endswith("correction_bias"))
    cfg = family.config_from_hf(hf, moe_router_enable_expert_bias=bias)
    return dataclasses.replace(cfg, tie_embeddings=_computes_tied(family, cfg, tensors))


def _computes_tied(family: HFFamily, cfg: HybridModelConfig, tensors: dict[str, Tensor]) -> bool:
    """Whether the checkpoint's head is its embedding: no ``lm_head.weight``, or an equal one.

    ``config.json``'s ``tie_word_embeddings`` is not enough: ``transformers``' Nemotron-H
    never ties, and computes with the ``lm_head.weight`` the file holds.
    """
    (embedding,) = family.names("embedding.word_embeddings.weight", cfg)
    (head,) = family.names("output_layer.weight", cfg)
    return head not in tensors or torch.equal(tensors[head], tensors[embedding])


def load_hf_with_config(
    directory: str | Path, pg_collection=None, backend: str = "auto"
) -> tuple[nn.Module, HybridModelConfig]:
    """The megatron-core model (TP=1) of an HF checkpoint directory, weights loaded, and its
    config."""
    from megatron_ext.models.builder import build_model
    from megatron_ext.parallel import ParallelConfig

    tensors = read_safetensors(directory)
    cfg = hf_model_config(directory, tensors)
    model = build_model(cfg, ParallelConfig(), pg_collection, backend=backend, initialize=False)
    model.load_state_dict(hf_to_megatron(tensors, cfg, model.state_dict()), strict=True)
    return model, cfg


def load_hf(directory: str | Path, pg_collection=None, backend: str = "auto") -> nn.Module:
    """The megatron-core model (TP=1) of an HF checkpoint directory, weights loaded."""
    return load_hf_with_config(directory, pg_collection, backend)[0]


__all__ = [
    "CONFIG_FILE",
    "DEFAULT_SHARD_BYTES",
    "HF_ARCHITECTURE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "HFFamily",
    "check_hf_compatible",
    "conv_kernel",
    "export_hf",
    "family_for_config",
    "family_for_hf",
    "hf_architecture",
    "hf_config",
    "hf_incompatibilities",
    "hf_model_config",
    "hf_names",
    "hf_to_megatron",
    "load_hf",
    "load_hf_with_config",
    "megatron_to_hf",
    "merge_qkv",
    "model_config_from_hf",
    "read_hf_config",
    "read_safetensors",
    "save_hf",
    "split_qkv",
    "write_hf_dir",
    "write_safetensors",
]
