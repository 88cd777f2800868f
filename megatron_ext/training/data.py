"""Batches for training and evaluation from the prepared indexed datasets."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_ext.data.cache import ensure_prepared, tokenizer_for
from megatron_ext.data.config import DataConfig
from megatron_ext.data.loader import BatchIterator, build_gpt_dataset
from megatron_ext.data.prepare import check_split_lengths
from megatron_ext.training.config import TrainConfig


def _dp(pg_collection) -> tuple[int, int]:
    """(DP rank, DP size); ``pg_collection=None``: the batches of one process, (0, 1)."""
    if pg_collection is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(pg_collection.dp), dist.get_world_size(pg_collection.dp)


def train_batches(
    data: DataConfig,
    pg_collection,
    *,
    seq_length: int,
    micro_batch_size: int,
    steps: int,
    global_batch_size: int = 0,
    seed: int,
) -> tuple[BatchIterator, dict]:
    """The resumable training iterator (this DP rank's micro-batches, one per ``next``) over
    ``steps`` global batches of ``global_batch_size`` sequences (0: one micro-batch per DP
    rank), and the dataset metadata. ``pg_collection=None``: the batches of one process."""
    meta = ensure_prepared(data, seed=seed)
    check_split_lengths(meta, seq_length, "seq_length")
    dp_rank, dp_size = _dp(pg_collection)
    global_batch = global_batch_size or micro_batch_size * dp_size
    dataset = build_gpt_dataset(
        meta["train_prefix"],
        seq_length,
        steps * global_batch,
        tokenizer_for(data),
        seed,
        "train",
        cache_dir=Path(meta["train_prefix"]).parent / "index_cache",
    )
    batches = BatchIterator(dataset, micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, cycle=True)
    return batches, meta


def held_out_batches(
    data: DataConfig,
    pg_collection,
    *,
    seq_length: int,
    micro_batch_size: int,
    count: int,
    seed: int,
) -> list[dict]:
    """``count`` fixed held-out micro-batches of this DP rank (the ``valid`` split);
    ``pg_collection=None``: those of one process."""
    meta = ensure_prepared(data, seed=seed)
    check_split_lengths(meta, seq_length, "seq_length")
    dp_rank, dp_size = _dp(pg_collection)
    dataset = build_gpt_dataset(
        meta["valid_prefix"],
        seq_length,
        count * micro_batch_size * dp_size,
        tokenizer_for(data),
        seed,
        "valid",
        cache_dir=Path(meta["train_prefix"]).parent / "index_cache",
    )
    valid = BatchIterator(dataset, micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, cycle=True)
    return [next(valid) for _ in range(count)]


def build_batches(
    data: DataConfig, train: TrainConfig, pg_collection, *, seed: int, split_over_dp: bool = True
) -> tuple[BatchIterator, list[dict], dict]:
    """The resumable training iterator, the fixed held-out batches, and the dataset metadata.

    Each data-parallel rank gets its own part of every global batch (its micro-batches, one
    per ``next``); TP/EP ranks of one DP replica read the same samples. With
    ``split_over_dp=False`` every rank reads the batches one process would (the same on all).
    """
    groups = pg_collection if split_over_dp else None
    batches, meta = train_batches(
        data,
        groups,
        seq_length=train.seq_length,
        micro_batch_size=train.micro_batch_size,
        steps=train.steps,
        global_batch_size=train.global_batch_size,
        seed=seed,
    )
    valid = held_out_batches(
        data,
        groups,
        seq_length=train.seq_length,
        micro_batch_size=train.micro_batch_size,
        count=train.eval_batches,
        seed=seed,
    )
    return batches, valid, meta
