"""`report.html`: one self-contained file (images embedded as data URIs, no network) of a run's figures.

Every section reads a stage's committed outputs; a stage that has not run says so instead of failing.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import yaml

from llm import storage
from llm.config import LoadedConfig
from llm.errors import StorageError
from llm.manifest import manifest_hash, read_manifest
from llm.report import plots
from llm.report.overview import STYLE as ROUTE_STYLE
from llm.report.overview import overview
from llm.report.status import run_status
from llm.report.tables import table
from llm.stage import committed_folder
from llm.stages import STAGES
from llm.train.metrics import read_records

Section = tuple[str, str]  # (title, html body)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _committed(loaded: LoadedConfig, stage: str) -> Path | None:
    """The committed folder; in an object store, a verified local copy of its small files (the figures'
    sources: stats, metrics, evaluations), never its checkpoints or weights."""
    uri = loaded.llm.stage_dir(stage)
    try:
        manifest = read_manifest(uri)
    except StorageError:  # the status table names the problem; the section says the stage has no output
        return None
    if manifest is None:
        return None
    small = {rel: meta for rel, meta in manifest.files.items() if meta["size"] < 64 << 20
             and (rel.endswith((".json", ".jsonl", ".csv")) or rel == "curves.png") and not rel.startswith("ray/")}
    return committed_folder(uri, replace(manifest, files=small)).fetch()


def _data(loaded: LoadedConfig) -> str | None:
    folder = _committed(loaded, "data")
    if folder is None or not (folder / "stats.json").exists():
        return None
    stats = json.loads((folder / "stats.json").read_text())
    errors = stats.get("read_errors") or []
    extra = table(errors) if errors else ""
    return _img(plots.data_funnel(stats), "data funnel") + extra


def _training(stage: str) -> Callable[[LoadedConfig], str | None]:
    def section(loaded: LoadedConfig) -> str | None:
        folder = _committed(loaded, stage)
        records = read_records(folder / "metrics.jsonl") if folder else []
        if not records:
            return None
        manifest = read_manifest(folder) if folder else None
        summary = [{k: v for k, v in (manifest.metrics if manifest else {}).items()
                    if not isinstance(v, dict | list)}]
        body = _img(plots.training_curves(records, stage), f"{stage} curves") + table(summary)
        evals = folder / "eval.json" if folder else None
        if evals is not None and evals.exists():  # fine-tuning: the base and the tuned model side by side
            rows = json.loads(evals.read_text())
            body += _img(plots.model_comparison(rows, f"{stage}: before and after"), f"{stage} eval") + table(rows)
        return body
    return section


def _sweep(loaded: LoadedConfig) -> str | None:
    folder = _committed(loaded, "sweep")
    if folder is None or not (folder / "trials.csv").exists():
        return None
    with (folder / "trials.csv").open() as f:
        trials = list(csv.DictReader(f))
    best = json.loads((folder / "best.json").read_text()) if (folder / "best.json").exists() else {}
    parts = []
    if (folder / "curves.png").exists():
        parts.append(_img((folder / "curves.png").read_bytes(), "sweep curves"))
    winner = str(best.get("trial_id", ""))
    for t in trials:
        t["best"] = "<- best" if str(t.get("trial_id", "")) == winner else ""
    parts.append(table(trials))
    return "".join(parts)


def _compress(loaded: LoadedConfig) -> str | None:
    folder = _committed(loaded, "compress")
    if folder is None or not (folder / "eval.json").exists():
        return None
    rows = json.loads((folder / "eval.json").read_text())
    rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    chosen = json.loads((folder / "chosen.json").read_text()) if (folder / "chosen.json").exists() else {}
    name = chosen.get("variant") or chosen.get("chosen")
    reason = f"<p>chosen: <b>{html.escape(str(name))}</b> ({html.escape(str(chosen.get('reason', '')))})</p>"
    return (reason + _img(plots.size_vs_ppl(rows, name), "size against perplexity")
            + _img(plots.model_comparison(rows, "compression: every variant against the original"), "variants")
            + table(rows))


def _serve(loaded: LoadedConfig) -> str | None:
    folder = _committed(loaded, "serve")
    if folder is None:
        return None
    manifest = read_manifest(folder)  # already read once by _committed: trusted here
    return table([{k: v for k, v in (manifest.metrics if manifest else {}).items() if not isinstance(v, dict | list)}])


SECTIONS: dict[str, Callable[[LoadedConfig], str | None]] = {
    "data": _data, "sweep": _sweep, "pretrain": _training("pretrain"), "finetune": _training("finetune"),
    "compress": _compress, "serve": _serve,
}


def build_report(loaded: LoadedConfig) -> str:
    """The report's HTML text."""
    cfg = loaded.llm
    status = [{"stage": r.stage, "state": r.state if r.enabled or r.state != "not started" else "disabled",
               "detail": r.detail, "folder": r.folder} for r in run_status(cfg)]
    parts = [f"<h1>llmray run {html.escape(cfg.run)}</h1>", overview(cfg), "<h2>status</h2>", table(status)]
    for stage in STAGES:
        body = SECTIONS[stage.name](loaded)
        parts.append(f"<h2>{stage.name}</h2>")
        parts.append(body if body is not None else
                     f"<p class=missing>{stage.name} has not run (no committed output).</p>")
    hashes = [{"stage": s.name, "manifest sha256": _hash(cfg.stage_dir(s.name))} for s in STAGES]
    hashes = [h for h in hashes if h["manifest sha256"] != "-"] or hashes
    parts += ["<h2>manifests</h2>", table(hashes), "<h2>config</h2>",
              f"<pre>{html.escape(yaml.safe_dump({'metadata': {'llm': cfg.model_dump(mode='json')}}, sort_keys=False))}"
              f"</pre>", f"<p>from {html.escape(str(loaded.path))}</p>"]
    # Fits a 1280-px window: the body is at most 1100 px, images shrink to it, wide tables scroll in their box.
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:"
             "collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;white-space:nowrap}th{background:"
             "#f3f3f3}img{max-width:100%;height:auto}.missing{color:#888}.scroll{overflow-x:auto;max-width:100%}"
             "pre{overflow-x:auto;max-height:30em;background:#fafafa;padding:6px}" + ROUTE_STYLE)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>llmray {html.escape(cfg.run)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def _hash(folder: str) -> str:
    try:
        return manifest_hash(folder) or "-"
    except StorageError:
        return "unreadable"


def write_report(loaded: LoadedConfig) -> Path | str:
    """Write `<storage>/<run>/report.html` atomically (a temp file renamed; one PUT in an object store);
    returns its path or URI."""
    run = storage.Folder(storage.join(loaded.llm.storage, loaded.llm.run))
    storage.write_text(run.path("report.html"), build_report(loaded))
    return Path(run.path("report.html")) if run.on_disk else run.path("report.html")
