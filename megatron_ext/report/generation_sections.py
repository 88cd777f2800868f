"""Report sections about generation: the budget-control pairs, slice throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_ext.report.config import ReportConfig
from megatron_ext.report.inputs import Missing, budget_throughput, read_summary, timing_noise
from megatron_ext.report.markdown import Section, md_table, not_run
from megatron_ext.report.plots import plot_budget_control, plot_frontier, plot_throughput

CONTROL_PNG = "budget_control.png"
FRONTIER_PNG = "budget_frontier.png"
THROUGHPUT_PNG = "slice_throughput.png"
SLICES = "slices"


def elastic_label(cfg: ReportConfig) -> str:
    """``elastic (<compute mode>)`` of the elastic generate run (masked when not recorded)."""
    summary = read_summary(cfg.generate_elastic)
    mode = "masked" if isinstance(summary, Missing) else summary.get("compute", "masked")
    return f"elastic ({mode})"


def _sources(cfg: ReportConfig) -> dict[str, Path]:
    return {elastic_label(cfg): Path(cfg.generate_elastic), SLICES: Path(cfg.generate_slices)}


def generate_command(cfg: ReportConfig, label: str) -> str:
    """The command that makes the generate run of source ``label``."""
    elastic = label.startswith("elastic")
    source = cfg.elastic if elastic else cfg.slices
    kind = "elastic" if elastic else "slices"
    run_dir = cfg.generate_elastic if elastic else cfg.generate_slices
    compute = " elastic.compute=narrow" if elastic else ""
    return (
        f"star-elastic generate data=arithmetic generation=arithmetic source.dir={source} "
        f"source.kind={kind} run.dir={run_dir}{compute}"
    )


def budget_sizes(cfg: ReportConfig) -> dict[str, int]:
    """Active parameters per budget name: from the elastic run, else from the slice run."""
    for directory, key in ((cfg.elastic, "active_params"), (cfg.slices, "params_active")):
        summary = read_summary(directory)
        if isinstance(summary, Missing):
            continue
        sizes = {n: int(f[key]) for n, f in (summary.get("budgets") or {}).items() if key in f}
        if sizes:
            return sizes
    return {}


def budget_names(pairs: list[str], sizes: dict[str, int] | None = None) -> list[str]:
    """The budgets of ``pairs``, smallest first: by ``sizes`` (active parameters) when they
    cover every name, else ``small, large`` from the first pair (generate lists its configured
    ``small->large`` pair first) and the others as found."""
    names = list(dict.fromkeys(b for p in pairs for b in p.split("->")))
    if sizes and all(n in sizes for n in names):
        return sorted(names, key=sizes.__getitem__)
    if not pairs:
        return []
    small, _, large = pairs[0].partition("->")
    middle = [n for n in names if n not in (small, large)]
    return list(dict.fromkeys([small, *middle, large]))


def pair_order(pairs: list[str], sizes: dict[str, int] | None = None) -> list[str]:
    """Every ``think->answer`` pair, think budget smallest first, then answer smallest first
    (``S->S, S->L, L->S, L->L`` for two; nine for three budgets). Others follow as found."""
    names = budget_names(pairs, sizes)
    grid = [f"{a}->{b}" for a in names for b in names]
    return [p for p in grid if p in pairs] + [p for p in pairs if p not in grid]


def with_timing_rounds(pairs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pairs with ``latency_s`` and both tokens/s taken from their interleaved timing
    rounds (the median) when the generate run had them; the scored pass's latency stays as
    ``latency_s_scored``. Pairs without rounds are returned as they are."""
    out = {}
    for name, p in pairs.items():
        timing = p.get("timing") or {}
        if timing.get("latency_median_s") is None:
            out[name] = p
            continue
        q = dict(p, latency_s_scored=p.get("latency_s"), latency_s=timing["latency_median_s"])
        q["think"] = dict(p.get("think") or {}, decode_tokens_per_s=timing["think_tokens_per_s"])
        q["answer"] = dict(p.get("answer") or {}, decode_tokens_per_s=timing["answer_tokens_per_s"])
        out[name] = q
    return out


def _latency_cell(p: dict[str, Any]) -> Any:
    timing = p.get("timing") or {}
    if timing.get("latency_median_s") is None:
        return p.get("latency_s")
    return (
        f"{timing['latency_median_s']:.4f} ({timing['latency_min_s']:.4f}–"
        f"{timing['latency_max_s']:.4f})"
    )


def _pair_row(name: str, p: dict[str, Any]) -> list[Any]:
    n = max(int(p.get("think", {}).get("generations", 0) or 0), 1)
    correct = f"{p['correct']}/{p['total']}" if "correct" in p else None
    return [
        name.replace("->", " → "),
        p.get("accuracy"),
        correct,
        p.get("trace_accuracy"),
        p.get("accuracy_given_correct_trace"),
        _latency_cell(p),
        (p.get("think", {}).get("new_tokens") or 0) / n,
        p.get("think", {}).get("decode_tokens_per_s"),
        p.get("answer", {}).get("decode_tokens_per_s"),
        f"{p.get('think_closed', '-')}/{p.get('think_at_limit', '-')}",
    ]


HEADERS = [
    "think → answer",
    "accuracy",
    "correct",
    "trace exact",
    "accuracy if trace exact",
    "latency s/prompt (median, min–max over rounds)",
    "think tokens",
    "think tok/s",
    "answer tok/s",
    "closed/at K",
]


def _verdict(
    pairs: dict[str, dict[str, Any]], label: str, sizes: dict[str, int], noise: float | None
) -> str:
    """Every X→L against L→L (L the largest budget): latency (against the timing noise when
    known) and accuracy, and whether X→L is faster at no lower accuracy."""
    names = budget_names(list(pairs), sizes)
    if len(names) < 2:
        return ""
    big = names[-1]
    large = pairs.get(f"{big}->{big}")
    if large is None or large.get("latency_s") is None:
        return ""
    lines = []
    for think in names[:-1]:
        mixed = pairs.get(f"{think}->{big}")
        if mixed is None or mixed.get("latency_s") is None:
            continue
        lat_m, lat_l = mixed["latency_s"], large["latency_s"]
        acc_m, acc_l = mixed.get("accuracy"), large.get("accuracy")
        spreads = [(q.get("timing") or {}).get("latency_spread") for q in (mixed, large)]
        if all(x is not None for x in spreads):
            noise = max(spreads)  # type: ignore[type-var]
        faster = "faster" if lat_m < lat_l else "slower"
        change = abs(1 - lat_m / lat_l) if lat_l else 0.0
        text = f"{label}: {think}->{big} is {change:.0%} {faster} than {big}->{big}"
        if noise is not None and change <= noise:
            text += f" (within the timing noise of {noise:.0%})"
        if acc_m is not None and acc_l is not None:
            text += f" at accuracy {acc_m:.1%} vs {acc_l:.1%}"
            beats = lat_m < lat_l and acc_m >= acc_l and (noise is None or change > noise)
            text += f": it beats {big}->{big}" if beats else f": it does not beat {big}->{big}"
        lines.append(text + ". " + _why(think, big, mixed, large))
    return "\n".join(f"- {line}" for line in lines)


def _why(think: str, big: str, mixed: dict[str, Any], large: dict[str, Any]) -> str:
    """What the X->L against L->L figures come from: think speed and trace accuracy."""
    rate_m = (mixed.get("think") or {}).get("decode_tokens_per_s")
    rate_l = (large.get("think") or {}).get("decode_tokens_per_s")
    trace_m, trace_l = mixed.get("trace_accuracy"), large.get("trace_accuracy")
    parts = []
    if rate_m and rate_l:
        parts.append(f"{think} thinks at {rate_m:.0f} tok/s against {big}'s {rate_l:.0f}")
    if trace_m is not None and trace_l is not None:
        parts.append(
            f"writes the exact reference trace for {trace_m:.1%} of prompts against {trace_l:.1%}"
        )
    return ("Why: " + ", and ".join(parts) + ".") if parts else ""


def budget_control_section(cfg: ReportConfig, out_dir: Path) -> Section:
    """Accuracy and latency of the four think/answer pairs, per model source."""
    title = "Budget control: think at one budget, answer at another"
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    missing: list[Missing | str] = []
    body: list[str] = []
    sizes = budget_sizes(cfg)
    masked = read_summary(cfg.generate_elastic)
    narrow = not isinstance(masked, Missing) and masked.get("compute") == "narrow"
    # masked pairs all decode one full-width model: their spread is the timing noise
    noise = None if isinstance(masked, Missing) or narrow else timing_noise(masked)
    for label, directory in _sources(cfg).items():
        summary = read_summary(directory)
        if isinstance(summary, Missing):
            missing.append(summary)
            continue
        pairs = with_timing_rounds(summary.get("pairs") or {})
        tables[label] = pairs
        order = pair_order(list(pairs), sizes)
        body += [
            f"### {label}",
            "",
            f"`{directory}`: {summary.get('prompts', '?')} prompts from "
            f"`{summary.get('prompts_from', '?')}`, K = {summary.get('max_think_tokens', '?')} "
            "think tokens at most; latency is the mean per prompt of both phases (prefill + "
            "decode), batch 1"
            + (
                f", the median over {summary['timing_rounds']} interleaved timing rounds of "
                f"{summary.get('timing_prompts')} prompts each (min–max in brackets; tokens/s "
                "are the rounds' medians)"
                if summary.get("timing_rounds")
                else ", one timed pass"
            )
            + ". *Accuracy* is the exact match of the answer; *trace exact* the "
            "share of think phases that wrote the reference trace exactly, and *accuracy if "
            "trace exact* how often the answer budget then reads it right.",
            "",
            md_table(HEADERS, [_pair_row(name, pairs[name]) for name in order]),
            "",
        ]
        if not summary.get("scored"):
            body += ["The prompts had no reference answers: accuracy not measured.", ""]
        verdict = _verdict(pairs, label, sizes, noise)
        body += [verdict, ""] if verdict else []
    if not tables:
        return not_run(title, missing, [generate_command(cfg, s) for s in _sources(cfg)])
    if narrow:
        body += [
            "Narrow elastic compute runs each budget on its active components only, and a "
            "budget with fewer layers (the depth axis) does not run the skipped layers nor "
            "allocate their caches: a small budget is cheaper on the elastic checkpoint as on "
            "its slice. The frontier plot shows accuracy against latency for every pair; the "
            "line joins the pairs no other pair beats on both.",
        ]
    else:
        body += [
            "Masked elastic compute runs every budget at full width (a mask zeroes the inactive "
            "channels), so on the elastic source a small budget is not cheaper: its latencies "
            "differ by the number of tokens generated, not by the width. Slices run at their "
            "own width, so only the slices show what a small think budget saves.",
        ]
    rounds = any(
        (p.get("timing") or {}).get("latency_median_s") is not None
        for t in tables.values()
        for p in t.values()
    )
    if rounds:
        body += [
            "",
            "Timing noise: each pair was timed again in interleaved rounds (every round runs "
            "every pair once, in a rotated order, so a slow spell of the shared CPU falls on "
            "all pairs alike); a latency difference counts only when it exceeds the larger "
            "relative spread (max − min) / median of the two pairs compared.",
        ]
    elif narrow:
        body += [
            "",
            "No timing-noise estimate: in narrow compute the elastic pairs do not decode one "
            "model, so their spread is no noise floor; each latency is one timed pass, and "
            "differences of a few tens of percent may come from other jobs on the CPU.",
        ]
    if noise is not None:
        body += [
            "",
            f"Timing noise: the masked pairs all decode the same full-width model, yet their "
            f"decode speeds spread by {noise:.0%}; latency differences below that are noise "
            "(other jobs shared the CPU).",
        ]
    if missing:
        body += ["", "Not run: " + "; ".join(str(m) for m in missing) + "."]
    all_pairs = pair_order(list(dict.fromkeys(p for t in tables.values() for p in t)), sizes)
    plot_budget_control(tables, all_pairs, out_dir / CONTROL_PNG)
    plot_frontier(tables, out_dir / FRONTIER_PNG)
    label, first = next(reversed(tables.items()))  # the slices when both ran
    headline = f"{label}: " + ", ".join(_brief(p, first[p]) for p in pair_order(list(first), sizes))
    figures = {
        label: {
            p: {k: v.get(k) for k in ("accuracy", "correct", "total", "latency_s")}
            for p, v in t.items()
        }
        for label, t in tables.items()
    }
    return Section(
        title, "\n".join(body), [CONTROL_PNG, FRONTIER_PNG], headline=headline, figures=figures
    )


def _brief(name: str, pair: dict[str, Any]) -> str:
    accuracy = pair.get("accuracy")
    if accuracy is not None:
        return f"{name} {accuracy:.0%} {pair.get('latency_s', 0.0):.2f}s"
    return f"{name} {pair.get('latency_s', 0.0):.2f}s"


def throughput_section(cfg: ReportConfig, out_dir: Path) -> Section:
    """Decode tokens/s of each standalone slice against the largest slice and the elastic
    checkpoint: masked (full width at every budget, the uncut model's speed) or narrow (each
    budget on its active components, which a slice should match)."""
    title = "Slice throughput vs full"
    slices = read_summary(cfg.generate_slices)
    if isinstance(slices, Missing):
        return not_run(title, [slices], [generate_command(cfg, SLICES)])
    sliced = budget_throughput(slices)
    elastic_summary = read_summary(cfg.generate_elastic)
    elastic = {} if isinstance(elastic_summary, Missing) else budget_throughput(elastic_summary)
    label = elastic_label(cfg)
    narrow = label == "elastic (narrow)"
    full_width = _mean([m["decode_tokens_per_s"] for m in elastic.values()])
    sizes = read_summary(cfg.slices)
    params = {} if isinstance(sizes, Missing) else sizes.get("budgets") or {}
    budgets = sorted(sliced, key=lambda b: -(params.get(b, {}).get("params_total") or 0))
    largest = sliced[budgets[0]]["decode_tokens_per_s"] if budgets else 0.0
    rows = []
    for b in budgets:
        rate = sliced[b]["decode_tokens_per_s"]
        other = elastic.get(b, {}).get("decode_tokens_per_s")
        if narrow:
            against = other / rate if other and rate else None  # elastic ÷ slice
        else:
            against = rate / full_width if full_width else None  # slice × full width
        rows.append(
            [
                b,
                params.get(b, {}).get("params_active"),
                rate,
                sliced[b]["prefill_tokens_per_s"],
                other,
                against,
                rate / largest if largest else None,
            ]
        )
    top = budgets[0] if budgets else "-"
    headers = [
        "budget",
        "active params",
        "slice decode tok/s",
        "slice prefill tok/s",
        f"{label} decode tok/s",
        "elastic ÷ slice" if narrow else "× full width",
        f"× slice {top}",
    ]
    if narrow:
        meaning = (
            "narrow: each budget runs its active components only and skips the layers it "
            "drops). *elastic ÷ slice* divides the elastic checkpoint's decode rate at a budget "
            "by its slice's: near 1 when narrow compute costs what the slice costs"
        )
    else:
        meaning = (
            "masked: full width at every budget). *× full width* divides by the masked "
            "elastic model's mean decode rate, the speed of the uncut model"
        )
    body = [
        f"Tokens/s of every phase run at a budget, pooled over the budget-control pairs of "
        f"`{cfg.generate_slices}` (standalone slices) and `{cfg.generate_elastic}` (the elastic "
        f"checkpoint, {meaning}. *× slice {top}* divides each slice's decode rate by the "
        f"largest slice's.",
        "",
        md_table(headers, rows),
    ]
    if not elastic:
        body += ["", f"Not run: {elastic_summary} (the elastic reference)."]
    series: dict[str, list[float | None]] = {
        "slice": [sliced[b]["decode_tokens_per_s"] for b in budgets]
    }
    if elastic:
        series[label] = [elastic.get(b, {}).get("decode_tokens_per_s") for b in budgets]
    plot_throughput(budgets, series, out_dir / THROUGHPUT_PNG)
    smallest = budgets[-1] if budgets else "-"
    if narrow or not (rows and rows[-1][5]):
        speedup = rows[-1][6] if rows else None
        headline = f"{smallest}: {speedup:.2f}x slice {top}" if speedup else "measured"
    else:
        headline = f"{smallest}: {rows[-1][5]:.2f}x full width"
    key = label.replace("elastic (", "elastic_").rstrip(")")
    return Section(
        title,
        "\n".join(body),
        [THROUGHPUT_PNG],
        headline=headline,
        figures={"slices": sliced, key: elastic},
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
