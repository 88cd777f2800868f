"""megatron-core ``GPTDataset`` construction and a resumable, data-parallel batch iterator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_ext.data.tokenizer import Tokenizer

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""Keys of every batch yielded by :class:`BatchIterator`."""


def build_gpt_dataset(
    prefix: str | Path,
    seq_length: int,
    num_samples: int | None,
    tokenizer: Tokenizer,
    seed: int,
    split_name: str = "train",
    *,
    cache_dir: str | Path | None = None,
    create_attention_mask: bool = False,
) -> GPTDataset:
    """A ``GPTDataset`` over the whole indexed dataset at ``prefix`` (``.bin``/``.idx``).

    ``num_samples`` windows of ``seq_length + 1`` tokens are drawn (None: one epoch; more
    than an epoch repeats the documents in a new shuffled order). Shuffle/sample indices
    are cached in ``cache_dir`` (default: ``index_cache`` next to the data), which must be
    visible to every rank. With torch.distributed initialised this is collective: global
    rank 0 builds the cache, then a barrier, then the others load it.
    """
    splits = {s.name: s for s in Split}
    if split_name not in splits:
        raise ValueError(f"unknown split_name {split_name!r}; expected one of {sorted(splits)}")
    prefix = str(prefix)
    if not IndexedDataset.exists(prefix):
        raise FileNotFoundError(f"no indexed dataset at {prefix}(.bin|.idx)")
    split = splits[split_name]
    cache = Path(cache_dir) if cache_dir is not None else Path(prefix).parent / "index_cache"
    blend_per_split: list[Any] = [None] * len(Split)
    blend_per_split[split.value] = ([prefix], None)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=blend_per_split,
        path_to_cache=str(cache),
        mmap_bin_files=True,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
    )
    indexed = GPTDataset.build_low_level_dataset(prefix, config)
    num_docs = GPTDataset.numel_low_level_dataset(indexed)
    if num_docs == 0:
        raise ValueError(f"indexed dataset {prefix} has no documents")
    indices = numpy.arange(num_docs, dtype=numpy.int32)
    # build_generic_dataset does the rank-0-first / barrier / other-ranks dance when
    # torch.distributed is initialised, and a plain construction otherwise.
    return BlendedMegatronDatasetBuilder.build_generic_dataset(
        GPTDataset, lambda: True, True, indexed, prefix, indices, num_samples, split, config
    )


class BatchIterator:
    """Deterministic, resumable iterator of batches from a map-style dataset.

    Global batch ``g`` covers dataset samples ``[start + g*B*D, start + (g+1)*B*D)`` with
    ``B = batch_size`` and ``D = dp_size``; DP rank ``r`` gets the ``r``-th contiguous block
    of ``B`` of them. The position is counted in global samples, so a state saved at one
    ``dp_size`` resumes correctly at another with the same global batch. Past the end it
    stops, or wraps around (indices modulo ``len(dataset)``) when ``cycle`` is set.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        start: int = 0,
        cycle: bool = False,
    ) -> None:
        if batch_size < 1 or dp_size < 1 or start < 0:
            raise ValueError(f"bad batch_size={batch_size}, dp_size={dp_size} or start={start}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.cycle = cycle
        self.consumed_samples = start

    @property
    def global_batch_size(self) -> int:
        """Samples consumed per step across all DP ranks."""
        return self.batch_size * self.dp_size

    def sample_indices(self, consumed_samples: int | None = None) -> list[int]:
        """Dataset indices of this rank's part of the global batch starting at the position."""
        pos = self.consumed_samples if consumed_samples is None else consumed_samples
        first = pos + self.dp_rank * self.batch_size
        idx = range(first, first + self.batch_size)
        return [i % len(self.dataset) for i in idx] if self.cycle else list(idx)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The iterator itself; iterating advances :attr:`consumed_samples`."""
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch; advances the position by one global batch."""
        if not self.cycle and self.consumed_samples + self.global_batch_size > len(self.dataset):
            raise StopIteration
        samples = [self.dataset[i] for i in self.sample_indices()]
        self.consumed_samples += self.global_batch_size
        return {
            "tokens": torch.stack([s["tokens"] for s in samples]).long(),
            "labels": torch.stack([s["labels"] for s in samples]).long(),
            "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
            "position_ids": torch.stack([s["position_ids"] for s in samples]).long(),
        }

    def state_dict(self) -> dict[str, int]:
        """Position to resume from (global samples consumed) plus the layout, for the record."""
        return {
            "consumed_samples": self.consumed_samples,
            "global_batch_size": self.global_batch_size,
            "batch_size": self.batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["consumed_samples"]`` (a change of batch layout is allowed)."""
        self.consumed_samples = int(state["consumed_samples"])
