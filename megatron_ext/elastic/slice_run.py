"""Slice every requested budget of an elastic run and measure each slice."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_ext.checkpoint import CheckpointError, CheckpointManager
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.slicing import load_slice, save_slice
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import ConfigError, HybridModelConfig, load_model_config
from megatron_ext.models.params import count_parameters
from megatron_ext.parallel import ParallelConfig
from megatron_ext.run_format import checkpoints_dir, has_elastic_layout
from megatron_ext.training.loop import evaluate


@dataclass
class SliceResult:
    """One written slice and its figures."""

    name: str
    widths: dict[str, int]
    path: Path
    params_total: int
    params_active: int
    bytes: int
    write_s: float
    copy_s: float
    val_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The figures under the names ``summary.json`` uses."""
        return {
            "widths": self.widths,
            "checkpoint": str(self.path),
            "params_total": self.params_total,
            "params_active": self.params_active,
            "bytes": self.bytes,
            "write_s": self.write_s,
            "write_over_copy": self.write_s / self.copy_s if self.copy_s else None,
            "val_loss": self.val_loss,
        }


def requested_widths(
    elastic: ElasticConfig,
    model: HybridModelConfig,
    budget: str,
    explicit: dict[str, int],
    chosen: dict[str, dict[str, int]] | None = None,
) -> dict[str, dict[str, int]]:
    """Widths per budget name: every budget for ``"all"``, else one, with ``explicit`` on top.

    ``chosen`` (the router's final choices of an elastic run) wins over the config's widths.
    """
    names = [b.name for b in elastic.budgets] if budget == "all" else [budget]
    out = {}
    for name in names:
        widths = dict(elastic.widths_for(name, model))
        if chosen and name in chosen:
            widths.update(chosen[name])
        unknown = set(explicit) - set(widths)
        if unknown:
            raise ConfigError(f"widths: unknown or non-elastic axes {sorted(unknown)}")
        widths.update({k: int(v) for k, v in explicit.items()})
        out[name if not explicit else f"{name}+custom"] = widths
    return out


def widths_source(budget: str, chosen: dict[str, dict[str, int]] | None) -> str:
    """Where a budget's widths come from: the router's final choice, else ``elastic.budgets``."""
    if chosen and budget in chosen:
        return "router (budget_choices.json)"
    return "config (elastic.budgets widths)"


def load_source(
    source_dir: Path, pg_collection, backend: str = "auto", parallel: ParallelConfig | None = None
):
    """The source run's model, its stripe layout, and its model config.

    The model is built at ``parallel`` (default: one unsharded process) and its checkpoint,
    saved at any layout, is resharded into it on load (torch_dist).
    """
    model_cfg = load_model_config(source_dir)
    root = checkpoints_dir(source_dir)
    ckpts = CheckpointManager(root, pg_collection)
    latest = ckpts.latest_valid()
    if latest is None:
        raise CheckpointError(f"source.dir: no valid checkpoint under {root}")
    layout = parallel or ParallelConfig()
    model = build_model(model_cfg, layout, pg_collection, backend=backend)
    ckpts.load(latest, model, weights_only=True)
    stripes = StripeLayout.load(root) if has_elastic_layout(root) else StripeLayout()
    return model.eval(), stripes, model_cfg


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _copy_seconds(path: Path) -> float:
    """Time of a plain copy of the same files: the I/O floor a slice write is compared to."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        t0 = time.perf_counter()
        shutil.copytree(path, Path(tmp) / "copy")
        return time.perf_counter() - t0


def write_slices(
    model: torch.nn.Module,
    model_cfg: HybridModelConfig,
    stripes: StripeLayout,
    budgets: dict[str, dict[str, int]],
    out_dir: Path,
    pg_collection,
    valid_batches: list | None = None,
) -> list[SliceResult]:
    """Write one standalone checkpoint per budget under ``out_dir/<name>``; measure each."""
    controller = ElasticController(model_cfg, stripes=stripes, mode="masked")
    results = []
    for name, widths in budgets.items():
        target = out_dir / name
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.perf_counter()
        path = save_slice(model, widths, target, pg_collection, controller=controller)
        write_s = time.perf_counter() - t0
        small = load_slice(target, pg_collection).eval()
        counts = count_parameters(small, load_model_config(target), pg_collection)
        result = SliceResult(
            name,
            widths,
            path,
            counts.total,
            counts.active,
            _dir_bytes(path),
            write_s,
            _copy_seconds(path),
        )
        if valid_batches:
            result.val_loss = evaluate(small, valid_batches, pg_collection)
        results.append(result)
    return results
