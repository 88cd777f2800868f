"""Markdown pieces of the report: a section, a table, and the note for a stage not run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_ext.report.inputs import Missing

PIPELINE_SCRIPT = "scripts/report.sh"


@dataclass
class Section:
    """One part of the report: Markdown text, the PNGs it shows, and its headline figures."""

    title: str
    body: str
    images: list[str] = field(default_factory=list)  # file names beside the report
    ran: bool = True
    headline: str = ""  # one line for the recipe's printed table
    figures: dict[str, Any] = field(default_factory=dict)  # for the report's summary.json

    def markdown(self) -> str:
        """The section as Markdown: heading, text, then its images."""
        parts = [f"## {self.title}", "", self.body.rstrip(), ""]
        parts += [f"![{self.title}]({name})\n" for name in self.images]
        return "\n".join(parts)


def cell(value: Any) -> str:
    """A table cell: ints with separators, floats to 4 significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numeric columns right-aligned."""

    def numeric(i: int) -> bool:
        values = [r[i] for r in rows if r[i] is not None]
        return bool(values) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        )

    align = ["---:" if numeric(i) else ":---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def not_run(title: str, missing: Sequence[Missing | str], commands: Sequence[str]) -> Section:
    """The section for inputs that are absent: what is missing, and the commands that make it."""
    lines = ["**Not run.** This section needs inputs that are not there:", ""]
    lines += [f"- {m}" for m in missing]
    lines += ["", f"Run the whole pipeline with `{PIPELINE_SCRIPT}`, or the missing stages:", ""]
    lines += ["```sh", *commands, "```"]
    return Section(title, "\n".join(lines), ran=False)
