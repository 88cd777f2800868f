"""Depth importance and the layer ranking of the ``depth`` axis (Nemotron Elastic).

Importance of layer ``j``: the normalised MSE of the logits when ``j`` alone is removed,
``s_j = sum (M_full - M_{-j})^2 / sum M_full^2``, summed over the calibration tokens
(:func:`layer_removal_scores`). Removing a layer means making it the identity on the
residual stream, exactly what a skipped layer computes (:mod:`.layers_depth`).

The ranking (:func:`layer_order`) is **across layer kinds**, with one guard: the most
important layer of every kind comes first. Why across kinds: ``s_j`` measures what removing
a layer does to the model's output, so a Mamba, an attention, an MLP and an MoE layer are
compared on the same scale, and the data decides which kind to thin out (ranking per kind
would need a separate depth choice per kind, which multiplies the router's choices). Why the
guard: ``s_j`` scores each removal alone, and it cannot see that removing *every* layer of a
kind takes a capability away. The hybrid has few attention layers (2 of 8 in the tiny model,
6 of 52 in Nano v3), and they are the only layers that look up content anywhere in the
context; without MoE layers no expert is left, and the width axes of a missing kind would
mean nothing. So a depth of at least the number of kinds keeps every kind, and the config
refuses smaller depth choices (:meth:`ElasticConfig.validate_for`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _reduce(t: Tensor, group: Any) -> Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _removed(layer: nn.Module):
    """A forward hook that makes ``layer`` return its input (the layer removed)."""

    def hook(_module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return layer.register_forward_hook(hook, with_kwargs=True)


@torch.no_grad()
def layer_removal_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    pg_collection: Any,
    *,
    progress: bool = False,
) -> dict[int, float]:
    """``{global layer index: s_j}`` for every layer of ``model`` on ``batches``.

    Each batch (``tokens``, ``position_ids``, ``[b, s]``) runs once whole and once per layer
    with that layer removed, forward only, in eval mode. Logits are vocab-parallel under TP,
    so both sums are added over TP and over DP (each DP rank's own tokens); collective over
    all ranks. Layer indices are global (``layer_number - 1``), whatever the stage.
    """
    from tqdm import tqdm

    from megatron_ext.models.builder import causal_mask

    decoder: Any = model.decoder
    layers = list(decoder.layers)
    index = [int(layer.layer_number) - 1 for layer in layers]
    num = torch.zeros(len(layers), dtype=torch.float64)
    den = torch.zeros(1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    batches = list(batches)
    bar = tqdm(
        total=len(batches) * (len(layers) + 1),
        desc="depth importance",
        unit="pass",
        disable=not (progress and rank0),
    )
    try:
        for batch in batches:
            ids, pos = batch["tokens"], batch["position_ids"]
            mask = causal_mask(ids.shape[1], ids.device)
            full = model(ids, pos, mask).double()
            den += full.square().sum()
            bar.update(1)
            for k, layer in enumerate(layers):
                handle = _removed(layer)
                try:
                    num[k] += (full - model(ids, pos, mask).double()).square().sum()
                finally:
                    handle.remove()
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    for group in (getattr(pg_collection, "tp", None), getattr(pg_collection, "dp", None)):
        _reduce(num, group)
        _reduce(den, group)
    scores = (num / den.clamp(min=torch.finfo(torch.float64).tiny)).tolist()
    return dict(zip(index, scores))


def layer_order(scores: Mapping[int, float], pattern: str) -> tuple[int, ...]:
    """The layers ranked for the ``depth`` axis, most important first (module docstring).

    The best-scoring layer of every kind in ``pattern`` leads, those in score order; then
    the rest by descending score. Ties keep layer order.
    """
    missing = sorted(set(range(len(pattern))) - set(scores))
    if missing:
        raise ValueError(f"no depth score for layers {missing} of pattern {pattern!r}")
    ranked = sorted(range(len(pattern)), key=lambda j: (-float(scores[j]), j))
    leaders: list[int] = []
    seen: set[str] = set()
    for j in ranked:
        if pattern[j] not in seen:
            seen.add(pattern[j])
            leaders.append(j)
    return (*leaders, *(j for j in ranked if j not in leaders))


def kept_pattern(pattern: str, kept: Sequence[int]) -> str:
    """The hybrid pattern of the layers ``kept`` (global indices), in layer order."""
    return "".join(pattern[j] for j in sorted(kept))
