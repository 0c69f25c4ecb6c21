"""The data stage's summary names every file that failed to read, with its error, next to the counts."""

from __future__ import annotations

from llm.data.report import MAX_LISTED, summary


def metrics(read_errors: list[dict[str, str]]) -> dict:
    return {"documents_in": 10, "documents_kept_after_filters": 8, "documents_out": 7,
            "dropped": {"read_error": len(read_errors), "too_short": 2}, "read_errors": read_errors,
            "pii_redacted": {"email": 0}, "utf8_replacements": 0, "exact_duplicates": 1, "fuzzy_duplicates": 0,
            "fuzzy_clusters": 0, "tokens_train": 100, "tokens_val": 10, "sequences_train": 6, "sequences_val": 1,
            "seq_len": 16, "remainder_tokens_dropped": 14, "bytes_per_token": 3.5, "vocab_size": 320, "shards": 2,
            "sft": {}, "wall_seconds": 1.0}


def test_summary_lists_each_unreadable_file_with_its_error():
    errors = [{"file": "corpus/b.txt.gz", "error": "truncated gzip stream (Compressed file ended before the "
                                                   "end-of-stream marker was reached)"},
              {"file": "corpus/c.parquet", "error": "no column 'text' (columns: body)"}]
    lines = summary(metrics(errors), "runs/r/data").splitlines()
    at = lines.index("  unreadable files               2")
    assert lines[at + 1:at + 3] == [
        "    corpus/b.txt.gz: truncated gzip stream (Compressed file ended before the end-of-stream marker was "
        "reached)",
        "    corpus/c.parquet: no column 'text' (columns: body)"]
    assert "    dropped read_error              2" in lines  # the count stays


def test_summary_stays_on_one_screen_with_many_failures():
    errors = [{"file": f"corpus/{i:03d}.txt.gz", "error": "not a gzip file"} for i in range(MAX_LISTED + 5)]
    lines = summary(metrics(errors), "runs/r/data").splitlines()
    listed = [line for line in lines if line.endswith(": not a gzip file")]
    assert listed == [f"    corpus/{i:03d}.txt.gz: not a gzip file" for i in range(MAX_LISTED)]
    assert "    ... and 5 more, all named in runs/r/data/stats.json" in lines


def test_summary_without_failures_has_no_unreadable_line():
    assert "unreadable" not in summary(metrics([]), "runs/r/data")


def test_summary_counts_normalized_documents_and_names_first_drops():
    m = {**metrics([]), "documents_normalized": 4, "dropped_first": {"too_short": "corpus/a.jsonl:7"},
         "sft": {"train": 3, "val": 1, "dropped_template_error": 2},
         "sft_dropped": [{"record": "chat.jsonl:5", "reason": "template_error", "detail": "TemplateError: x"},
                         {"record": "chat.jsonl:9", "reason": "template_error", "detail": "TemplateError: x"}]}
    lines = summary(m, "runs/r/data").splitlines()
    assert lines[2] == "  normalized                     4 changed"
    assert "    dropped too_short               2  (first: corpus/a.jsonl:7)" in lines
    assert "    sft dropped template_error        2  (first: chat.jsonl:5)" in lines
    assert "normalized" not in summary(metrics([]), "runs/r/data")  # stats of older runs
