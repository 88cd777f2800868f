"""Importance order and TP/EP striping of an elastic axis (pure torch, no megatron).

Vocabulary, for one axis of ``n`` components (heads, channels or experts):

* *rank*: a component's place in descending importance (0 = most important);
* *position*: its index along the axis of the weight tensor after reordering.

A budget of ``k`` keeps ranks ``0..k-1`` (docs/design.md invariant 2: nested prefixes). Megatron
splits an axis into ``shards`` contiguous blocks, one per TP (or EP) rank. To keep every
budget balanced (invariant 3), ranks are striped round-robin over the shards: rank ``p``
goes to shard ``p % shards``, local slot ``p // shards``. Every ``k`` divisible by
``shards`` then keeps exactly ``k / shards`` components on each rank, and they are that
rank's *local prefix*, so narrow compute works on each rank alone.

Grouped axes (attention heads per query group, Mamba heads per Mamba group) are ranked
within each group and never striped: megatron already hands whole groups to TP ranks, and
every group keeps the same number of heads, so an even group split is already balanced.

The layout depends on the shard count; :func:`restripe_permutation` moves a reordered
tensor from one shard count to another.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_split(n: int, parts: int, what: str) -> None:
    if parts < 1 or n % parts:
        raise ValueError(f"{what}: {n} components do not split into {parts} equal parts")


def _check_groups(n: int, shards: int, group_size: int) -> int:
    """Number of groups; they must split evenly over the shards."""
    if group_size < 1 or n % group_size:
        raise ValueError(f"groups: {n} components do not split into groups of {group_size}")
    groups = n // group_size
    _check_split(groups, shards, "groups over shards")
    return groups


def importance_order(scores: Tensor, group_size: int | None = None) -> Tensor:
    """Indices of the components sorted by descending score; ``order[rank] = index``.

    Ties keep index order (stable sort). With ``group_size``, the components form contiguous
    groups of that size and each group is ranked on its own: ``order`` keeps every group's
    members in that group's slots, ranked within it.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN, which has no rank; fix the importance pass")
    n = scores.numel()
    if group_size is None:
        return torch.sort(scores, descending=True, stable=True).indices
    _check_groups(n, 1, group_size)
    grouped = scores.reshape(n // group_size, group_size)
    local = torch.sort(grouped, dim=1, descending=True, stable=True).indices
    base = torch.arange(0, n, group_size, device=scores.device).unsqueeze(1)
    return (local + base).reshape(n)


def striped_positions(n: int, shards: int) -> Tensor:
    """Global position of each rank when striping round-robin over ``shards`` shards.

    ``positions[p] = (p % shards) * (n // shards) + p // shards``.
    """
    _check_split(n, shards, "striping")
    p = torch.arange(n)
    return (p % shards) * (n // shards) + p // shards


def rank_of_position(n: int, shards: int = 1, group_size: int | None = None) -> Tensor:
    """Rank held at each position of a reordered tensor (within its group when grouped).

    It depends only on the layout, not on the scores: the inverse of
    :func:`striped_positions`, or ``position % group_size`` for a grouped axis.
    """
    if group_size is not None:
        _check_groups(n, shards, group_size)
        return torch.arange(n) % group_size
    ranks = torch.empty(n, dtype=torch.long)
    ranks[striped_positions(n, shards)] = torch.arange(n)
    return ranks


def reorder_permutation(scores: Tensor, shards: int = 1, group_size: int | None = None) -> Tensor:
    """``perm`` such that ``weight.index_select(axis, perm)`` lays the axis out by importance.

    Ungrouped: rank ``p`` lands at ``striped_positions(n, shards)[p]``. Grouped: each group is
    sorted within its own slots and nothing is striped (megatron splits whole groups across
    TP ranks; ``shards`` is only checked to divide the group count).
    """
    n = scores.numel()
    order = importance_order(scores, group_size).cpu()
    if group_size is not None:
        _check_groups(n, shards, group_size)
        return order.to(scores.device)
    perm = torch.empty(n, dtype=torch.long)
    perm[striped_positions(n, shards)] = order
    return perm.to(scores.device)


def inverse_permutation(perm: Tensor) -> Tensor:
    """``inv`` with ``inv[perm[i]] = i``: ``index_select(axis, inv)`` undoes a reorder."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def restripe_permutation(n: int, from_shards: int, to_shards: int) -> Tensor:
    """``perm`` moving an ungrouped axis striped for ``from_shards`` to ``to_shards``.

    Apply it with ``index_select`` to a tensor reordered by
    ``reorder_permutation(scores, from_shards)``; the result equals reordering with
    ``to_shards``. Grouped axes need no restriping.
    """
    perm = torch.empty(n, dtype=torch.long)
    perm[striped_positions(n, to_shards)] = striped_positions(n, from_shards)
    return perm


def local_prefix_len(k: int, shards: int) -> int:
    """Active components per shard when ``k`` are active in all: ``k / shards``.

    For a grouped axis pass the group count as ``shards`` to get the heads kept per group.
    """
    if shards < 1 or k < 0 or k % shards:
        raise ValueError(f"width {k} does not split evenly into {shards} shards")
    return k // shards


def active_mask(n: int, k: int, shards: int = 1, group_size: int | None = None) -> Tensor:
    """Bool mask over positions of a reordered tensor: True where the rank is below the cut.

    ``k`` counts active components in total. Ungrouped, the cut is ``k`` (``k`` must be a
    multiple of ``shards`` so each shard keeps a local prefix). Grouped, every group keeps
    its top ``k / groups`` members.
    """
    if not 0 <= k <= n:
        raise ValueError(f"width {k} is outside [0, {n}]")
    ranks = rank_of_position(n, shards, group_size)
    if group_size is not None:
        return ranks < local_prefix_len(k, n // group_size)
    local_prefix_len(k, shards)
    return ranks < k
