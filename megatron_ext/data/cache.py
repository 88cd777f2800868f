"""Prepare the corpus once per data config, shared by every rank and every recipe."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_ext.data.arithmetic import FORMAT_VERSION, prepare_arithmetic
from megatron_ext.data.config import DataConfig
from megatron_ext.data.prepare import default_corpus_dir, prepare_indexed_dataset
from megatron_ext.data.tokenizer import Tokenizer, build_tokenizer


def tokenizer_for(cfg: DataConfig) -> Tokenizer:
    """The tokenizer named by the data config."""
    return build_tokenizer(cfg.tokenizer, cfg.tokenizer_path or None)


def source_dir(cfg: DataConfig) -> Path:
    """The corpus folder: ``data.source_dir`` or the interpreter's standard library."""
    return Path(cfg.source_dir) if cfg.source_dir else default_corpus_dir()


def dataset_prefix(cfg: DataConfig) -> Path:
    """Where the indexed dataset of this config lives; the key covers every field that matters.

    A ``files`` corpus is keyed by its folder and file settings, a generated ``arithmetic``
    one by its generator settings (the fields the other source ignores stay out of the key).
    """
    unkeyed = ("cache_dir", "source", "arithmetic", "min_seq_length")
    key = {k: v for k, v in asdict(cfg).items() if k not in unkeyed}
    if cfg.source == "arithmetic":
        key = {"arithmetic": asdict(cfg.arithmetic), "format": FORMAT_VERSION}
        key |= {"name": cfg.name, "tokenizer": cfg.tokenizer, "tokenizer_path": cfg.tokenizer_path}
    else:
        key["source"] = str(source_dir(cfg).resolve())
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cfg.cache_dir) / f"{cfg.name}-{cfg.tokenizer}-{digest}" / cfg.name


def ensure_prepared(cfg: DataConfig, *, seed: int = 1234, progress: bool = True) -> dict[str, Any]:
    """Tokenize the corpus unless already done (global rank 0 writes, the others wait).

    Returns the dataset's metadata (document and token counts, train/valid prefixes; for the
    arithmetic source also ``test_file``, the held-out test split). ``seed`` assigns files to
    the valid split; a generated corpus is seeded by its own ``data.arithmetic.seed``.
    """
    prefix = dataset_prefix(cfg)
    meta_path = Path(f"{prefix}_meta.json")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not meta_path.exists() and cfg.source == "arithmetic":
        prepare_arithmetic(cfg.arithmetic, prefix, tokenizer_for(cfg))
    elif rank == 0 and not meta_path.exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prepare_indexed_dataset(
            source_dir(cfg),
            prefix,
            tokenizer_for(cfg),
            glob=cfg.glob,
            valid_fraction=cfg.valid_fraction,
            max_files=cfg.max_files or None,
            max_bytes=cfg.max_bytes or None,
            seed=seed,
            progress=progress,
        )
    if dist.is_initialized():
        dist.barrier()
    return json.loads(meta_path.read_text())
