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

from omegaconf import DictConfig, OmegaConf

from megatron_ext.checkpoint import CheckpointError, CheckpointManager
from megatron_ext.config.compose import section, to_plain
from megatron_ext.config.schema import DataConfig, LoggerConfig, RunConfig
from megatron_ext.elastic.depth import layer_order, layer_removal_scores
from megatron_ext.elastic.importance import ImportanceConfig, ImportanceResult, compute_importance
from megatron_ext.elastic.reorder import (
    compute_permutations,
    layout_record,
    permutations_to_json,
)
from megatron_ext.elastic.reorder_run import reorder_checked, unsharded
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import ConfigError, HybridModelConfig, save_model_config
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.report import format_table, key_value_table, write_summary
from megatron_ext.run_format import (
    CONFIG,
    ELASTIC_LAYOUT,
    PERMUTATIONS,
    SCORES,
    checkpoints_dir,
    config_path,
    read_config,
    save_torch,
    write_elastic_layout,
    write_json,
)
from megatron_ext.runtime import is_main, main_print, prepare_run_dir
from megatron_ext.tracking import Tracker
from megatron_ext.training.data import held_out_batches, train_batches

TABLE_LAYERS = 3  # layers shown per axis in the printed table (summary.json has them all)


def _parent_model(cfg: DictConfig, parent_dir: Path) -> HybridModelConfig:
    """The parent's model shape from its ``config.yaml`` (else this config's ``model``)."""
    path = config_path(parent_dir)
    if not path.is_file():
        raise ConfigError(f"parent.dir: {parent_dir} has no {CONFIG} (not a train-parent run)")
    parent = read_config(parent_dir)
    if not isinstance(parent, DictConfig):
        raise ConfigError(f"parent.dir: {path} is not a mapping")
    if "model" not in parent:
        return section(cfg, "model", HybridModelConfig)
    model = section(parent, "model", HybridModelConfig)
    if "model" in cfg and to_plain(cfg)["model"] != OmegaConf.to_container(parent.model):
        main_print(f"note: using the parent's model config from {path}, not this run's `model`")
    return model


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
    imp = section(cfg, "importance", ImportanceConfig)
    parallel = section(cfg, "parallel", ParallelConfig)
    data_cfg = section(cfg, "data", DataConfig)
    run_cfg = section(cfg, "run", RunConfig)
    parent_dir = Path(str(cfg.parent.dir))
    model_cfg = _parent_model(cfg, parent_dir)
    imp.check_model(model_cfg)
    pgs = init_distributed(parallel)
    run_dir = prepare_run_dir(cfg, run_cfg.dir)
    scored_at = {"nproc": parallel.nproc, "tp": parallel.tp, "ep": parallel.ep}

    shape = dict(seq_length=imp.seq_length, micro_batch_size=imp.micro_batch_size)
    batches, meta = train_batches(
        data_cfg, pgs, steps=imp.calib_batches, seed=run_cfg.seed, **shape
    )
    check = held_out_batches(data_cfg, pgs, count=1, seed=run_cfg.seed, **shape)
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise ConfigError(
            f"data: the tokenizer's {meta['vocab_size']} ids exceed the parent's "
            f"model.vocab_size={model_cfg.vocab_size}"
        )
    set_seed(run_cfg.seed)
    model = build_model(model_cfg, parallel, pgs, backend=cfg.model_backend)
    parent_root = checkpoints_dir(parent_dir)
    source = CheckpointManager(parent_root, pgs).latest_valid()
    if source is None:
        raise CheckpointError(f"parent.dir: no valid checkpoint under {parent_root}")
    CheckpointManager(parent_root, pgs).load(source, model, weights_only=True)
    main_print(f"scoring {source} on {imp.calib_batches} batches per data-parallel rank")
    calibration = [next(batches) for _ in range(imp.calib_batches)]
    result = compute_importance(model, calibration, pgs, progress=True)
    depth_scores: dict[int, float] = {}
    order: tuple[int, ...] = ()
    if imp.depth_batches:
        depth_scores = layer_removal_scores(
            model, calibration[: imp.depth_batches], pgs, progress=True
        )
        order = layer_order(depth_scores, model_cfg.pattern)
    perms = compute_permutations(
        result.scores, model_cfg, stripe_tp=imp.stripe_tp, stripe_ep=imp.stripe_ep
    )

    model, parallel, pgs = unsharded(
        model, model_cfg, parallel, pgs, parent_root, source, cfg.model_backend
    )
    diff = reorder_checked(model, perms, check[0])
    out = CheckpointManager(checkpoints_dir(run_dir), pgs)
    saved = out.save(0, model, None, {"parent_checkpoint": str(source), "importance": True})
    record = layout_record(
        perms, imp.stripe_tp, imp.stripe_ep, parent_checkpoint=str(source), checkpoint=str(saved)
    )
    if order:
        record["layer_order"] = list(order)
        record["depth_scores"] = {str(j): s for j, s in sorted(depth_scores.items())}

    summary = {
        "model": model_cfg.name,
        "parent": str(parent_dir),
        "parent_checkpoint": str(source),
        "checkpoint": str(saved),
        "elastic_layout": str(checkpoints_dir(run_dir) / ELASTIC_LAYOUT),
        "calib_batches": result.batches,
        "tokens": result.tokens,
        "seq_length": imp.seq_length,
        "micro_batch_size": imp.micro_batch_size,
        "stripe": {"tp": imp.stripe_tp, "ep": imp.stripe_ep},
        "scored_at": scored_at,
        "reorder_logits_max_abs_diff": float(diff),
        "importance": result.summary(),
        "depth": {
            "batches": imp.depth_batches,
            "scores": {str(j): s for j, s in sorted(depth_scores.items())},
            "layer_order": list(order),
        },
    }
    if is_main():
        save_model_config(model_cfg, run_dir)
        write_elastic_layout(checkpoints_dir(run_dir), record)  # beside the checkpoint
        write_elastic_layout(saved, record)  # and in it (not in its manifest)
        save_torch(run_dir / SCORES, {a: dict(layers) for a, layers in result.scores.items()})
        write_json(
            run_dir / PERMUTATIONS,
            {"tp": imp.stripe_tp, "ep": imp.stripe_ep, "axes": permutations_to_json(perms)},
            sort_keys=True,
        )
        write_summary(run_dir, summary)
    tracker = Tracker(
        section(cfg, "logger", LoggerConfig), run_dir, f"importance-{model_cfg.name}", to_plain(cfg)
    )
    tracker.log(0, {"tokens": result.tokens, "reorder_logits_max_abs_diff": float(diff)})
    tracker.finish()
    headers = ["axis", "layer", "shape", "top (index:score)", "bottom (index:score)", "max"]
    # moe_ffn indices read expert.channel
    main_print(f"importance of {source}\n" + format_table(headers, _score_rows(result)))
    main_print(
        key_value_table(
            f"importance {model_cfg.name}: {run_dir}",
            {
                "calibration tokens": result.tokens,
                "striped for (tp, ep)": f"{imp.stripe_tp}, {imp.stripe_ep}",
                "reordered logits max |diff|": float(diff),
                "depth ranking (layer: s_j)": ", ".join(
                    f"{j}{model_cfg.pattern[j]}:{depth_scores[j]:.3g}" for j in order
                )
                or "none (importance.depth_batches=0)",
                "checkpoint": str(saved),
            },
        )
    )
    destroy_distributed()
    return summary
