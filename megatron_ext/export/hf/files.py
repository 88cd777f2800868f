"""Files of a Hugging Face checkpoint directory: safetensors (single or sharded) and configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from megatron_ext.data.tokenizer import Tokenizer
from megatron_ext.export.tokenizer import write_hf_tokenizer
from megatron_ext.models.config import HybridModelConfig, save_model_config

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


def write_safetensors(
    tensors: dict[str, Tensor], directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[Path]:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` plus the index."""
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        path = directory / SINGLE_FILE
        save_file(shards[0], str(path), metadata=meta)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=meta)
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return [*paths, directory / INDEX_FILE]


def read_safetensors(directory: str | Path) -> dict[str, Tensor]:
    """Every tensor of a single-file or sharded safetensors checkpoint in ``directory``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        index = json.loads((directory / INDEX_FILE).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}")
    out: dict[str, Tensor] = {}
    for name in files:
        out.update(load_file(str(directory / name)))
    return out


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face checkpoint directory, as a dict."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a Hugging Face checkpoint)")
    return json.loads(path.read_text())


def write_hf_dir(
    directory: str | Path,
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    cfg: HybridModelConfig,
    tokenizer: Tokenizer | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Replace ``directory`` with ``tensors`` (safetensors), ``config`` (``config.json``),
    the project's ``model_config.json`` and the tokenizer files."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    write_safetensors(tensors, directory, max_shard_bytes)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    save_model_config(cfg, directory)
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, directory, cfg.max_sequence_length)
    return directory
