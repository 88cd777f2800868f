"""``star-elastic qad``: PTQ and QAD of an elastic checkpoint in FP8 or NVFP4, every budget."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.compat import backend_report
from megatron_ext.compat.optional import have_fp8_gemm
from megatron_ext.config.compose import section
from megatron_ext.config.preflight import check_qad_layout
from megatron_ext.config.schema import DataConfig, RunConfig, TrainConfig
from megatron_ext.data.cache import tokenizer_for
from megatron_ext.elastic.budget_eval import load_choices, save_choices
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.slice_run import load_source, requested_widths
from megatron_ext.export.quantized import check_quantized_hf_compatible
from megatron_ext.generate.config import GenerateConfig
from megatron_ext.models.config import load_model_config, save_model_config
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.quant.backends import quant_mode, resolve_backend
from megatron_ext.quant.config import QADConfig, QuantConfig
from megatron_ext.quant.convert import convert_to_quantized
from megatron_ext.quant.ptq import calibrate
from megatron_ext.quant.qad import (
    RECOVERY,
    budget_figures,
    evaluate_budgets,
    evaluate_kd,
    train_qad,
)
from megatron_ext.quant.report import (
    HEADERS,
    TASK_HEADERS,
    budget_rows,
    plot_quant_budgets,
    task_rows,
)
from megatron_ext.quant.state import quant_state, write_quant_state
from megatron_ext.quant.task import TaskAccuracy, task_figures
from megatron_ext.report import format_table, write_summary
from megatron_ext.run_format import checkpoints_dir, read_summary
from megatron_ext.runtime import is_main, main_print, prepare_run_dir
from megatron_ext.training.data import build_batches
from megatron_ext.training.engine import Engine
from megatron_ext.training.engine_config import EngineConfig
from megatron_ext.training.preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionHandler


def _batches(data: DataConfig, qad: QADConfig, calib: int, pgs, seed: int):
    """(training iterator, calibration batches, held-out batches).

    Each data-parallel rank reads its part of every training batch; the calibration and
    held-out batches are the same on every rank (those of one process), so the scales and
    the per-budget figures do not depend on the layout.
    """
    tc = TrainConfig(
        steps=max(1, qad.steps),
        warmup_steps=0,
        micro_batch_size=qad.micro_batch_size,
        global_batch_size=qad.global_batch_size,
        seq_length=qad.seq_length,
        eval_batches=1,
    )
    train, _, _ = build_batches(data, tc, pgs, seed=seed + 1)
    calib_tc = dataclasses.replace(tc, steps=calib, global_batch_size=0)
    calib_it, _, _ = build_batches(data, calib_tc, pgs, seed=seed + 2, split_over_dp=False)
    ev = dataclasses.replace(tc, seq_length=qad.eval_seq_length, eval_batches=qad.eval_batches)
    valid = build_batches(data, ev, pgs, seed=seed, split_over_dp=False)[1]
    return train, [next(calib_it) for _ in range(calib)], valid


def _teacher(cfg: DictConfig, qad: QADConfig, source: Path, pgs, backend: str, model_cfg, stripes):
    """The frozen teacher and its elastic controller (``None`` for the non-elastic parent),
    sharded like the student."""
    parallel = section(cfg, "parallel", ParallelConfig)
    if qad.teacher == "parent":
        parent = str(cfg.parent.dir) or read_summary(source)["source"]
        teacher = load_source(Path(parent), pgs, backend, parallel)[0]
        ctrl = None
    else:
        teacher = load_source(source, pgs, backend, parallel)[0]
        ctrl = ElasticController(model_cfg, stripes=stripes, mode="masked")
        convert_to_elastic(teacher, ctrl)
    return teacher.eval().requires_grad_(False), ctrl


def run(cfg: DictConfig) -> dict:
    """Calibrate (PTQ), distill (QAD), evaluate every budget; save, report, plot.

    At the layout of ``parallel`` (TP, EP, PP, DP: the elastic checkpoint is resharded on
    load); the figures, the checkpoint and ``quant_state.json`` are those of one process up
    to rounding.

    QAD checkpoints every ``qad_train.save_interval`` steps. A restarted run (``run.resume``)
    redoes the deterministic PTQ from the source, then continues QAD from the newest
    checkpoint bit-identically. On ``SIGTERM``/``SIGUSR1`` it checkpoints and exits with
    ``REQUEUE_EXIT_CODE`` (75).
    """
    elastic = section(cfg, "elastic", ElasticConfig)
    run_cfg = section(cfg, "run", RunConfig)
    data = section(cfg, "data", DataConfig)
    quant = section(cfg, "quant", QuantConfig)
    qad = section(cfg, "qad_train", QADConfig)
    parallel = section(cfg, "parallel", ParallelConfig)
    check_qad_layout(parallel, bool(cfg.export), qad.task_prompts)
    backend, why = resolve_backend(quant)
    model_backend = "te" if backend == "te" else str(cfg.model_backend)
    source = Path(str(cfg.source.dir))
    if cfg.export:
        check_quantized_hf_compatible(load_model_config(source))  # refuse before the long work
    engine_cfg = EngineConfig.of(qad, "qad_train", weight_decay=0.0)
    engine_cfg.microbatches(1)  # a global batch that does not split fails before the work
    task = None
    if qad.task_prompts:  # an evaluation set without answers fails before the work
        gen = section(cfg, "generation", GenerateConfig)
        task = TaskAccuracy.of(gen, data, qad.task_prompts, tokenizer_for(data))
    accuracy: dict = {}
    pgs = init_distributed(parallel)
    preemption = PreemptionHandler().install()
    model_cfg = load_model_config(source)
    parallel.check_model(model_cfg)
    elastic.validate_for(model_cfg, parallel)
    run_dir = prepare_run_dir(cfg, run_cfg.dir)
    set_seed(run_cfg.seed)
    student, stripes, model_cfg = load_source(source, pgs, model_backend, parallel)
    budgets = requested_widths(elastic, model_cfg, "all", {}, load_choices(source))
    teacher, teacher_ctrl = _teacher(cfg, qad, source, pgs, model_backend, model_cfg, stripes)
    ctrl = ElasticController(model_cfg, stripes=stripes, mode="masked")
    convert_to_elastic(student, ctrl)
    record = None
    if backend != "te":
        record = convert_to_quantized(
            student, quant, backend=backend, controller=ctrl, budgets=budgets
        )
    train, calib, valid = _batches(data, qad, quant.calib_batches, pgs, run_cfg.seed)

    with quant_mode(student, "off", backend, quant.format):
        ref = evaluate_budgets(student, ctrl, budgets, valid, pgs)
        if task is not None:
            accuracy["ref"] = task(student, ctrl, budgets)
    if record is not None:
        full = {"full": ctrl.full_widths}
        calibrate(student, calib, ctrl, budgets if quant.calib_budgets == "all" else full, pgs)
    with quant_mode(student, "quant", backend, quant.format):
        kd = {"ptq": evaluate_kd(student, ctrl, teacher, teacher_ctrl, budgets, valid, qad, pgs)}
        ptq = evaluate_budgets(student, ctrl, budgets, valid, pgs)
        if task is not None:
            accuracy["ptq"] = task(student, ctrl, budgets)
        history, final = None, {}
        ckpts = CheckpointManager(checkpoints_dir(run_dir), pgs, keep=1)
        tags = {"kind": "qad", "format": quant.format}
        if qad.steps:
            engine = Engine([student], engine_cfg, pgs, seq_length=qad.seq_length)
            model, opt = engine.model, engine.optimizer
            resume = None
            latest = ckpts.resume_point(run_cfg.restart_from_scratch) if run_cfg.resume else None
            if latest is not None:
                resume = ckpts.load(latest, model, opt) or None
                if resume is not None and "step" not in resume:
                    resume = None
                main_print(f"resumed QAD from {latest}")
            try:
                history = train_qad(
                    engine,
                    ctrl,
                    teacher,
                    teacher_ctrl,
                    budgets,
                    train,
                    qad,
                    pgs,
                    checkpoint=lambda step, extra: ckpts.save(step, model, opt, {**extra, **tags}),
                    resume_state=resume,
                    preemption=preemption,
                )
            except Preempted as stop:
                main_print(f"{stop}: saved {ckpts.path_for(stop.step)}; exiting for requeue")
                destroy_distributed()
                raise SystemExit(REQUEUE_EXIT_CODE) from None
            finally:
                preemption.uninstall()
            final = evaluate_budgets(student, ctrl, budgets, valid, pgs)
            kd["qad"] = evaluate_kd(student, ctrl, teacher, teacher_ctrl, budgets, valid, qad, pgs)
            if task is not None:
                accuracy["qad"] = task(student, ctrl, budgets)
            path = ckpts.path_for(qad.steps)
        else:
            preemption.uninstall()
            path = ckpts.save(0, student, None, tags)

    figures = budget_figures(budgets, ref, ptq, final, kd)
    for name, row in task_figures(accuracy).items():
        figures[name]["task"] = row
    qstate = quant_state(student, pgs) if record is not None else None  # every rank's
    if qstate is not None:
        write_quant_state(qstate, run_dir)
    if is_main():
        stripes.save(checkpoints_dir(run_dir))
        save_model_config(model_cfg, run_dir)
        save_choices(run_dir, budgets)
    exports = {}
    if cfg.export and record is not None:
        from megatron_ext.export.quantized import export_quantized_hf

        tok = tokenizer_for(data)
        for name, widths in budgets.items():
            result = export_quantized_hf(
                student,
                widths,
                run_dir / "exports" / name,
                budget=name,
                controller=ctrl,
                tokenizer=tok,
            )
            exports[name] = result.as_dict()
    summary = {
        "source": str(source),
        "format": quant.format,
        "backend": {"name": backend, "why": why, "fp8_gemm": have_fp8_gemm(), **backend_report()},
        "reference_dtype": model_cfg.params_dtype,
        "recovery": RECOVERY,
        "quant": dataclasses.asdict(quant),
        "qad_train": dataclasses.asdict(qad),
        "quantized_modules": sorted(qstate["modules"]) if qstate else [],
        "high_precision": dict(qstate["high_precision"]) if qstate else {},
        "qad": None if history is None else history.summary(),
        "qad_curve": [] if history is None else [dict(s) for s in history.steps],
        "parallel": dataclasses.asdict(parallel),
        "checkpoint": str(path),
        "exports": exports,
        "budgets": figures,
    }
    title = f"{quant.format.upper()} {model_cfg.name} ({backend})"
    if is_main():
        write_summary(run_dir, summary)
        plot_quant_budgets(figures, run_dir / "quant_budgets.png", title)
    main_print(f"{title}: {run_dir} (reference dtype {model_cfg.params_dtype})")
    main_print(format_table(HEADERS, budget_rows(figures)))
    if accuracy:
        main_print(format_table(TASK_HEADERS, task_rows(figures)))
    destroy_distributed()
    return summary
