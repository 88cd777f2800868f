"""Batches for training and evaluation from the prepared indexed datasets."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_ext.data.cache import ensure_prepared, tokenizer_for
from megatron_ext.data.config import DataConfig
from megatron_ext.data.loader import BatchIterator, build_gpt_dataset
from megatron_ext.data.prepare import check_split_lengths
from megatron_ext.training.config import TrainConfig


def build_batches(
    data: DataConfig, train: TrainConfig, pg_collection, *, seed: int
) -> tuple[BatchIterator, list[dict], dict]:
    """The resumable training iterator, the fixed held-out batches, and the dataset metadata.

    Each data-parallel rank gets its own part of every global batch (its micro-batches, one
    per ``next``); TP/EP ranks of one DP replica read the same samples.
    """
    meta = ensure_prepared(data, seed=seed)
    check_split_lengths(meta, train.seq_length, "seq_length")
    tokenizer = tokenizer_for(data)
    dp_rank = dist.get_rank(pg_collection.dp) if dist.is_initialized() else 0
    dp_size = dist.get_world_size(pg_collection.dp) if dist.is_initialized() else 1
    global_batch = train.global_batch_size or train.micro_batch_size * dp_size
    cache = Path(meta["train_prefix"]).parent / "index_cache"
    train_ds = build_gpt_dataset(
        meta["train_prefix"],
        train.seq_length,
        train.steps * global_batch,
        tokenizer,
        seed,
        "train",
        cache_dir=cache,
    )
    valid_ds = build_gpt_dataset(
        meta["valid_prefix"],
        train.seq_length,
        train.eval_batches * train.micro_batch_size * dp_size,
        tokenizer,
        seed,
        "valid",
        cache_dir=cache,
    )
    batches = BatchIterator(
        train_ds, train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, cycle=True
    )
    valid = BatchIterator(
        valid_ds, train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, cycle=True
    )
    return batches, [next(valid) for _ in range(train.eval_batches)], meta
