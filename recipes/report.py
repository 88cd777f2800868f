"""``star-elastic report``: one Markdown report with PNG plots from a pipeline's run directories."""

from __future__ import annotations

from omegaconf import DictConfig

from megatron_ext.config.compose import section
from megatron_ext.config.schema import RunConfig
from megatron_ext.report import format_table, write_summary
from megatron_ext.report.config import ReportConfig
from megatron_ext.report.render import build_report, report_path, report_summary
from megatron_ext.runtime import prepare_run_dir


def run(cfg: DictConfig) -> dict:
    """Render the report (missing inputs become "not run" sections); print one row per section."""
    report = section(cfg, "report", ReportConfig)
    run_cfg = section(cfg, "run", RunConfig)
    run_dir = prepare_run_dir(cfg, run_cfg.dir)
    out = report_path(report, run_dir)
    sections = build_report(report, out)
    summary = report_summary(sections, out)
    write_summary(run_dir, summary)
    rows = [
        [s.title, "ok" if s.ran else "not run", s.headline, " ".join(s.images)] for s in sections
    ]
    print(f"report: {out}")
    print(format_table(["section", "status", "headline", "plots"], rows))
    return summary
