"""``star-elastic importance``: rank the parent's components and reorder its weights.

Scores every elastic axis on calibration batches of the parent's data (forward only, at the
configured TP/EP layout), ranks the layers for the ``depth`` axis by the logit change when each
is removed (on the first ``importance.depth_batches``), turns the width scores into
permutations striped for ``importance.stripe_tp`` / ``stripe_ep``, applies them to the
unsharded (TP=1, EP=1) parent and saves that as a new torch_dist checkpoint. Writes
``scores.pt``, ``permutations.json``, ``summary.json`` and ``checkpoints/{iter_0000000,
elastic_layout.json}`` (with the ``layer_order``) into ``run.dir`` (the layout file is also
copied into ``iter_0000000``, outside its manifest, for readers given that directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from megatron_ext.config.compose import section, to_plain
from megatron_ext.config.parent_run import parent_model
from megatron_ext.config.schema import DataConfig, LoggerConfig, RunConfig
from megatron_ext.elastic.importance import ImportanceConfig, ImportanceResult
from megatron_ext.elastic.importance_run import rank_parent
from megatron_ext.parallel import ParallelConfig, destroy_distributed
from megatron_ext.report import format_table, key_value_table
from megatron_ext.runtime import main_print
from megatron_ext.tracking import Tracker

TABLE_LAYERS = 3  # layers shown per axis in the printed table (summary.json has them all)


def _pairs(pairs: list[list], shape: list[int]) -> str:
    """``index:score`` pairs; a 2-D (moe_ffn) flat index reads ``expert.channel``."""
    width = shape[-1]
    name = (lambda i: f"{i // width}.{i % width}") if len(shape) == 2 else str
    return ", ".join(f"{name(int(i))}:{v:.4g}" for i, v in pairs)


def _score_rows(result: ImportanceResult) -> list[list[Any]]:
    """Table rows: per axis and (first few) layers, the top and bottom components."""
    rows: list[list[Any]] = []
    axes = result.summary(top=3)["axes"]
    for axis in sorted(axes):
        if axis == "embedding":
            continue
        layers = {"all": axes[axis]} if axis == "embedding_total" else axes[axis]
        for n, (layer, d) in enumerate(layers.items()):
            if n == TABLE_LAYERS:
                rows.append([axis, f"+{len(layers) - n} more", "", "", "", ""])
                break
            shape = "x".join(map(str, d["shape"]))
            top, bottom = _pairs(d["top"], d["shape"]), _pairs(d["bottom"], d["shape"])
            rows.append([axis, layer, shape, top, bottom, d["max"]])
    return rows


def run(cfg: DictConfig) -> dict:
    """Score, reorder and save the parent; write the scores, permutations and a summary."""
    parent_dir = Path(str(cfg.parent.dir))
    run_cfg = section(cfg, "run", RunConfig)
    imp = section(cfg, "importance", ImportanceConfig)
    model_cfg = parent_model(cfg, parent_dir)
    ranked = rank_parent(
        cfg,
        parent_dir,
        model_cfg,
        imp,
        section(cfg, "parallel", ParallelConfig),
        section(cfg, "data", DataConfig),
        run_dir=run_cfg.dir,
        seed=run_cfg.seed,
        backend=cfg.model_backend,
    )
    result, diff = ranked.result, ranked.reorder_diff
    tracker = Tracker(
        section(cfg, "logger", LoggerConfig),
        ranked.run_dir,
        f"importance-{model_cfg.name}",
        to_plain(cfg),
    )
    tracker.log(0, {"tokens": result.tokens, "reorder_logits_max_abs_diff": diff})
    tracker.finish()
    headers = ["axis", "layer", "shape", "top (index:score)", "bottom (index:score)", "max"]
    # moe_ffn indices read expert.channel
    main_print(f"importance of {ranked.source}\n" + format_table(headers, _score_rows(result)))
    depth = ranked.depth_scores
    main_print(
        key_value_table(
            f"importance {model_cfg.name}: {ranked.run_dir}",
            {
                "calibration tokens": result.tokens,
                "striped for (tp, ep)": f"{imp.stripe_tp}, {imp.stripe_ep}",
                "reordered logits max |diff|": diff,
                "depth ranking (layer: s_j)": ", ".join(
                    f"{j}{model_cfg.pattern[j]}:{depth[j]:.3g}" for j in ranked.order
                )
                or "none (importance.depth_batches=0)",
                "checkpoint": str(ranked.saved),
            },
        )
    )
    destroy_distributed()
    return ranked.summary
