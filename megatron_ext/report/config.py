"""The typed, validated inputs of ``star-elastic report`` (Hydra group ``report``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ext.models.config import require


@dataclass
class ReportConfig:
    """Which run directories the report reads, and where it writes.

    Each field names a run directory of one pipeline stage; the report reads the
    ``summary.json`` there (and, for ``elastic`` and ``slices``, the checkpoints' manifests).
    A directory that is missing, or holds no ``summary.json``, turns its section into a note
    that says what to run. ``qad`` lists ``star-elastic qad`` runs, one per format.

    ``out`` is the Markdown file; empty means ``<run.dir>/REPORT.md``. The PNGs go beside it.
    ``comparisons`` is ``bench/report_comparisons.py``'s output directory (nested vs
    standalone, width vs depth, the second corpus); ``elastic_stage1_only`` the elastic run
    without its second stage and ``generate_stage1_only`` a generate run on it.
    ``stage_times`` is ``scripts/report.sh``'s record of each stage's start and the load
    (empty: no such section).
    ``commands`` are shown in the "not run" notes: the pipeline's own command per stage.
    """

    parent: str = "runs/report/parent"
    elastic: str = "runs/report/elastic"
    slices: str = "runs/report/slices"
    generate_elastic: str = "runs/report/generate_elastic"
    generate_slices: str = "runs/report/generate_slices"
    comparisons: str = "runs/report/comparisons"
    elastic_stage1_only: str = "runs/report/elastic_stage1_only"
    generate_stage1_only: str = "runs/report/generate_stage1_only"
    stage_times: str = ""
    qad: list[str] = field(default_factory=lambda: ["runs/report/qad_fp8", "runs/report/qad_nvfp4"])
    out: str = ""
    title: str = "star-elastic report"
    commands: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("elastic", "slices", "generate_elastic", "generate_slices"):
            require(bool(getattr(self, name)), f"report.{name}", "must name a run directory")
        require(
            not self.out or self.out.endswith(".md"),
            "report.out",
            f"{self.out!r} must be a Markdown file (*.md), or empty for <run.dir>/REPORT.md",
        )
        require(len(set(self.qad)) == len(self.qad), "report.qad", "lists a directory twice")
