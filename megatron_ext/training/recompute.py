"""Activation recomputation (``recompute=selective|full``) on the built hybrid model.

``selective`` is megatron-core's own: the attention modules recompute their core attention
(``Attention.checkpoint_core_attention``, which upstream sets from
``recompute_granularity="selective"`` in ``Attention.__init__``; the flag is set the same way
on modules that are already built). ``full`` recomputes every layer: upstream's
``MambaStack.forward`` (``ssm/mamba_block.py``, 0.16.1) has no recompute path of its own, so
each layer's class is swapped for a subclass whose training forward runs through megatron's
``tensor_parallel.checkpoint`` (which saves and restores the RNG tracker's states, so the
recomputed forward is bit-identical). State-dict keys are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import Attention


class RecomputedLayer(torch.nn.Module):
    """Mixin: the training forward of the layer below it is recomputed in the backward pass."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The layer's forward; in training under autograd, via ``tensor_parallel.checkpoint``."""
        forward = super().forward
        if not (self.training and torch.is_grad_enabled()):
            return forward(hidden_states, *args, **kwargs)

        def run(hidden: torch.Tensor) -> Any:
            return forward(hidden, *args, **kwargs)

        return tensor_parallel.checkpoint(run, False, hidden_states)


_SWAPPED: dict[type, type] = {}


def _recomputed_class(cls: type) -> type:
    if issubclass(cls, RecomputedLayer):
        return cls
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"Recomputed{cls.__name__}", (RecomputedLayer, cls), {})
    return _SWAPPED[cls]


def apply_recompute(model: torch.nn.Module, mode: str) -> None:
    """Turn on activation recomputation ``mode`` (``none`` / ``selective`` / ``full``)."""
    if mode == "none":
        return
    if mode == "selective":
        for module in model.modules():
            if isinstance(module, Attention):
                module.config.recompute_granularity = "selective"
                module.checkpoint_core_attention = True
        return
    if mode != "full":
        raise ValueError(f"recompute mode {mode!r} is not none, selective or full")
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None:
        raise ValueError("full recompute needs a model with decoder.layers")
    for layer in layers:
        layer.__class__ = _recomputed_class(type(layer))
