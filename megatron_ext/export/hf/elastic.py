"""The whole elastic model as ONE Hugging Face directory, and standalone slices out of it.

:func:`save_elastic_hf` writes the full-width, importance-ordered model in its parent's
family (``transformers`` loads it as the full model) and adds to ``config.json`` an
``elastic`` block: every budget's widths (the router's choices where it made them) and the
TP / EP stripe layout the weights are ordered for. :func:`slice_elastic_hf` reads that
directory alone, with no training run, and writes one budget as a standalone HF model,
exactly the slice the run's own ``slice`` / ``export`` would write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from megatron_ext.data.tokenizer import Tokenizer, build_tokenizer
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.export import ExportError, ExportResult
from megatron_ext.export.hf import (
    DEFAULT_SHARD_BYTES,
    conv_kernel,
    export_hf,
    hf_architecture,
    hf_config,
    load_hf_with_config,
    megatron_to_hf,
)
from megatron_ext.export.hf.files import read_hf_config, write_hf_dir
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.run_format import TOKENIZER

ELASTIC_KEY = "elastic"
ELASTIC_BUDGET = "elastic"
"""The ``budget`` value of ``export`` that writes the whole elastic model."""


def save_elastic_hf(
    model: nn.Module,
    cfg: HybridModelConfig,
    budgets: dict[str, dict[str, int]],
    stripes: StripeLayout,
    directory: str | Path,
    *,
    widths_from: dict[str, str] | None = None,
    tokenizer: Tokenizer | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ExportResult:
    """Write the full (TP=1) elastic ``model`` with every budget's widths in ``config.json``."""
    state = model.state_dict()
    config = hf_config(cfg, tokenizer, conv_kernel(state))
    config[ELASTIC_KEY] = {
        "budgets": {name: dict(widths) for name, widths in budgets.items()},
        "widths_from": dict(widths_from or {}),
        "stripes": {"tp": stripes.tp, "ep": stripes.ep},
    }
    path = write_hf_dir(
        directory, megatron_to_hf(state, cfg), config, cfg, tokenizer, max_shard_bytes
    )
    return ExportResult.of(
        "hf", ELASTIC_BUDGET, path, architecture=hf_architecture(cfg), budgets=sorted(budgets)
    )


def elastic_block(directory: str | Path) -> dict[str, Any] | None:
    """The ``elastic`` block of an HF directory's ``config.json`` (``None``: a plain model)."""
    return read_hf_config(directory).get(ELASTIC_KEY)


def is_elastic_hf(directory: str | Path) -> bool:
    """Whether ``directory`` is an elastic HF checkpoint written by :func:`save_elastic_hf`."""
    path = Path(directory)
    return (path / "config.json").is_file() and elastic_block(path) is not None


def elastic_budget_widths(directory: str | Path, budget: str) -> dict[str, dict[str, int]]:
    """Widths per budget name of an elastic HF directory: one budget, or every for ``all``."""
    block = elastic_block(directory)
    if block is None:
        raise ExportError(f"{directory}: config.json has no {ELASTIC_KEY!r} block")
    budgets = block["budgets"]
    if budget == "all":
        return dict(budgets)
    if budget not in budgets:
        raise ExportError(f"budget: {budget!r} is not one of {sorted(budgets)} in {directory}")
    return {budget: budgets[budget]}


def slice_elastic_hf(
    directory: str | Path, budget: str, out_dir: str | Path, pg_collection=None
) -> ExportResult:
    """Budget ``budget`` of an elastic HF directory, written as a standalone HF model."""
    (widths,) = elastic_budget_widths(directory, budget).values()
    block = elastic_block(directory) or {}
    stripes = StripeLayout(**block.get("stripes", {}))
    model, cfg = load_hf_with_config(directory, pg_collection)
    tokenizer = None
    if (Path(directory) / TOKENIZER).is_file():
        tokenizer = build_tokenizer("hf", str(Path(directory) / TOKENIZER))
    controller = ElasticController(cfg, stripes=stripes, mode="masked")
    result = export_hf(
        model.eval(), widths, out_dir, budget=budget, controller=controller, tokenizer=tokenizer
    )
    result.extra["widths"] = widths
    return result
