"""Tensor helpers of the sites: the collectives importance scores are reduced with, and the
kept positions of a mask.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group: Any) -> int:
    """Ranks in ``group`` (1 without ``torch.distributed`` or for ``None``)."""
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def all_reduce(t: Tensor, group: Any) -> Tensor:
    """Sum ``t`` over ``group`` in place (a no-op on one rank); returns ``t``."""
    if group_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def all_gather(t: Tensor, group: Any, dim: int = 0) -> Tensor:
    """All-gather ``t`` over ``group`` and concatenate in group-rank (shard) order."""
    n = group_size(group)
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def token_rows(t: Tensor) -> Tensor:
    """``[..., c]`` activations as ``[tokens, c]`` float64."""
    return t.detach().reshape(-1, t.shape[-1]).double()


def kept_positions(mask: Tensor) -> list[int]:
    """The ``True`` positions of a 1-D bool mask, ascending."""
    return [int(j) for j in mask.nonzero().flatten().tolist()]


def renumbering(pattern: re.Pattern[str], group: str, kept: Sequence[int]) -> Callable:
    """A state-dict rename: in a key ``pattern`` matches, the index in ``group`` becomes its
    place among ``kept`` (ascending); a key of an index not kept is dropped (``None``); any
    other key stays."""
    place = {j: i for i, j in enumerate(kept)}

    def rename(key: str) -> str | None:
        match = pattern.match(key)
        if match is None:
            return key
        j = int(match[group])
        if j not in place:
            return None
        return f"{key[: match.start(group)]}{place[j]}{key[match.end(group) :]}"

    return rename
