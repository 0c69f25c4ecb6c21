"""`metrics.jsonl` is rewritten on resume by a temp file and a rename (issue 20, part 3): a reader that
opened it before sees the whole old file, never a truncated one, and no temp file is left behind."""

from __future__ import annotations

import json
from pathlib import Path

from llm.train.metrics import MetricsLog, read_records


def test_resume_rewrites_metrics_by_rename(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    old = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo'
    path.write_text(old)
    with path.open() as reader:  # e.g. the upload of the folder to a bucket, or `llmray report`
        log = MetricsLog(tmp_path, max_steps=10, log_every=5, resumed_step=3)
        assert reader.read() == old  # the file it opened was replaced, not truncated under it
    log.close()
    assert [r["step"] for r in read_records(path)] == [1, 2, 3]
    assert path.read_text().endswith("\n")  # the torn last line is gone, so appends start a clean line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
