"""Export one budget's slice of an elastic model as a standalone checkpoint.

Three formats, one module each:

* ``megatron`` (:mod:`.megatron`): megatron-core ``torch_dist`` + ``model_config.json``;
* ``hf`` (:mod:`.hf`): safetensors + ``config.json`` in the parent's ``transformers`` family
  (``NemotronHForCausalLM``, ``LlamaForCausalLM``, ``Qwen3ForCausalLM``), with
  :func:`megatron_ext.export.hf.load_hf` for the way back;
* ``nemo`` (:mod:`.nemo`): the NeMo 2 layout (``context/`` + ``weights/``), written with
  nemo-toolkit's own serialization (needs the ``nemo`` extra).

A quantized elastic model (:mod:`megatron_ext.quant`) is exported by
:mod:`.quantized`: the ``hf`` layout with FP8 or NVFP4 weights and scales (ModelOpt's
``hf_quant_config.json``), read back by :func:`megatron_ext.export.quantized.load_quantized_hf`.

Every exporter first slices (:func:`megatron_ext.elastic.slicing.slice_model`, exact), so the
exported model computes what the elastic model computes at that budget. The tokenizer goes
with it (:mod:`.tokenizer`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS: tuple[str, ...] = ("megatron", "hf", "nemo")


class ExportError(ValueError):
    """The slice cannot be written in the requested format; the message says why."""


def dir_bytes(path: Path) -> tuple[int, int]:
    """(number of files, total bytes) under ``path``."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


@dataclass
class ExportResult:
    """One exported slice: where it is, and how many files and bytes it holds."""

    format: str
    budget: str
    path: Path
    files: int = 0
    bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, fmt: str, budget: str, path: Path, **extra: Any) -> ExportResult:
        """Measure ``path`` and build the result."""
        files, size = dir_bytes(path)
        return cls(fmt, budget, Path(path), files, size, dict(extra))

    def as_dict(self) -> dict[str, Any]:
        """The figures under the names ``summary.json`` uses."""
        return {
            "format": self.format,
            "budget": self.budget,
            "path": str(self.path),
            "files": self.files,
            "bytes": self.bytes,
            **self.extra,
        }


EXPORTERS: dict[str, tuple[str, str]] = {
    "megatron": ("megatron_ext.export.megatron", "export_megatron"),
    "hf": ("megatron_ext.export.hf", "export_hf"),
    "nemo": ("megatron_ext.export.nemo", "export_nemo"),
}
"""The exporter of each format: (module, function), imported on first use so a format's
optional dependencies (``nemo``, ``safetensors``) load only when it is asked for."""


def exporter(fmt: str) -> Callable[..., ExportResult]:
    """The export function of format ``fmt``; :class:`ExportError` naming the known ones."""
    if fmt not in EXPORTERS:
        raise ExportError(f"format: {fmt!r} is not one of {FORMATS}")
    module, name = EXPORTERS[fmt]
    return getattr(importlib.import_module(module), name)


def export_slice(fmt: str, model, widths: dict[str, int], out_dir: str | Path, **kwargs: Any):
    """Export ``model`` sliced at ``widths`` to ``out_dir`` in format ``fmt``.

    ``kwargs`` go to the format's exporter (``budget``, ``controller``, ``tokenizer``,
    ``pg_collection``, ...). Returns an :class:`ExportResult`.
    """
    return exporter(fmt)(model, widths, out_dir, **kwargs)


__all__ = [
    "EXPORTERS",
    "FORMATS",
    "ExportError",
    "ExportResult",
    "dir_bytes",
    "export_slice",
    "exporter",
]
