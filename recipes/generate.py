"""``star-elastic generate``: cached decoding with budget control (think at S, answer at L)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from megatron_ext.compat import backend_report
from megatron_ext.config.compose import section
from megatron_ext.config.schema import DataConfig, RunConfig
from megatron_ext.data.tokenizer import build_tokenizer
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.generate.budget import (
    PairReport,
    pair_name,
    run_pairs,
    time_pairs_interleaved,
    timing_summary,
)
from megatron_ext.generate.config import GenerateConfig
from megatron_ext.generate.evaluate import EvalSet, evaluation_set, score_report
from megatron_ext.generate.sources import ElasticBudgets, open_budgets, source_kind
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed
from megatron_ext.report import format_table, write_summary
from megatron_ext.runtime import prepare_run_dir, set_threads

HEADERS = [
    "pair",
    "phase",
    "prompt tok",
    "new tok",
    "prefill tok/s",
    "TTFT ms",
    "decode tok/s",
    "ms/token",
    "latency s",
]


def _rows(report: PairReport) -> list[list[Any]]:
    """Two table rows per pair: its think phase and its answer phase (means per prompt)."""
    name = pair_name(report.think_budget, report.answer_budget)
    rows = []
    for phase, budget in (("think", report.think_budget), ("answer", report.answer_budget)):
        fig = report.phase(phase).figures()
        n = max(int(fig["generations"]), 1)
        rows.append(
            [
                name,
                f"{phase} @ {budget}",
                fig["prefill_tokens"] / n,
                fig["new_tokens"] / n,
                fig["prefill_tokens_per_s"],
                fig["time_to_first_token_ms"],
                fig["decode_tokens_per_s"],
                fig["decode_ms_per_token"],
                fig["latency_s"],
            ]
        )
    return rows


def _scored(report: PairReport, evalset: EvalSet, think_close: str) -> dict[str, Any]:
    """The pair's summary; with references, its exact-match figures and each verdict."""
    out = report.as_dict()
    figures, verdicts = score_report(report, evalset, think_close)
    out.update(figures)
    for item, reference, verdict in zip(out["generations"], evalset.references or [], verdicts):
        item.update(reference=reference, **verdict)
    return out


def run(cfg: DictConfig) -> dict:
    """Answer every prompt under each budget pair; write ``summary.json``, print the table."""
    gen = section(cfg, "generation", GenerateConfig)
    elastic = section(cfg, "elastic", ElasticConfig)
    data = section(cfg, "data", DataConfig)
    run_cfg = section(cfg, "run", RunConfig)
    evalset = evaluation_set(gen, data)
    prompts = evalset.prompts
    source = Path(str(cfg.source.dir))
    kind = source_kind(source, str(cfg.source.kind))
    set_threads(int(cfg.get("threads", 0)))
    pgs = init_distributed(ParallelConfig(), seed=run_cfg.seed)  # decoding runs at TP=1
    run_dir = prepare_run_dir(cfg, run_cfg.dir)
    tokenizer = build_tokenizer(data.tokenizer, data.tokenizer_path or None)
    models = open_budgets(source, kind, gen.budgets(), elastic, pgs, str(cfg.model_backend))
    reports = list(run_pairs(models, tokenizer, gen, prompts))
    pairs = {
        pair_name(r.think_budget, r.answer_budget): _scored(r, evalset, gen.think_close)
        for r in reports
    }
    if gen.timing_rounds:
        for name, rounds in time_pairs_interleaved(models, tokenizer, gen, prompts).items():
            pairs[name]["timing"] = timing_summary(rounds)
    summary = {
        "source": str(source),
        "source_kind": kind,
        "budget_widths": models.widths if isinstance(models, ElasticBudgets) else None,
        "compute": models.mode if isinstance(models, ElasticBudgets) else "slices",
        "prompts": len(prompts),
        "prompts_from": evalset.origin,
        "scored": evalset.references is not None,
        "max_think_tokens": gen.max_think_tokens,
        "max_answer_tokens": gen.max_answer_tokens,
        "timing_rounds": gen.timing_rounds,
        "timing_prompts": min(gen.timing_prompts, len(prompts)) if gen.timing_rounds else 0,
        "sampling": {"temperature": gen.temperature, "top_k": gen.top_k, "seed": gen.seed},
        "pairs": pairs,
        "backends": backend_report(),
    }
    write_summary(run_dir, summary)
    print(f"budget control on {source} ({kind}), {len(prompts)} prompts, K={gen.max_think_tokens}")
    print(format_table(HEADERS, [row for r in reports for row in _rows(r)]))
    ends = [
        [
            name,
            p["think_closed"],
            p["think_at_limit"],
            p["latency_s"],
            p.get("trace_accuracy", "-"),
            p.get("accuracy", "-"),
        ]
        for name, p in pairs.items()
    ]
    closed = f"think ended by {gen.think_close!r}"
    headers = ["pair", closed, "at K", "end-to-end s", "trace exact", "answer exact"]
    print(format_table(headers, ends))
    destroy_distributed()
    return summary
