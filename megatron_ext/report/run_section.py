"""The report's account of the pipeline run itself: each stage's wall time and the load."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_ext.report.config import ReportConfig
from megatron_ext.report.markdown import Section, md_table, not_run


def read_stage_times(path: str | Path) -> list[tuple[float, float, str]] | None:
    """``(unix time, 1-minute load average, stage)`` per line of ``scripts/report.sh``'s
    ``stage_times.tsv`` (tab-separated, written as each stage starts); ``None`` when absent
    or unreadable, malformed lines skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    rows = []
    for line in lines:
        parts = line.split("\t", 2)
        try:
            rows.append((float(parts[0]), float(parts[1]), parts[2]))
        except (IndexError, ValueError):
            continue
    return rows


def run_section(cfg: ReportConfig, out_dir: Path) -> Section:
    """Wall time of every stage (from one start to the next) and the load when it began."""
    title = "This run: wall time and load"
    rows = read_stage_times(cfg.stage_times) if cfg.stage_times else None
    if not rows or len(rows) < 2:
        reason = f"`{cfg.stage_times}` holds no stage times" if cfg.stage_times else "no file"
        return not_run(title, [reason], ["scripts/report.sh"])
    table = [
        [stage, end - start, load] for (start, load, stage), (end, _, _) in zip(rows, rows[1:])
    ]
    total = rows[-1][0] - rows[0][0]
    loads = [load for _, load, _ in rows]
    cores = os.cpu_count()
    body = [
        f"From `{cfg.stage_times}`: each stage's wall time, until the next began (the last "
        "line is the report itself), and the machine's 1-minute load average as it began "
        f"({cores} logical cores here; a load above the core count means other jobs shared "
        "them and every time above is inflated).",
        "",
        md_table(["stage", "wall s", "load at start"], table),
        "",
        f"Total before the report: **{total / 60:.1f} min**, load {min(loads):.2f} to "
        f"{max(loads):.2f}.",
    ]
    return Section(
        title,
        "\n".join(body),
        headline=f"{total / 60:.1f} min, load {min(loads):.1f}-{max(loads):.1f}",
        figures={"total_s": total, "load_min": min(loads), "load_max": max(loads)},
    )
