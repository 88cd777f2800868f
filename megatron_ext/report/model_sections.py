"""Report sections about the models: loss per budget, checkpoint sizes, quantization."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from megatron_ext.report.comparison_sections import NOISE_SIGMAS
from megatron_ext.report.config import ReportConfig
from megatron_ext.report.inputs import Missing, read_summary, run_checkpoint_size
from megatron_ext.report.markdown import Section, md_table, not_run
from megatron_ext.report.plots import plot_checkpoint_sizes, plot_quantization

LOSS_PNG = "loss_vs_active_params.png"
SIZE_PNG = "checkpoint_sizes.png"
QUANT_PNG = "quantization.png"
NEGLIGIBLE_GAP = 1e-3  # nats/token: a PTQ loss gap below this leaves nothing to recover


def elastic_command(cfg: ReportConfig) -> str:
    """The command that makes the elastic run the report reads."""
    return (
        "star-elastic train-elastic data=arithmetic parent.dir=<parent run> "
        f"source.dir=<importance run> run.dir={cfg.elastic}"
    )


def slices_command(cfg: ReportConfig) -> str:
    """The command that makes the slice run the report reads."""
    return f"star-elastic slice data=arithmetic source.dir={cfg.elastic} run.dir={cfg.slices}"


def loss_section(cfg: ReportConfig, out_dir: Path) -> Section:
    """Held-out loss against active parameters, per budget, from the elastic run's summary."""
    title = "Held-out loss vs active parameters"
    summary = read_summary(cfg.elastic)
    if isinstance(summary, Missing):
        return not_run(title, [summary], [elastic_command(cfg)])
    budgets: dict[str, Any] = summary.get("budgets") or {}
    if not budgets:
        return not_run(
            title, [f"`{cfg.elastic}/summary.json` lists no budgets"], [elastic_command(cfg)]
        )
    parent = summary.get("parent_val_loss")
    rows = [
        [
            name,
            f.get("target"),
            f.get("params"),
            f.get("active_params"),
            f.get("zero_shot_val_loss"),
            f.get("val_loss"),
            " ".join(f"{a}={w}" for a, w in (f.get("router_choice") or {}).items()),
        ]
        for name, f in budgets.items()
    ]
    headers = ["budget", "target", "params", "active params", "zero-shot loss", "elastic loss"]
    body = [
        f"From `{cfg.elastic}/summary.json`: every budget of the elastic model on the held-out "
        "split of its training data (nats/token), before elastic training (the importance-"
        "ordered parent cut to the budget's widths, *zero-shot*) and after it.",
        f"The parent (the frozen teacher) scores {parent:.4f}." if parent is not None else "",
        "",
        md_table([*headers, "router choice"], rows),
    ]
    images = []
    plottable = all(
        f.get("active_params") is not None and f.get("val_loss") is not None
        for f in budgets.values()
    )
    if plottable:
        from megatron_ext.elastic.budget_eval import plot_budgets

        reference = float(parent) if parent is not None else float("nan")
        plot_budgets(budgets, reference, out_dir / LOSS_PNG, "held-out loss per budget")
        images.append(LOSS_PNG)
    smallest = min(budgets, key=lambda n: budgets[n].get("active_params") or 0)
    s = budgets[smallest]
    return Section(
        title,
        "\n".join(body),
        images,
        headline=f"{smallest}: loss {s.get('val_loss', float('nan')):.4f} at "
        f"{s.get('active_params', 0):,} active params",
        figures={"parent_val_loss": parent, "budgets": budgets},
    )


def checkpoint_section(cfg: ReportConfig, out_dir: Path) -> Section:
    """Bytes of the one elastic checkpoint against the sum of the standalone slices."""
    title = "Checkpoint size: elastic vs separate"
    slices = read_summary(cfg.slices)
    elastic = run_checkpoint_size(cfg.elastic)
    missing: list[Missing | str] = []
    if isinstance(slices, Missing):
        missing.append(slices)
    if elastic is None:
        missing.append(f"`{cfg.elastic}/checkpoints` holds no complete checkpoint")
    if missing or isinstance(slices, Missing) or elastic is None:
        return not_run(title, missing, [elastic_command(cfg), slices_command(cfg)])
    sizes = {n: int(b["bytes"]) for n, b in (slices.get("budgets") or {}).items() if "bytes" in b}
    if not sizes:
        return not_run(
            title, [f"`{cfg.slices}/summary.json` lists no slice sizes"], [slices_command(cfg)]
        )
    separate = sum(sizes.values())
    rows: list[list[Any]] = [[f"slice {n}", b, b / elastic.weights] for n, b in sizes.items()]
    rows += [
        ["all slices (separate checkpoints)", separate, separate / elastic.weights],
        ["elastic checkpoint: weights", elastic.weights, 1.0],
        [
            "elastic checkpoint: weights + optimizer state",
            elastic.total,
            elastic.total / elastic.weights,
        ],
    ]
    body = [
        f"The elastic checkpoint (`{elastic.path}`) serves every budget; the alternative is one "
        f"standalone checkpoint per budget (`star-elastic slice`, `{cfg.slices}`). Bytes on disk "
        "from the checkpoints' manifests; the training checkpoint also holds the optimizer "
        "state, which a deployed one does not need.",
        "",
        md_table(["checkpoint", "bytes", "× elastic weights"], rows),
        "",
        f"Separate checkpoints take **{separate / elastic.weights:.2f}×** the bytes of the elastic "
        "weights.",
    ]
    plot_checkpoint_sizes(
        sizes,
        {"elastic (weights)": elastic.weights, "elastic (+ optimizer)": elastic.total},
        out_dir / SIZE_PNG,
    )
    return Section(
        title,
        "\n".join(body),
        [SIZE_PNG],
        headline=f"separate / elastic = {separate / elastic.weights:.2f}x",
        figures={
            "slices": sizes,
            "elastic_weights": elastic.weights,
            "elastic_total": elastic.total,
        },
    )


def quantization_section(cfg: ReportConfig, out_dir: Path) -> Section:
    """Held-out loss unquantized / PTQ / QAD and the recovery, per budget and format."""
    title = "Quantization: BF16 / FP8 / NVFP4 recovery"
    runs: dict[str, dict[str, Any]] = {}
    missing: list[Missing | str] = []
    for directory in cfg.qad:
        summary = read_summary(directory)
        if isinstance(summary, Missing):
            missing.append(summary)
        elif isinstance(summary.get("budgets"), dict):
            runs[str(summary.get("format", Path(directory).name)).upper()] = summary
        else:
            missing.append(f"`{directory}/summary.json` lists no budgets")
    commands = [
        f"star-elastic qad data=arithmetic quant={Path(d).name.removeprefix('qad_') or 'fp8'} "
        f"source.dir={cfg.elastic} run.dir={d}"
        for d in cfg.qad
    ]
    if not runs:
        return not_run(title, missing or ["`report.qad` names no run"], commands)
    first = next(iter(runs.values()))
    budgets = list(first["budgets"])
    dtype = str(first.get("reference_dtype", "unquantized"))
    headers = ["budget", f"unquantized ({dtype})"]
    series: dict[str, list[float | None]] = {f"unquantized ({dtype})": []}
    for fmt in runs:
        headers += [f"{fmt} PTQ", f"{fmt} QAD", f"{fmt} recovery"]
        series[f"{fmt} PTQ"], series[f"{fmt} QAD"] = [], []
    rows = []
    for name in budgets:
        ref = first["budgets"][name].get("ref_loss")
        row: list[Any] = [name, ref]
        series[f"unquantized ({dtype})"].append(ref)
        for fmt, summary in runs.items():
            f = summary["budgets"].get(name, {})
            row += [f.get("ptq_loss"), f.get("qad_loss"), f.get("recovery")]
            series[f"{fmt} PTQ"].append(f.get("ptq_loss"))
            series[f"{fmt} QAD"].append(f.get("qad_loss"))
        rows.append(row)
    body = [
        "Held-out loss (nats/token) of every budget: unquantized, after PTQ (calibration only) "
        "and after QAD; recovery = (PTQ − QAD) / (PTQ − unquantized), the share of the "
        "quantization loss that QAD wins back (1 = all of it).",
        f"The unquantized reference is the model as trained, in {dtype}.",
        "",
        md_table(headers, rows),
    ]
    for fmt, summary in runs.items():
        body += recovery_notes(fmt, summary["budgets"])
    body += kl_recovery(runs, budgets)
    body += task_recovery(runs, budgets)
    if missing:
        body += ["", "Not run: " + "; ".join(str(m) for m in missing) + "."]
    plot_quantization(budgets, series, out_dir / QUANT_PNG)
    return Section(
        title,
        "\n".join(body),
        [QUANT_PNG],
        headline="formats: " + ", ".join(runs),
        figures={fmt: s["budgets"] for fmt, s in runs.items()},
    )


def kl_recovery(runs: dict[str, dict[str, Any]], budgets: list[str]) -> list[str]:
    """QAD's own target: the KL to the unquantized model on the held-out batches, after PTQ
    and after QAD, and the share of it QAD removed, ``(ptq_kd - qad_kd) / ptq_kd``."""
    headers, rows = ["budget"], []
    for fmt in runs:
        headers += [f"{fmt} KL after PTQ", f"{fmt} KL after QAD", f"{fmt} KL removed"]
    for name in budgets:
        row: list[Any] = [name]
        for summary in runs.values():
            f = summary["budgets"].get(name, {})
            ptq, qad = f.get("ptq_kd"), f.get("qad_kd")
            share = (ptq - qad) / ptq if ptq and qad is not None else None
            row += [ptq, qad, share]
        rows.append(row)
    if all(v is None for row in rows for v in row[1:]):
        return []
    return [
        "",
        "What QAD optimizes is the KL to the unquantized model (its teacher), not the held-out "
        "cross-entropy: lowering the KL moves the quantized model's predictions toward the "
        "unquantized model's, but when that KL is a few thousandths of a nat the held-out loss "
        "may move either way by as much, so the recovery above can be negative while QAD did "
        "its job. The KL on the same held-out batches (nats/token):",
        "",
        md_table(headers, rows),
    ]


def _binomial(figures: dict[str, Any] | None) -> str | None:
    """``accuracy ± its binomial standard error`` of one exact-match figure set."""
    if not figures:
        return None
    p, n = float(figures["accuracy"]), int(figures["total"])
    return f"{p:.3f} ± {math.sqrt(p * (1 - p) / n) if n else 0.0:.3f}"


def task_recovery(runs: dict[str, dict[str, Any]], budgets: list[str]) -> list[str]:
    """Task accuracy unquantized / PTQ / QAD per budget and format (``qad_train.task_prompts``),
    with the recovery on accuracy; nothing when no run scored the task."""
    scored = {fmt: s for fmt, s in runs.items() if any("task" in f for f in s["budgets"].values())}
    if not scored:
        return []
    headers, rows = ["budget", "prompts"], []
    for fmt in scored:
        headers += [f"{fmt} unquantized", f"{fmt} PTQ", f"{fmt} QAD", f"{fmt} recovery"]
    for name in budgets:
        tasks = [s["budgets"].get(name, {}).get("task", {}) for s in scored.values()]
        row: list[Any] = [name, next((t["ref"]["total"] for t in tasks if t), None)]
        for task in tasks:
            row += [_binomial(task.get(k)) for k in ("ref", "ptq", "qad")]
            row.append(task.get("recovery"))
        rows.append(row)
    return [
        "",
        "Task accuracy (exact match, think and answer at the budget, masked compute) of the same "
        "models, ± its binomial standard error; recovery = (QAD − PTQ) / (unquantized − PTQ) "
        "accuracy (empty where PTQ lost none):",
        "",
        md_table(headers, rows),
    ]


def recovery_notes(fmt: str, budgets: dict[str, dict]) -> list[str]:
    """Sentences for recovery ratios that need reading: a negligible PTQ loss, or QAD > PTQ."""
    done = {
        name: f
        for name, f in budgets.items()
        if all(isinstance(f.get(k), (int, float)) for k in ("ref_loss", "ptq_loss", "qad_loss"))
    }
    gaps = {name: f["ptq_loss"] - f["ref_loss"] for name, f in done.items()}
    if gaps and max(abs(g) for g in gaps.values()) < NEGLIGIBLE_GAP:
        return [
            "",
            f"{fmt} PTQ already loses under {NEGLIGIBLE_GAP} nats/token at every budget: "
            "there is nothing for QAD to recover, and its recovery ratio divides noise by noise.",
        ]
    notes = _noise_notes(fmt, done)
    worse = {name: f["qad_loss"] - f["ptq_loss"] for name, f in done.items()}
    worse = {name: d for name, d in worse.items() if d > 0}
    if not worse:
        return notes
    return notes + [
        "",
        f"{fmt} QAD ends above its PTQ loss at {', '.join(worse)} (by up to "
        f"{max(worse.values()):.4f} nats/token), where PTQ lost at most "
        f"{max(gaps[n] for n in worse):.4f}: QAD's training steps moved the held-out loss "
        f"more than {fmt} rounding did, so for this format PTQ alone is the better model here.",
    ]


def _noise_notes(fmt: str, done: dict[str, dict]) -> list[str]:
    """A sentence for the budgets whose QAD change of the held-out loss is within twice its
    paired standard error (``qad_change_se``, from runs that record it)."""
    within = {
        name: f
        for name, f in done.items()
        if f.get("qad_change_se") is not None
        and abs(f["ptq_loss"] - f["qad_loss"]) <= NOISE_SIGMAS * f["qad_change_se"]
    }
    if not within:
        return []
    changes = ", ".join(
        f"{name} {f['ptq_loss'] - f['qad_loss']:+.4f} ± {f['qad_change_se']:.4f}"
        for name, f in within.items()
    )
    return [
        "",
        f"{fmt} QAD's change of the held-out loss (PTQ − QAD, ± its paired standard error over "
        f"the held-out batches) is within {NOISE_SIGMAS:g} standard errors at {changes}: no "
        "measurable change there, so its recovery ratio is noise.",
    ]
