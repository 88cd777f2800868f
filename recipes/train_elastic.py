"""``star-elastic train-elastic``: router + KD from the frozen parent over the curriculum."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from megatron_ext.checkpoint import CheckpointError, CheckpointManager
from megatron_ext.config.compose import compose_recipe, section, to_plain
from megatron_ext.config.parent_run import parent_model
from megatron_ext.config.schema import DataConfig, LoggerConfig, RunConfig
from megatron_ext.elastic.budget_eval import (
    budget_figures,
    evaluate_at,
    plot_budgets,
    save_choices,
)
from megatron_ext.elastic.config import DEPTH, ElasticConfig
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.cost import CostModel, CostSpec
from megatron_ext.elastic.curriculum import CurriculumConfig
from megatron_ext.elastic.feasible import budget_feasible_sets
from megatron_ext.elastic.importance import ImportanceConfig
from megatron_ext.elastic.importance_run import rank_parent
from megatron_ext.elastic.router import ElasticRouter, RouterConfig, layer_counts
from megatron_ext.elastic.train_config import ElasticTrainConfig
from megatron_ext.elastic.trainer import ElasticTrainer, StagePlan
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import ConfigError, load_model_config, save_model_config
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed
from megatron_ext.report import format_table, write_summary
from megatron_ext.run_format import MODEL_CONFIG, checkpoints_dir
from megatron_ext.runtime import is_main, main_print, prepare_run_dir, set_threads
from megatron_ext.tracking import Tracker
from megatron_ext.training.data import held_out_batches, train_batches
from megatron_ext.training.engine import Engine
from megatron_ext.training.engine_config import EngineConfig, microbatches_per_step
from megatron_ext.training.loop import evaluate
from megatron_ext.training.preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionHandler


def _ensure_importance(cfg: DictConfig, source: Path) -> None:
    """Rank ``parent.dir`` into ``source.dir`` when that holds no importance run yet.

    The ranking takes the importance recipe's defaults with this run's data, layout and seed.
    """
    if (source / MODEL_CONFIG).exists() or not cfg.parent.dir:
        return
    icfg = compose_recipe("importance", [f"parent.dir={cfg.parent.dir}", f"run.dir={source}"])
    icfg.data, icfg.parallel, icfg.run.seed = cfg.data, cfg.parallel, cfg.run.seed
    parent_dir = Path(str(cfg.parent.dir))
    main_print(f"no importance-ordered checkpoint in {source}: ranking {parent_dir} first")
    rank_parent(
        icfg,
        parent_dir,
        parent_model(icfg, parent_dir),
        section(icfg, "importance", ImportanceConfig),
        section(icfg, "parallel", ParallelConfig),
        section(icfg, "data", DataConfig),
        run_dir=str(source),
        seed=int(cfg.run.seed),
        backend=cfg.model_backend,
    )
    destroy_distributed()


def _load(model_cfg, parallel, pgs, source: Path, backend: str) -> torch.nn.Module:
    ckpts = CheckpointManager(checkpoints_dir(source), pgs)
    latest = ckpts.latest_valid()
    if latest is None:
        raise CheckpointError(f"source.dir: no valid checkpoint under {checkpoints_dir(source)}")
    model = build_model(model_cfg, parallel, pgs, backend=backend, initialize=False)
    ckpts.load(latest, model, weights_only=True)
    return model


def _stages(curriculum, data_cfg, train: ElasticTrainConfig, pgs, seed, num_budgets):
    dp = torch.distributed.get_world_size(pgs.dp)
    plans, start = [], 0
    default_batch = train.global_batch_size or train.micro_batch_size * dp
    for i, stage in enumerate(curriculum.resolve(default_batch, num_budgets)):
        mbs = stage.micro_batch_size or train.micro_batch_size
        batch = stage.global_batch_size or train.global_batch_size or mbs * dp
        field = (
            f"curriculum.stages[{stage.name}].global_batch_size"
            if stage.global_batch_size
            else "elastic_train.global_batch_size"
        )
        micro = microbatches_per_step(batch, mbs, dp, field)
        batches, _ = train_batches(
            data_cfg,
            pgs,
            seq_length=stage.seq_length,
            micro_batch_size=mbs,
            steps=stage.steps,
            global_batch_size=batch,
            seed=seed + 101 * (i + 1),
        )
        plans.append(
            StagePlan(
                stage.name,
                start,
                stage.steps,
                stage.seq_length,
                list(stage.budget_probs),
                stage.lr,
                batches,
                micro,
            )
        )
        start += stage.steps
    return plans


def run(cfg: DictConfig) -> dict:
    """Train the elastic model; write checkpoints, per-budget figures, a plot and a table."""
    elastic = section(cfg, "elastic", ElasticConfig)
    parallel = section(cfg, "parallel", ParallelConfig)
    data_cfg = section(cfg, "data", DataConfig)
    run_cfg = section(cfg, "run", RunConfig)
    train_cfg = section(cfg, "elastic_train", ElasticTrainConfig)
    router_cfg = section(cfg, "router", RouterConfig)
    curriculum = section(cfg, "curriculum", CurriculumConfig)
    if router_cfg.mode != "homogeneous":
        raise ConfigError(
            "router.mode: train-elastic applies one width per axis (homogeneous); per-layer "
            "widths are produced by the router but not applied by the elastic layers yet"
        )
    if parallel.tp > 1 and not parallel.use_sequence_parallel:
        raise ConfigError(
            "parallel.sequence_parallel: train-elastic at tp>1 needs it: the router's gradient "
            "is summed over TP as the sum of the ranks' sequence slices"
        )
    source = Path(str(cfg.source.dir))
    _ensure_importance(cfg, source)
    set_threads(int(cfg.get("threads", 0)))
    pgs = init_distributed(parallel, seed=run_cfg.seed)
    preemption = PreemptionHandler().install()  # before the slow set-up
    model_cfg = load_model_config(source)
    elastic.validate_for(model_cfg, parallel)
    run_dir = prepare_run_dir(cfg, run_cfg.dir)
    stripes = StripeLayout.load(checkpoints_dir(source))
    if DEPTH in elastic.axes and len(stripes.layer_order) != model_cfg.num_layers:
        raise ConfigError(
            f"elastic.axes.{DEPTH}: {checkpoints_dir(source)} ranks no layers; rerun importance "
            "with importance.depth_batches >= 1, or drop the depth axis"
        )

    teacher = _load(model_cfg, parallel, pgs, source, cfg.model_backend).eval()
    teacher.requires_grad_(False)
    raw_student = _load(model_cfg, parallel, pgs, source, cfg.model_backend)
    ctrl = ElasticController(model_cfg, stripes=stripes, mode=elastic.compute)
    convert_to_elastic(raw_student, ctrl)
    router = ElasticRouter(elastic, router_cfg, layer_counts(elastic, model_cfg))
    spec = OmegaConf.to_container(cfg.cost)
    kinds = {b.kind for b in elastic.budgets} | {"params", "active_params"}
    costs = {
        k: CostModel(model_cfg, CostSpec(kind=k, **spec), stripes.layer_order)  # type: ignore[arg-type]
        for k in kinds
    }

    stages = _stages(curriculum, data_cfg, train_cfg, pgs, run_cfg.seed, len(elastic.budgets))
    valid = held_out_batches(
        data_cfg,
        pgs,
        seq_length=train_cfg.eval_seq_length,
        micro_batch_size=train_cfg.micro_batch_size,
        count=train_cfg.eval_batches,
        seed=run_cfg.seed,
    )
    engine_cfg = EngineConfig.of(
        train_cfg, "elastic_train", lr=stages[0].lr, global_batch_size=0
    )  # the stages' batches are checked above; lr is set per stage
    engine = Engine(
        [raw_student],
        engine_cfg,
        pgs,
        side=router,
        side_lr=router_cfg.lr,
        seq_length=stages[0].seq_length,
    )
    student, model_opt = engine.model, engine.optimizer
    trainer = ElasticTrainer(
        engine,
        teacher,
        router,
        ctrl,
        elastic,
        stages,
        costs,
        train_cfg,
        pgs,
        seed=curriculum.seed,
        feasible=budget_feasible_sets(elastic, costs, router_cfg.budget_tolerance)
        if router_cfg.budget_tolerance > 0
        else None,
    )
    ckpts = CheckpointManager(checkpoints_dir(run_dir), pgs)
    start = 0
    latest = ckpts.resume_point(run_cfg.restart_from_scratch) if run_cfg.resume else None
    if latest is not None:
        state = ckpts.load(latest, student, model_opt)
        if "step" in state:
            start = trainer.load_state(state)
            main_print(f"resumed from {latest} at step {start}")

    def evaluate_budgets(step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        choices = trainer.choices()
        for name, fig in budget_figures(elastic, choices, costs).items():
            out[f"val/{name}"] = evaluate_at(student, ctrl, choices[name], valid, pgs)
            out[f"cost_error/{name}"] = fig["cost_error"]
            out.update({f"router/{name}/{a}": w for a, w in choices[name].items()})
        return out

    tracker = Tracker(
        section(cfg, "logger", LoggerConfig), run_dir, f"elastic-{model_cfg.name}", to_plain(cfg)
    )
    try:
        history = trainer.train(
            start,
            evaluate=evaluate_budgets,
            checkpoint=lambda step, extra: ckpts.save(step, student, model_opt, extra),
            log=tracker.log,
            preemption=preemption,
        )
    except Preempted as stop:
        tracker.finish()
        main_print(f"{stop}: saved {ckpts.path_for(stop.step)}; exiting for requeue")
        destroy_distributed()
        raise SystemExit(REQUEUE_EXIT_CODE) from None
    finally:
        preemption.uninstall()
    summary = _report(cfg, trainer, model_cfg, parallel, source, valid, run_dir, stripes)
    tracker.log(
        len(history.train),
        {f"final/{k}/val_loss": v["val_loss"] for k, v in summary["budgets"].items()},
    )
    tracker.finish()
    destroy_distributed()
    return summary


def _report(
    cfg: DictConfig,
    trainer: ElasticTrainer,
    model_cfg,
    parallel: ParallelConfig,
    source: Path,
    valid: list,
    run_dir: Path,
    stripes: StripeLayout,
) -> dict:
    """Final per-budget figures (after elastic training and zero-shot), files and a table."""
    elastic, router, costs, pgs = trainer.elastic, trainer.router, trainer.cost_models, trainer.pgs
    student, ctrl, history = trainer.student, trainer.ctrl, trainer.history
    choices = trainer.choices()
    figures = budget_figures(elastic, choices, costs)
    zero_shot = _load(model_cfg, parallel, pgs, source, cfg.model_backend)
    zs_ctrl = ElasticController(model_cfg, stripes=stripes, mode="masked")
    convert_to_elastic(zero_shot, zs_ctrl)
    for name, fig in figures.items():
        fig["val_loss"] = evaluate_at(student, ctrl, choices[name], valid, pgs)
        fig["zero_shot_val_loss"] = evaluate_at(zero_shot, zs_ctrl, choices[name], valid, pgs)
    parent_loss = evaluate(trainer.teacher, valid, pgs)
    summary = {
        "model": model_cfg.name,
        "source": str(source),
        "steps": len(history.train),
        "budget_tolerance": router.cfg.budget_tolerance,
        "tokens": history.tokens,
        "tokens_per_s": history.tokens / history.train_seconds if history.train_seconds else 0.0,
        "stages": [
            {
                "name": s.name,
                "steps": s.steps,
                "seq_length": s.seq_length,
                "budget_probs": s.probs,
                "lr": s.lr,
            }
            for s in trainer.stages
        ],
        "parent_val_loss": parent_loss,
        "budgets": figures,
        "val_curve": history.val,
        "parallel": {"nproc": parallel.nproc, "tp": parallel.tp, "ep": parallel.ep},
    }
    if is_main():
        save_model_config(model_cfg, run_dir)
        save_choices(run_dir, choices)
        stripes.save(checkpoints_dir(run_dir))
        write_summary(run_dir, summary)
        plot_budgets(figures, parent_loss, run_dir / "budgets.png", f"elastic {model_cfg.name}")
    rows = [
        [
            n,
            f["target"],
            f["params"],
            f["active_params"],
            f["zero_shot_val_loss"],
            f["val_loss"],
            f["cost_error"],
            " ".join(f"{a}={w}" for a, w in f["router_choice"].items()),
        ]
        for n, f in figures.items()
    ]
    main_print(f"elastic {model_cfg.name}: {run_dir} (parent held-out loss {parent_loss:.4f})")
    main_print(
        format_table(
            [
                "budget",
                "target",
                "params",
                "active",
                "zero-shot loss",
                "elastic loss",
                "cost err",
                "router choice",
            ],
            rows,
        )
    )
    return summary
