"""Storage of one elastic checkpoint against separate checkpoints, one per budget.

Star Elastic reports 58.9 GB for the single elastic Nano v3 checkpoint against 126.1 GB for
the 30B, 23B and 12B models stored apart. The same comparison at any scale: the weight files
of the elastic checkpoint against the sum, over every budget, of a standalone slice's weight
files, both in megatron ``torch_dist`` format (optimizer state, per-rank state and the
manifest left out on both sides).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from megatron_ext.checkpoint import MANIFEST, RANK_STATE
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.slicing import save_slice


def weights_bytes(checkpoint_dir: str | Path) -> int:
    """Bytes of the weight files of a checkpoint directory (``iter_*``): everything but the
    per-rank (optimizer) state and the manifest."""
    root = Path(checkpoint_dir)
    total = 0
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] != RANK_STATE and rel.name != MANIFEST:
            total += path.stat().st_size
    return total


@dataclass
class StorageComparison:
    """The elastic checkpoint's weight bytes and each budget's standalone slice's."""

    elastic_bytes: int
    separate: dict[str, int] = field(default_factory=dict)

    @property
    def separate_slices_bytes(self) -> int:
        """Sum over the budgets of their standalone checkpoints."""
        return sum(self.separate.values())

    def as_dict(self) -> dict[str, Any]:
        """The figures under the names ``summary.json`` uses."""
        total = self.separate_slices_bytes
        return {
            "elastic_bytes": self.elastic_bytes,
            "separate_slices_bytes": total,
            "separate_slices": dict(self.separate),
            "separate_over_elastic": total / self.elastic_bytes if self.elastic_bytes else None,
        }


def compare_storage(
    elastic_checkpoint: str | Path,
    model: nn.Module,
    budgets: dict[str, dict[str, int]],
    controller: ElasticController,
    pg_collection=None,
    workdir: str | Path | None = None,
) -> StorageComparison:
    """Write each budget's slice of ``model`` once (to a temporary directory under ``workdir``)
    and measure it against ``elastic_checkpoint``'s weights."""
    result = StorageComparison(weights_bytes(elastic_checkpoint))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for name, widths in budgets.items():
            path = save_slice(model, widths, Path(tmp) / name, pg_collection, controller)
            result.separate[name] = weights_bytes(path)
    return result
