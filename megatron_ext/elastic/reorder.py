"""Turn importance scores into per-axis permutations and apply them to a model's weights.

A permutation ``perm`` of an axis means: after reordering, position ``q`` holds the component
that was at ``perm[q]`` (``index_select(axis, perm)``). Permutations come from
:func:`megatron_ext.elastic.layout.reorder_permutation`, striped for a target TP/EP layout
(docs/design.md invariant 3), and are applied in place to the unsharded (TP=1, EP=1) model, to
exactly the tensors listed for each axis in the elastic-axes conventions. The function the
model computes is unchanged: only the order of channels, heads and experts moves.

``perms`` has the shape of the scores: ``axis -> {layer: LongTensor}``, except
``embedding``, one permutation for the whole residual stream stored under layer ``-1``,
and ``moe_ffn``, ``[experts, channels]`` whose row ``e`` is the channel order of the expert
that ends up at position ``e`` (after the ``moe_experts`` permutation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from megatron_ext.elastic.importance import Scores
from megatron_ext.elastic.sites.base import Perms
from megatron_ext.elastic.sites.registry import axes as registry_axes
from megatron_ext.elastic.sites.registry import axis as registry_axis
from megatron_ext.elastic.sites.registry import site_for, sites
from megatron_ext.elastic.sites.residual import EMBEDDING_LAYER


def compute_permutations(
    scores: Scores,
    shape: Any,
    *,
    stripe_tp: int = 1,
    stripe_ep: int = 1,
    axes: tuple[str, ...] | None = None,
) -> Perms:
    """Per-axis permutations of ``scores`` for a checkpoint striped over ``stripe_tp`` TP
    ranks (FFN and expert-FFN channels) and ``stripe_ep`` EP ranks (experts).

    ``shape`` gives the head grouping (``num_attention_heads``, ``num_query_groups``,
    ``mamba_num_heads``, ``mamba_num_groups``): a ``HybridModelConfig`` or megatron's
    ``TransformerConfig``. Attention and Mamba heads are ranked within their groups (whole
    groups go to TP ranks, so no striping); ``mamba_head_dim`` and ``embedding`` are not split.
    ``axes`` limits the result to those axes (default: every axis in ``scores``). Each site
    computes its own axes' (``Site.permutations``).
    """
    wanted = set(scores) if axes is None else set(axes) & set(scores)
    known = {a.name for a in registry_axes() if a.width}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"unknown axis {unknown[0]!r}")
    chosen = {axis: scores[axis] for axis in wanted}
    perms: Perms = {}
    for site in sites():
        perms.update(site.permutations(chosen, shape, stripe_tp, stripe_ep))
    for site in sites():
        site.finish_permutations(perms)
    return perms


def apply_permutations(model: Any, perms: Perms) -> None:
    """Reorder ``model``'s weights in place by ``perms`` (see the module docstring).

    ``model`` must be the unsharded (TP=1, EP=1) ``MambaModel``; its logits are unchanged.
    Every site reorders its own tensors (``Site.permute_model``, ``permute_layer``,
    ``permute``).
    """
    cfg = model.config
    if cfg.tensor_model_parallel_size != 1 or cfg.expert_model_parallel_size != 1:
        raise ValueError("apply_permutations needs the unsharded model (TP=1, EP=1)")
    gated = bool(cfg.gated_linear_unit)
    emb = perms.get("embedding", {}).get(EMBEDDING_LAYER)
    emb = None if emb is None else emb.cpu().long()
    walk = sites()
    for site in walk:
        site.permute_model(model, emb)
    for i, layer in enumerate(model.decoder.layers):

        def get(axis: str, i: int = i) -> Tensor | None:
            p = perms.get(axis, {}).get(i)
            return None if p is None else p.cpu().long()

        fed = []
        for name, child in layer.named_children():
            owner = site_for(child)
            if owner is not None:
                owner.permute(child, get, emb, gated)
                fed.append(name)
        for site in walk:
            site.permute_layer(layer, emb, fed)


def permutations_to_json(perms: Perms) -> dict[str, dict[str, list]]:
    """``perms`` as JSON-able lists (layer keys as strings)."""
    return {
        axis: {str(i): p.tolist() for i, p in sorted(layers.items())}
        for axis, layers in sorted(perms.items())
    }


def permutations_from_json(data: dict[str, dict[str, list]]) -> Perms:
    """Inverse of :func:`permutations_to_json`."""
    return {
        axis: {int(i): torch.tensor(p, dtype=torch.long) for i, p in layers.items()}
        for axis, layers in data.items()
    }


def _split(name: str, stripe_tp: int, stripe_ep: int) -> dict[str, Any]:
    """How the layout splits axis ``name``: its stripe count, and whether it is grouped."""
    axis = registry_axis(name)
    split: dict[str, Any] = {"shards": axis.shards(stripe_tp, stripe_ep)}
    if axis.group is not None:
        split["grouped"] = True
    return split


def layout_record(perms: Perms, stripe_tp: int, stripe_ep: int, **extra: Any) -> dict[str, Any]:
    """The content of ``elastic_layout.json``: stripe layout, per-axis split, permutations."""
    return {
        "tp": stripe_tp,
        "ep": stripe_ep,
        "axes": {axis: _split(axis, stripe_tp, stripe_ep) for axis in sorted(perms)},
        "permutations": permutations_to_json(perms),
        **extra,
    }
