"""The report's first screen: the route as a row of stage boxes, each with its state, time and key number."""

from __future__ import annotations

import html

from llm.config import PipelineConfig
from llm.manifest import read_manifest
from llm.report.status import StageStatus, key_metric, run_status
from llm.report.tables import label

_COLORS = {"done": "#2e7d32", "stale": "#ef6c00", "partial": "#1565c0", "not started": "#9e9e9e",
           "unreadable": "#c62828", "disabled": "#bdbdbd"}


def _box(row: StageStatus, cfg: PipelineConfig) -> str:
    state = row.state if row.enabled or row.state != "not started" else "disabled"
    manifest = read_manifest(cfg.stage_dir(row.stage)) if row.state == "done" else None
    seconds = manifest.metrics.get("seconds") if manifest else None
    key = key_metric(manifest.metrics, label) if manifest else ""
    when = f"{seconds:,.0f} s" if isinstance(seconds, int | float) else ""
    return (f'<div class="stage" style="border-color:{_COLORS[state]}"><b>{html.escape(row.stage)}</b>'
            f'<span style="color:{_COLORS[state]}">{html.escape(state)}</span>'
            f"<span>{html.escape(when)}</span><span>{html.escape(key)}</span></div>")


def overview(cfg: PipelineConfig) -> str:
    """The route, left to right, one box per stage."""
    boxes = [_box(row, cfg) for row in run_status(cfg)]
    return '<div class="route">' + '<span class="arrow">&rarr;</span>'.join(boxes) + "</div>"


STYLE = (".route{display:flex;flex-wrap:wrap;align-items:center;gap:4px;margin:1em 0}"
         ".stage{border:2px solid;border-radius:6px;padding:6px 10px;min-width:110px;display:flex;"
         "flex-direction:column;font-size:13px}.arrow{font-size:20px;color:#777}")
