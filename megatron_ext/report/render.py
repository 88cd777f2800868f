"""Gather every section into one Markdown report with its PNGs beside it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_ext.report.comparison_sections import (
    nested_section,
    second_corpus_section,
    stage2_section,
    width_depth_section,
)
from megatron_ext.report.config import ReportConfig
from megatron_ext.report.generation_sections import budget_control_section, throughput_section
from megatron_ext.report.markdown import PIPELINE_SCRIPT, Section, md_table
from megatron_ext.report.model_sections import (
    checkpoint_section,
    loss_section,
    quantization_section,
)
from megatron_ext.report.run_section import run_section
from megatron_ext.run_format import SUMMARY

REPORT_FILE = "REPORT.md"

SECTIONS: tuple[Callable[[ReportConfig, Path], Section], ...] = (
    loss_section,
    nested_section,
    stage2_section,
    width_depth_section,
    quantization_section,
    budget_control_section,
    second_corpus_section,
    run_section,
    checkpoint_section,
    throughput_section,
)
"""The report's sections, in order."""


def report_path(cfg: ReportConfig, run_dir: str | Path) -> Path:
    """Where the Markdown goes: ``report.out``, else ``<run_dir>/REPORT.md``."""
    return Path(cfg.out) if cfg.out else Path(run_dir) / REPORT_FILE


def _inputs(cfg: ReportConfig) -> str:
    dirs = {
        "arithmetic parent": cfg.parent,
        "elastic (train-elastic)": cfg.elastic,
        "slices (slice)": cfg.slices,
        "generate on the elastic checkpoint": cfg.generate_elastic,
        "generate on the slices": cfg.generate_slices,
        "nested vs standalone, width vs depth (bench/report_comparisons.py)": cfg.comparisons,
        "elastic without stage 2": cfg.elastic_stage1_only,
        "generate on it": cfg.generate_stage1_only,
        **{f"qad ({Path(d).name})": d for d in cfg.qad},
    }
    rows = [[name, f"`{d}`", (Path(d) / SUMMARY).is_file()] for name, d in dirs.items()]
    return md_table(["stage", "run directory", SUMMARY], rows)


def build_report(cfg: ReportConfig, out_path: str | Path) -> list[Section]:
    """Render every section from ``cfg``'s run directories into ``out_path`` (Markdown).

    The PNGs are written beside ``out_path``; a section whose inputs are missing says what
    to run instead. Returns the sections, in order.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sections = [make(cfg, out_path.parent) for make in SECTIONS]
    contents = [
        f"- [{s.title}](#{_anchor(s.title)})" + ("" if s.ran else " (not run)") for s in sections
    ]
    text = [
        f"# {cfg.title}",
        "",
        f"Regenerate with `star-elastic report` (after `{PIPELINE_SCRIPT}` for the whole "
        "pipeline). Every figure below is read from the runs' `summary.json` files.",
        "",
        _inputs(cfg),
        "",
        *contents,
        "",
        *(s.markdown() for s in sections),
    ]
    tmp = out_path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(text).rstrip() + "\n")
    tmp.replace(out_path)
    return sections


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, spaces to dashes, punctuation dropped."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def report_summary(sections: list[Section], out_path: Path) -> dict[str, Any]:
    """What ``summary.json`` of a report run holds: the file, and each section's figures."""
    return {
        "report": str(out_path),
        "sections": {
            s.title: {
                "ran": s.ran,
                "headline": s.headline,
                "images": s.images,
                "figures": s.figures,
            }
            for s in sections
        },
    }
