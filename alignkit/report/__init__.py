"""Run reports: a markdown table per stage and PNG plots, built from each stage's `metrics.jsonl`."""

from __future__ import annotations

from alignkit.report.report import (
    StageSummary,
    build_report,
    read_metrics,
    report_figures,
    summarize_stage,
    try_it_commands,
)

__all__ = ["StageSummary", "build_report", "read_metrics", "report_figures", "summarize_stage", "try_it_commands"]
