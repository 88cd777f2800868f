"""The Hugging Face families this project reads and writes, and how one is picked.

A family is one weight and config mapping, both directions, between the megatron-core model
of a :class:`HybridModelConfig` and a ``transformers`` architecture:

* ``nemotron_h`` (:mod:`.nemotron_h`): ``NemotronHForCausalLM``, the Mamba/attention/MLP/MoE
  hybrid of Nemotron-H and Nemotron Nano v2/v3 (no position embedding);
* ``llama`` (:mod:`.llama`): the RoPE + SwiGLU + GQA transformer, ``LlamaForCausalLM``, and
  ``Qwen3ForCausalLM`` (the same plus per-head query/key RMSNorm).

Export picks the family from the config (:func:`family_for_config`), so a slice, whatever
its widths or depth, is written in the family of its parent. Import picks it from
``config.json``'s ``model_type`` (:func:`family_for_hf`) and refuses any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from megatron_ext.data.tokenizer import Tokenizer
from megatron_ext.export import ExportError
from megatron_ext.models.config import HybridModelConfig


@dataclass(frozen=True)
class HFFamily:
    """One HF family's mapping. Every callable takes the (sliced) megatron config."""

    name: str
    model_types: tuple[str, ...]
    architecture: Callable[[HybridModelConfig], tuple[str, str]]
    """(``architectures[0]``, ``model_type``) of a config."""
    incompatibilities: Callable[[HybridModelConfig], list[str]]
    """Why a config cannot be written in this family exactly (empty when it can)."""
    config_to_hf: Callable[[HybridModelConfig, Tokenizer | None, int], dict[str, Any]]
    """``config.json`` of a config (tokenizer for the special ids, Mamba conv kernel); the
    caller has run :meth:`check`."""
    config_from_hf: Callable[..., HybridModelConfig]
    """``(config_json, **overrides)`` -> config; refuses what megatron cannot build the same."""
    names: Callable[[str, HybridModelConfig], tuple[str, ...]]
    """HF tensor name(s) of a megatron state-dict key (``()`` for ``_extra_state``)."""
    complete: Callable[[dict[str, Tensor], HybridModelConfig], None]
    """Add the HF tensors megatron has no tensor for (e.g. a zero expert bias)."""
    redundant: Callable[[str, Tensor, dict[str, Tensor]], bool]
    """Whether an HF tensor megatron has no place for changes nothing (may be dropped)."""

    def check(self, cfg: HybridModelConfig) -> None:
        """Raise :class:`ExportError` listing every reason ``cfg`` cannot be written in this
        family exactly."""
        problems = self.incompatibilities(cfg)
        if problems:
            raise ExportError(
                f"cannot export to Hugging Face {self.architecture(cfg)[0]} exactly:\n  - "
                + "\n  - ".join(problems)
            )


def _families() -> dict[str, HFFamily]:
    from megatron_ext.export.hf import llama, nemotron_h

    return {f.name: f for f in (nemotron_h.FAMILY, llama.FAMILY)}


def family_names() -> tuple[str, ...]:
    """Names of every registered family."""
    return tuple(_families())


def model_types() -> tuple[str, ...]:
    """Every ``model_type`` some family reads."""
    return tuple(t for f in _families().values() for t in f.model_types)


def family_for_hf(hf: dict[str, Any]) -> HFFamily:
    """The family reading ``config.json`` ``hf``; :class:`ExportError` naming its model_type."""
    model_type = hf.get("model_type")
    for family in _families().values():
        if model_type in family.model_types:
            return family
    raise ExportError(
        f"config.json model_type={model_type!r} is not supported; supported: "
        f"{sorted(model_types())}"
    )


def family_for_config(cfg: HybridModelConfig) -> HFFamily:
    """The family a config is written in: a RoPE model without Mamba layers is a ``llama``
    (Qwen3 with ``qk_layernorm``); every other model is a ``nemotron_h``."""
    families = _families()
    if cfg.position_embedding_type == "rope" and not cfg.has("M"):
        return families["llama"]
    return families["nemotron_h"]
