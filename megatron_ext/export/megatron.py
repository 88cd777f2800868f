"""The megatron export: a standalone ``torch_dist`` checkpoint of one budget's slice.

Layout of ``out_dir``::

    iter_0000000/          torch_dist weights (``*.distcp``, ``.metadata``, ``common.pt``,
                           ``metadata.json``) and ``manifest.json``
    model_config.json      the slice's :class:`HybridModelConfig`
    tokenizer.json         (hf tokenizer) or tokenizer_config.json (byte tokenizer)

:func:`megatron_ext.elastic.slicing.load_slice` loads it back (at any TP/EP size).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from megatron_ext.data.tokenizer import Tokenizer
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.slicing import load_slice, save_slice
from megatron_ext.export import ExportResult
from megatron_ext.export.tokenizer import write_megatron_tokenizer


def export_megatron(
    model: nn.Module,
    widths: dict[str, int],
    out_dir: str | Path,
    *,
    budget: str = "",
    controller: ElasticController | None = None,
    tokenizer: Tokenizer | None = None,
    pg_collection=None,
) -> ExportResult:
    """Slice ``model`` (TP=1) at ``widths`` and write the megatron layout into ``out_dir``.

    ``out_dir`` is replaced if it exists. Returns the result with the files and bytes written.
    """
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    checkpoint = save_slice(model, widths, out_dir, pg_collection, controller=controller)
    if tokenizer is not None:
        write_megatron_tokenizer(tokenizer, out_dir)
    return ExportResult.of("megatron", budget, out_dir, checkpoint=str(checkpoint))


def load_megatron(directory: str | Path, pg_collection=None) -> nn.Module:
    """The plain megatron-core model of an export directory, weights loaded."""
    return load_slice(directory, pg_collection)
