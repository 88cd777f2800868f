"""The run directory's format: every file name a run writes there, their schemas, atomic writes.

Every recipe writes into its ``run.dir``; later recipes read it. This module is the one place
that names those files, and every reader and writer goes through it::

    run.dir/
      config.yaml            the resolved config the run was made with (every recipe)
      summary.json           the figures the recipe produced (every recipe)
      model_config.json      the model's HybridModelConfig (runs that save a model, slices)
      tokenizer.json         a Hugging Face tokenizer (import-hf, exports of an hf tokenizer)
      budget_choices.json    the router's final choice per budget (train-elastic)
      quant_state.json       quantization formats and scales, apart from the weights (qad, ptq)
      scores.pt              importance scores (importance)
      permutations.json      the reorder's permutations (importance)
      checkpoints/           megatron torch_dist checkpoints (megatron_ext.checkpoint owns them)
        iter_0000000/ ...
        elastic_layout.json  the stripe layout the weights were reordered for (below)

``elastic_layout.json`` has one schema, whoever writes it: ``tp`` and ``ep`` (the stripe
counts, integers >= 1) always; ``layer_order`` (the depth ranking, global layer indices),
``axes`` (per-axis split) and ``permutations`` (per axis and layer) when known; the importance
recipe adds provenance fields (``source``, ...), which readers ignore.

Writes are atomic: the text goes to a temporary file in the same directory, is flushed to
disk, and is renamed over the target, so a reader sees the old file or the new one, never a
half-written one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONFIG = "config.yaml"
SUMMARY = "summary.json"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
BUDGET_CHOICES = "budget_choices.json"
QUANT_STATE = "quant_state.json"
SCORES = "scores.pt"
PERMUTATIONS = "permutations.json"
CHECKPOINTS = "checkpoints"
ELASTIC_LAYOUT = "elastic_layout.json"

LAYOUT_REQUIRED = ("tp", "ep")


def checkpoints_dir(run_dir: str | Path) -> Path:
    """The directory of a run's checkpoints: ``run_dir/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (module docstring); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode())


def save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (``scores.pt``); return the path."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def write_json(path: str | Path, data: Any, **dumps: Any) -> Path:
    """Write ``data`` as JSON (``json.dumps`` keywords in ``dumps``) atomically, newline-ended."""
    return atomic_write_text(path, json.dumps(data, **dumps) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse the JSON file at ``path``."""
    return json.loads(Path(path).read_text())


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``run_dir/summary.json`` (sorted keys, indented, non-JSON values as strings)."""
    return write_json(Path(run_dir) / SUMMARY, summary, indent=2, sort_keys=True, default=str)


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The ``summary.json`` of ``run_dir``."""
    return read_json(Path(run_dir) / SUMMARY)


def config_path(run_dir: str | Path) -> Path:
    """Where a run keeps the resolved config it was made with: ``run_dir/config.yaml``."""
    return Path(run_dir) / CONFIG


def has_config(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a ``config.yaml`` (a recipe set it up as its run directory)."""
    return config_path(run_dir).is_file()


def save_config(run_dir: str | Path, cfg: Any) -> Path:
    """Write the resolved ``cfg`` (an OmegaConf config or plain containers) as ``config.yaml``."""
    return atomic_write_text(config_path(run_dir), OmegaConf.to_yaml(cfg, resolve=True))


def read_config(run_dir: str | Path) -> Any:
    """The ``config.yaml`` of ``run_dir`` as an OmegaConf config."""
    return OmegaConf.load(config_path(run_dir))


def check_elastic_layout(record: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """``record`` if it follows the ``elastic_layout.json`` schema, else a ``ValueError``."""
    missing = [k for k in LAYOUT_REQUIRED if k not in record]
    if missing:
        raise ValueError(f"{where}: {ELASTIC_LAYOUT} lacks {missing}")
    for key in LAYOUT_REQUIRED:
        if not isinstance(record[key], int) or record[key] < 1:
            raise ValueError(f"{where}: {ELASTIC_LAYOUT} {key} must be an integer >= 1")
    return record


def write_elastic_layout(directory: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``directory/elastic_layout.json`` atomically; return the path."""
    path = Path(directory) / ELASTIC_LAYOUT
    check_elastic_layout(record, path)
    return write_json(path, record, indent=1, sort_keys=True)


def read_elastic_layout(directory: str | Path) -> dict[str, Any]:
    """The ``elastic_layout.json`` in ``directory`` (schema-checked)."""
    path = Path(directory) / ELASTIC_LAYOUT
    return check_elastic_layout(read_json(path), path)


def has_elastic_layout(directory: str | Path) -> bool:
    """Whether ``directory`` holds an ``elastic_layout.json``."""
    return (Path(directory) / ELASTIC_LAYOUT).is_file()


def find_elastic_layout(checkpoint: str | Path) -> dict[str, Any]:
    """The ``elastic_layout.json`` of a checkpoint: in its directory or the one above."""
    checkpoint = Path(checkpoint)
    for place in (checkpoint, checkpoint.parent):
        if has_elastic_layout(place):
            return read_elastic_layout(place)
    raise FileNotFoundError(f"no {ELASTIC_LAYOUT} in {checkpoint} or {checkpoint.parent}")
