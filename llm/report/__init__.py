"""Status of a run and its self-contained HTML report."""

from llm.report.html import build_report, write_report
from llm.report.status import format_status, run_status

__all__ = ["build_report", "format_status", "run_status", "write_report"]
