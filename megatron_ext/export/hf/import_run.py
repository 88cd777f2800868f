"""Turn a Hugging Face checkpoint directory into a parent run of this project.

The run holds what a ``train-parent`` run holds for the recipes that read one
(``importance``, ``train-elastic``, ``slice``, ``export``, ``generate``):
``model_config.json``, ``checkpoints/iter_0000000`` (megatron-core torch_dist, loadable at any
TP / EP), and the checkpoint's ``tokenizer.json``; the recipe adds ``config.yaml`` (with the
imported ``model`` and a ``data`` section on that tokenizer) and ``summary.json``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.export.hf import hf_architecture, load_hf_with_config
from megatron_ext.export.hf.family import family_for_hf
from megatron_ext.export.hf.files import CONFIG_FILE, read_hf_config
from megatron_ext.models.config import HybridModelConfig, require, save_model_config
from megatron_ext.models.params import count_parameters
from megatron_ext.run_format import TOKENIZER, checkpoints_dir


@dataclass
class ImportHFConfig:
    """``hf.dir``: a directory written by ``save_pretrained`` (``config.json``, safetensors,
    ``tokenizer.json``). ``require_tokenizer=false`` imports a checkpoint without one."""

    dir: str = ""
    require_tokenizer: bool = True

    def __post_init__(self) -> None:
        require(bool(self.dir), "hf.dir", "must name a Hugging Face checkpoint directory")
        path = Path(self.dir)
        require((path / CONFIG_FILE).is_file(), "hf.dir", f"{path} has no {CONFIG_FILE}")
        require(
            not self.require_tokenizer or (path / TOKENIZER).is_file(),
            "hf.dir",
            f"{path} has no {TOKENIZER}; add it, or set hf.require_tokenizer=false "
            "(the recipes then need data.tokenizer_path)",
        )


@dataclass
class ImportResult:
    """What an import wrote and what it is."""

    model: HybridModelConfig
    family: str
    architecture: str
    checkpoint: Path
    tokenizer: Path | None
    params_total: int
    params_active: int

    def as_dict(self) -> dict[str, Any]:
        """The figures under the names ``summary.json`` uses."""
        return {
            "model": self.model.name,
            "family": self.family,
            "architecture": self.architecture,
            "pattern": self.model.pattern,
            "checkpoint": str(self.checkpoint),
            "tokenizer": str(self.tokenizer) if self.tokenizer else None,
            "params_total": self.params_total,
            "params_active": self.params_active,
        }


def check_importable(hf_dir: str | Path) -> HybridModelConfig:
    """The model config ``config.json`` of ``hf_dir`` describes; :class:`ExportError` (naming
    ``model_type``) if no family reads it. Reads no weights, so it runs before any work."""
    hf = read_hf_config(hf_dir)
    return family_for_hf(hf).config_from_hf(hf)


def import_hf(
    hf_dir: str | Path, run_dir: str | Path, pg_collection, backend: str = "auto"
) -> ImportResult:
    """Load ``hf_dir`` into its megatron-core model and write it as a parent run in ``run_dir``."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    family = family_for_hf(read_hf_config(hf_dir))
    model, cfg = load_hf_with_config(hf_dir, pg_collection, backend=backend)
    model.eval()
    ckpts = CheckpointManager(checkpoints_dir(run_dir), pg_collection)
    path = ckpts.save(0, model, None, {"imported_from": str(hf_dir.resolve())})
    save_model_config(cfg, run_dir)
    tokenizer = None
    if (hf_dir / TOKENIZER).is_file():
        tokenizer = Path(shutil.copyfile(hf_dir / TOKENIZER, run_dir / TOKENIZER))
    counts = count_parameters(model, cfg, pg_collection)
    return ImportResult(
        cfg, family.name, hf_architecture(cfg), path, tokenizer, counts.total, counts.active
    )
