"""The block of an axis that this rank holds: megatron splits an axis into contiguous blocks.

A leaf of the elastic package: the layer classes, the sites and the controller all read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """This rank's block of an axis that megatron splits into ``count`` contiguous blocks."""

    count: int = 1
    index: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is outside [0, {self.count})")

    @classmethod
    def of(cls, group) -> Shard:
        """The shard of this rank in process group ``group`` (``None``: unsplit)."""
        from megatron.core.utils import get_pg_rank, get_pg_size

        return cls(count=get_pg_size(group), index=get_pg_rank(group))


WHOLE = Shard()
"""An axis that is not split (replicated on every rank)."""
