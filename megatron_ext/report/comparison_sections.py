"""Report sections that compare training choices: nested vs standalone, stage 2 or not,
width vs depth at equal parameters, and every budget on a second held-out corpus.

The first, third and fourth read ``report.comparisons`` (``bench/report_comparisons.py``'s
``summary.json``); the second reads the elastic run, the same run without its second
curriculum stage, and the generate runs on each (the think = answer pairs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from megatron_ext.report.config import ReportConfig
from megatron_ext.report.inputs import Missing, read_summary
from megatron_ext.report.markdown import Section, md_table, not_run
from megatron_ext.report.plots import plot_comparison

COMPARISONS_SCRIPT = "bench/report_comparisons.py"
NESTED_PNG = "nested_vs_standalone.png"
WIDTH_DEPTH_PNG = "width_vs_depth.png"
NOISE_SIGMAS = 2.0  # a difference counts when it exceeds twice its standard error


def binomial_se(p: float | None, n: int | None) -> float | None:
    """Standard error of an accuracy ``p`` measured on ``n`` prompts."""
    if p is None or not n:
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def difference(a: float, a_se: float, b: float, b_se: float) -> tuple[float, float, bool]:
    """``a - b``, its standard error (independent errors) and whether it exceeds
    :data:`NOISE_SIGMAS` of it."""
    se = math.hypot(a_se, b_se)
    diff = a - b
    return diff, se, abs(diff) > NOISE_SIGMAS * se


def _pm(value: float | None, se: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{value:.{digits}f}"


def _loss(m: dict[str, Any], key: str = "held_out") -> tuple[float, float]:
    return float(m[key]["loss"]), float(m[key]["sem"])


def _acc(m: dict[str, Any]) -> tuple[float, float]:
    task = m["task"]
    p = float(task["accuracy"])
    return p, binomial_se(p, int(task["total"])) or 0.0


def _comparisons(cfg: ReportConfig, title: str) -> dict[str, Any] | Section:
    summary = read_summary(cfg.comparisons)
    if isinstance(summary, Missing):
        command = f"python {COMPARISONS_SCRIPT} {cfg.elastic} {cfg.comparisons}"
        return not_run(title, [summary], [command])
    return summary


def nested_section(cfg: ReportConfig, out_dir: Path) -> Section:
    """Every budget of the elastic run against its slice distilled alone, equal tokens."""
    title = "Nested vs standalone, every budget"
    summary = _comparisons(cfg, title)
    if isinstance(summary, Section):
        return summary
    rows, verdicts, figures = [], [], {}
    for name, b in summary.get("budgets", {}).items():
        alone, nested = b["standalone"], b["elastic"]
        dl = difference(*_loss(alone), *_loss(nested))
        da = difference(*_acc(nested), *_acc(alone))
        rows.append(
            [name, b["steps"], b["tokens"], _pm(*_loss(b["zero_shot"]))]
            + [_pm(*_loss(alone)), _pm(*_loss(nested)), _pm(dl[0], dl[1])]
            + [_pm(*_acc(alone), 3), _pm(*_acc(nested), 3)]
        )
        same = "within noise" if not dl[2] else ("elastic better" if dl[0] > 0 else "worse")
        verdicts.append(f"{name}: {same} on loss ({dl[0]:+.4f} ± {dl[1]:.4f})")
        figures[name] = {"loss_difference": dl[0], "loss_difference_se": dl[1]}
        figures[name] |= {"accuracy_difference": da[0], "accuracy_difference_se": da[1]}
    headers = ["budget", "steps", "tokens", "zero-shot loss", "standalone loss", "elastic loss"]
    headers += ["standalone − elastic", "standalone accuracy", "elastic accuracy"]
    body = [
        f"From `{cfg.comparisons}/summary.json` ({COMPARISONS_SCRIPT}). Each budget's slice of "
        "the importance-ordered parent, at the budget's final router widths, distilled alone "
        "from the frozen parent with the steps, batches, loss and optimizer that budget got "
        "in the elastic run, against the elastic checkpoint at the same widths. Loss: "
        "held-out nats/token, mean ± standard error over the held-out batches; accuracy: "
        f"exact match on {summary.get('prompts', '?')} test prompts (think and answer at the "
        "budget), ± its binomial standard error. A difference counts when it exceeds twice "
        "its standard error.",
        "",
        md_table(headers, rows),
        "",
        "; ".join(verdicts) + ".",
    ]
    kinds = {"zero-shot": "zero_shot", "standalone": "standalone", "elastic": "elastic"}
    budgets = summary.get("budgets", {})
    plot_comparison(
        list(budgets),
        {k: [_loss(b[v])[0] for b in budgets.values()] for k, v in kinds.items()},
        {k: [_acc(b[v])[0] for b in budgets.values()] for k, v in kinds.items()},
        out_dir / NESTED_PNG,
        "nested (elastic) vs standalone, equal tokens",
    )
    return Section(
        title, "\n".join(body), [NESTED_PNG], headline="; ".join(verdicts), figures=figures
    )


def width_depth_section(cfg: ReportConfig, out_dir: Path) -> Section:
    """A width-only and a depth-only budget at equal parameters, distilled the same way."""
    title = "Width vs depth at equal parameters"
    summary = _comparisons(cfg, title)
    if isinstance(summary, Section):
        return summary
    entry = summary.get("width_vs_depth")
    if not entry:
        return not_run(
            title, ["the run has no depth axis with a layer ranking"], ["elastic=tiny_depth"]
        )
    parent = summary["parent"]
    p_loss, _ = _loss(parent)
    p_acc, _ = _acc(parent)
    rows, figs = [], {}
    for kind in ("width_only", "depth_only"):
        e = entry[kind]
        loss, loss_se = _loss(e["distilled"])
        acc, acc_se = _acc(e["distilled"])
        kept = acc / p_acc if p_acc else None
        widths = " ".join(f"{a}={w}" for a, w in e["widths"].items())
        rows.append(
            [kind.replace("_", "-"), e["params"], e["params"] / entry["full_params"]]
            + [_pm(*_loss(e["zero_shot"])), _pm(loss, loss_se), _pm(acc, acc_se, 3), kept, widths]
        )
        figs[kind] = {"loss": loss, "loss_se": loss_se, "accuracy": acc, "kept": kept}
    w, d = entry["width_only"]["distilled"], entry["depth_only"]["distilled"]
    dl = difference(*_loss(d), *_loss(w))
    better = "width" if dl[0] > 0 else "depth"
    kept_w, kept_d = figs["width_only"]["kept"], figs["depth_only"]["kept"]
    verdict = (
        f"{better}-only has the lower held-out loss by {abs(dl[0]):.4f} ± {dl[1]:.4f}"
        + ("" if dl[2] else " (within noise)")
        + (
            f"; accuracy kept (of the parent's {p_acc:.1%}): width {kept_w:.1%}, depth {kept_d:.1%}"
            if kept_w is not None and kept_d is not None
            else "; the parent answers no prompt right, so no accuracy is kept"
        )
    )
    body = [
        f"Depth-only: every width full, the {entry['depth']} top-ranked layers; width-only: all "
        f"layers, the width choice whose parameter count is nearest (mismatch "
        f"{entry['mismatch']:.2%}). Both sliced from the parent and distilled alone with the "
        f"smallest budget's share of the elastic run ({entry['steps']} steps, {entry['tokens']:,}"
        f" tokens). Parent: loss {p_loss:.4f}, accuracy {p_acc:.1%}. The paper: width kept 98.1%"
        " and depth 95.2% of the parent's accuracy at 15% fewer parameters.",
        "",
        md_table(
            ["budget", "params", "× parent", "zero-shot loss", "distilled loss", "accuracy"]
            + ["accuracy kept", "widths"],
            rows,
        ),
        "",
        verdict + ".",
    ]
    kinds = ("width_only", "depth_only")
    plot_comparison(
        ["zero-shot", "distilled"],
        {k: [_loss(entry[k]["zero_shot"])[0], figs[k]["loss"]] for k in kinds},
        {k: [_acc(entry[k]["zero_shot"])[0], figs[k]["accuracy"]] for k in kinds},
        out_dir / WIDTH_DEPTH_PNG,
        f"width-only vs depth-only at {entry['width_only']['params']:,} / "
        f"{entry['depth_only']['params']:,} params",
    )
    return Section(title, "\n".join(body), [WIDTH_DEPTH_PNG], headline=verdict, figures=figs)


def second_corpus_section(cfg: ReportConfig, out_dir: Path) -> Section:
    """Every budget's loss on text none of the runs trained on, and whether the order holds."""
    title = "Held-out loss on a second corpus"
    summary = _comparisons(cfg, title)
    if isinstance(summary, Section):
        return summary
    corpus = summary.get("second_corpus", {})
    budgets = summary.get("budgets", {})
    rows = [["parent", _pm(*_loss(summary["parent"], "second_corpus")), "-", "-"]]
    own, other = {}, {}
    for name, b in budgets.items():
        own[name] = _loss(b["elastic"])[0]
        other[name] = _loss(b["elastic"], "second_corpus")[0]
        rows.append(
            [name, _pm(*_loss(b["elastic"], "second_corpus"))]
            + [_pm(*_loss(b["standalone"], "second_corpus")), _pm(*_loss(b["elastic"]))]
        )
    order_own = sorted(own, key=own.__getitem__)
    order_other = sorted(other, key=other.__getitem__)
    kept = order_own == order_other
    verdict = (
        f"order by held-out loss: {' < '.join(order_own)} on the training data's split, "
        f"{' < '.join(order_other)} on the second corpus: "
        + ("the budgets keep their order" if kept else "the order changes")
    )
    body = [
        f"The second corpus: the {len(corpus.get('files', []))} licence texts of "
        f"`{corpus.get('root', '?')}` ({corpus.get('chars', 0):,} characters; "
        f"{summary.get('second_corpus_tokens', 0):,} tokens scored), English prose that no run "
        "trained on, read at run time from the system. Mean ± standard error over batches.",
        "",
        md_table(
            ["model", "elastic: second corpus", "standalone: second corpus", "elastic: held-out"],
            rows,
        ),
        "",
        verdict + ".",
    ]
    return Section(
        title, "\n".join(body), headline=verdict, figures={"kept_order": kept, "loss": other}
    )


def stage2_section(cfg: ReportConfig, out_dir: Path) -> Section:
    """The elastic run against the same run with its second stage replaced by the first."""
    title = "Stage 2 or not, equal tokens"
    runs = {"two stages": cfg.elastic, "stage 1 only": cfg.elastic_stage1_only}
    gens = {"two stages": cfg.generate_elastic, "stage 1 only": cfg.generate_stage1_only}
    summaries = {k: read_summary(d) for k, d in runs.items()}
    generated = {k: read_summary(d) for k, d in gens.items()}
    missing = [s for s in (*summaries.values(), *generated.values()) if isinstance(s, Missing)]
    if missing:
        return not_run(title, missing, ["scripts/report.sh (the stage-1-only run)"])
    rows, gains = [], {}
    two, one = summaries["two stages"], summaries["stage 1 only"]
    for name, b in (two.get("budgets") or {}).items():  # type: ignore[union-attr]
        o = (one.get("budgets") or {}).get(name, {})  # type: ignore[union-attr]
        accs = []
        for label in gens:
            pair = (generated[label].get("pairs") or {}).get(f"{name}->{name}", {})  # type: ignore[union-attr]
            accs.append((pair.get("accuracy"), pair.get("total")))
        gain = float(o["val_loss"]) - float(b["val_loss"])
        gains[name] = gain
        rows.append(
            [name, b.get("active_params"), o.get("val_loss"), b.get("val_loss"), gain]
            + [_pm(accs[1][0], binomial_se(*accs[1]), 3), _pm(accs[0][0], binomial_se(*accs[0]), 3)]
        )
    ranked = sorted(gains, key=gains.__getitem__, reverse=True)
    sizes = {n: (two.get("budgets") or {})[n].get("active_params", 0) for n in gains}  # type: ignore[union-attr]
    smallest = min(sizes, key=sizes.__getitem__) if sizes else None
    if not ranked:
        verdict = "no budgets"
    elif gains[ranked[0]] <= 0:
        verdict = (
            "stage 2 lowers no budget's held-out loss at equal tokens (gains "
            + ", ".join(f"{n} {gains[n]:+.4f}" for n in gains)
            + ")"
        )
    else:
        verdict = f"stage 2 lowers held-out loss most at {ranked[0]} ({gains[ranked[0]]:+.4f})" + (
            ": it helps the smallest budget most"
            if ranked[0] == smallest
            else f", not at the smallest budget {smallest}"
        )
    body = [
        f"`{cfg.elastic}` (two stages) against `{cfg.elastic_stage1_only}`, the same run with "
        "stage 2 replaced by more of stage 1 (its sequence length and uniform budget draws) "
        "at the same token count. Held-out loss from each run's summary (its held-out "
        "batches: the same in both runs); gain = stage-1-only minus two-stage loss (positive: "
        "stage 2 helped). Accuracy: think and answer at the budget, on the elastic checkpoint "
        "in narrow compute, ± binomial standard error.",
        "",
        md_table(
            ["budget", "active params", "stage 1 only loss", "two stages loss", "gain"]
            + ["stage 1 only accuracy", "two stages accuracy"],
            rows,
        ),
        "",
        verdict + ".",
    ]
    return Section(title, "\n".join(body), headline=verdict, figures={"gain": gains})
