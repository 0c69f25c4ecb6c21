"""A cleaning unit names each file that failed to read, with its error, in its result: the driver gathers
them for the stats without reading any document."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq

from llm.config import DataConfig
from llm.data.clean import clean_unit
from llm.data.sources import resolve


def test_unit_result_names_unreadable_files_with_their_errors(tmp_path):
    words = "The quick brown fox jumps over the lazy dog near the quiet river bank. "
    (tmp_path / "a.txt").write_text(words * 5)
    blob = gzip.compress("".join(json.dumps({"text": f"{i} {words}"}) + "\n" for i in range(500)).encode())
    (tmp_path / "b.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "c.txt.gz").write_bytes(b"plain text, not gzip")
    files = resolve([str(tmp_path / "*.txt"), str(tmp_path / "*.gz")])
    cfg = DataConfig(min_chars=10)  # keep_dropped off: dropped texts are blanked, the errors must survive that
    out = clean_unit({"unit": [3], "files": [json.dumps([f.__dict__ for f in files])]}, cfg=cfg,
                     out_dir=str(tmp_path))
    assert json.loads(out["read_errors"][0]) == [
        {"file": str(tmp_path / "b.jsonl.gz"),
         "error": "truncated gzip stream (Compressed file ended before the end-of-stream marker was reached)"},
        {"file": str(tmp_path / "c.txt.gz"), "error": "not a gzip file (Not a gzipped file (b'pl'))"}]
    t = pq.read_table(out["path"][0], columns=["source", "reason", "text"]).to_pylist()
    assert sum(r["reason"] == "read_error" for r in t) == 2 and out["rows"] == [len(t)]
    assert all(r["text"] == "" for r in t if r["reason"])  # dropped rows keep no text, error messages included
    assert sum(r["source"].startswith(f"{tmp_path / 'b.jsonl.gz'}:") for r in t) > 100  # lines before the cut


def test_unit_without_failures_reports_none(tmp_path):
    (tmp_path / "a.txt").write_text("A short but readable document.")
    files = resolve([str(tmp_path / "a.txt")])
    out = clean_unit({"unit": [0], "files": [json.dumps([f.__dict__ for f in files])]}, cfg=DataConfig(min_chars=10),
                     out_dir=str(tmp_path))
    assert json.loads(out["read_errors"][0]) == [] and out["rows"] == [1]


def test_unit_counts_documents_normalization_changed_and_names_first_drops(tmp_path):
    words = "The quick brown fox jumps over the lazy dog near the quiet river bank. "
    lines = [{"text": (words * 3).strip()}, {"text": "    indented " + words * 3 + "\n\n\n"}, {"text": "tiny"},
             {"txt": "no field"}, {"text": "also tiny"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    files = resolve([str(tmp_path / "a.jsonl")])
    out = clean_unit({"unit": [0], "files": [json.dumps([f.__dict__ for f in files])]}, cfg=DataConfig(min_chars=10),
                     out_dir=str(tmp_path))
    counts = json.loads(out["counts"][0])
    assert counts["normalized"] == 1  # line 2 lost its trailing blank lines; its indentation stays
    assert counts["first"] == {"too_short": f"{tmp_path / 'a.jsonl'}:3", "missing_field": f"{tmp_path / 'a.jsonl'}:4"}
    kept = [r["text"] for r in pq.read_table(out["path"][0]).to_pylist() if not r["reason"]]
    assert kept[1].startswith("    indented The quick")
