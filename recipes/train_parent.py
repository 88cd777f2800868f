"""``star-elastic train-parent``: pre-train the non-elastic parent (the KD teacher)."""

from __future__ import annotations

from omegaconf import DictConfig

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.compat import backend_report
from megatron_ext.config.compose import section, to_plain
from megatron_ext.config.schema import DataConfig, LoggerConfig, RunConfig, TrainConfig
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import ConfigError, HybridModelConfig, save_model_config
from megatron_ext.models.params import count_parameters
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.report import key_value_table, plot_loss_curves, write_summary
from megatron_ext.run_format import checkpoints_dir
from megatron_ext.runtime import is_main, main_print, prepare_run_dir, set_threads
from megatron_ext.tracking import Tracker
from megatron_ext.training.data import build_batches
from megatron_ext.training.engine import Engine
from megatron_ext.training.engine_config import EngineConfig
from megatron_ext.training.init_from import load_initial_weights
from megatron_ext.training.loop import train
from megatron_ext.training.preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionHandler


def run(cfg: DictConfig) -> dict:
    """Train the parent; write checkpoints, ``summary.json``, a loss plot and a table.

    On ``SIGTERM``/``SIGUSR1`` (any rank) it checkpoints after the current step and exits the
    process with ``REQUEUE_EXIT_CODE`` (75); the Slurm script requeues on that code, and the
    next start resumes from the newest valid checkpoint.
    """
    model_cfg = section(cfg, "model", HybridModelConfig)
    parallel = section(cfg, "parallel", ParallelConfig)
    data_cfg = section(cfg, "data", DataConfig)
    train_cfg = section(cfg, "train", TrainConfig)
    run_cfg = section(cfg, "run", RunConfig)
    engine_cfg = EngineConfig.of(train_cfg, "train")
    engine_cfg.microbatches(parallel.dp)  # a global batch that does not split fails here
    set_threads(train_cfg.threads)
    pgs = init_distributed(parallel)
    # Installed before the slow set-up: a signal during it stops the run after the first step.
    preemption = PreemptionHandler().install()
    run_dir = prepare_run_dir(cfg, run_cfg.dir)

    batches, valid, meta = build_batches(data_cfg, train_cfg, pgs, seed=run_cfg.seed)
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{meta['vocab_size']} ids"
        )
    set_seed(run_cfg.seed)
    raw_model = build_model(model_cfg, parallel, pgs, backend=cfg.model_backend)
    engine = Engine([raw_model], engine_cfg, pgs, seq_length=train_cfg.seq_length)
    model, optimizer = engine.model, engine.optimizer
    ckpts = CheckpointManager(checkpoints_dir(run_dir), pgs)
    resume = None
    latest = ckpts.resume_point(run_cfg.restart_from_scratch) if run_cfg.resume else None
    if latest is not None:
        resume = ckpts.load(latest, model, optimizer) or None
        if resume is not None and "step" not in resume:
            resume = None  # weights resharded from another layout: start the schedule over
        main_print(f"resumed from {latest}")
    init_checkpoint = None
    if latest is None and train_cfg.init_from:  # never over a checkpoint of this run
        init_checkpoint = load_initial_weights(model, train_cfg.init_from, model_cfg, pgs)
        engine.reload_model_params()
        main_print(f"fine-tuning from {init_checkpoint}")

    tracker = Tracker(
        section(cfg, "logger", LoggerConfig), run_dir, f"parent-{model_cfg.name}", to_plain(cfg)
    )
    try:
        result = train(
            engine,
            batches,
            valid,
            train_cfg,
            pgs,
            checkpoint=lambda step, extra: ckpts.save(step, model, optimizer, extra),
            resume_state=resume,
            log=tracker.log,
            preemption=preemption,
        )
    except Preempted as stop:
        tracker.finish()
        main_print(
            f"{stop}: saved {ckpts.path_for(stop.step)}; exiting with code {REQUEUE_EXIT_CODE} "
            "(requeue to resume)"
        )
        destroy_distributed()
        raise SystemExit(REQUEUE_EXIT_CODE) from None
    finally:
        preemption.uninstall()
    tracker.finish()
    counts = count_parameters(raw_model, model_cfg, pgs)
    summary = {
        "model": model_cfg.name,
        "steps": result.steps,
        "tokens": result.history.tokens,
        "final_train_loss": result.final_train_loss,
        "val_loss": result.val_loss,
        "val_curve": result.history.val,
        "tokens_per_s": result.tokens_per_s,
        "parallel": {
            "nproc": parallel.nproc,
            "tp": parallel.tp,
            "ep": parallel.ep,
            "dp": parallel.dp,
        },
        "dataset": {
            k: meta[k]
            for k in ("train_tokens", "valid_tokens", "train_documents", "valid_documents")
        },
        "checkpoint": str(ckpts.latest_valid()),
        "init_from": str(init_checkpoint) if init_checkpoint else train_cfg.init_from or None,
        "backends": backend_report(),
        **counts.as_dict(),
    }
    if is_main():
        save_model_config(model_cfg, run_dir)
        write_summary(run_dir, summary)
        plot_loss_curves(
            result.history.train,
            result.history.val,
            run_dir / "loss.png",
            f"parent {model_cfg.name}",
        )
    main_print(
        key_value_table(
            f"parent {model_cfg.name}: {run_dir}",
            {
                "steps": result.steps,
                "tokens": result.history.tokens,
                "final train loss": result.final_train_loss,
                "held-out loss": result.val_loss,
                "held-out curve": " → ".join(f"{v:.3f}" for _, v in result.history.val),
                "tokens/s": result.tokens_per_s,
                "params (total / active)": f"{counts.total:,} / {counts.active:,}",
            },
        )
    )
    destroy_distributed()
    return summary
