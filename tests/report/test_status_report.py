"""`llmray status` on fresh, partial, done and stale runs; the report from a run with stages missing."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest

from llm.report import build_report, format_status, run_status, write_report
from llm.stage import execute
from llm.train import checkpoint as ckpt
from tests.conftest import tiny_config


def states(loaded) -> dict[str, str]:  # noqa: ANN001
    return {r.stage: r.state for r in run_status(loaded.llm)}


def _pretrain_body(folder: Path) -> dict:
    records = [{"step": s, "loss": 6.0 - s / 2, "lr": 1e-3 * s, "tokens": 100 * s, "tokens_per_s": 1e3,
                "mfu": 0.1, **({"val_loss": 5.5 - s / 4, "val_ppl": 2.0} if s % 2 == 0 else {})} for s in (1, 2, 3, 4)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"val_ppl": 7.5, "final_loss": 4.0}


def _data_body(folder: Path) -> dict:
    stats = {"documents_in": 100, "dropped": {"too_short": 10, "language": 5}, "exact_duplicates": 3,
             "fuzzy_duplicates": 2, "documents_out": 80, "tokens_train": 5000, "tokens_val": 100,
             "read_errors": [{"file": "a.gz", "error": "truncated gzip stream"}]}
    (folder / "stats.json").write_text(json.dumps(stats))
    return {"documents_out": 80}


def test_status_fresh_partial_done_stale(tmp_path: Path) -> None:
    loaded = tiny_config(tmp_path)
    assert states(loaded) == {"data": "not started", "pretrain": "not started", "sweep": "not started",
                              "finetune": "not started", "compress": "not started", "serve": "not started"}
    execute(loaded.llm, "data", _data_body, sections=("data",))
    # An interrupted pretrain: a whole checkpoint at step 3 in its Ray Train attempt folder.
    part = Path(loaded.llm.stage_dir("pretrain")) / "ray" / "attempt-1" / "checkpoint_x"
    part.mkdir(parents=True)
    (part / "loop_state.json").write_text(json.dumps({"step": 3, "world_size": 1}))
    ckpt.commit_part(part, 0)
    rows = {r.stage: r for r in run_status(loaded.llm)}
    assert rows["data"].state == "done" and "documents_out 80" in rows["data"].detail
    assert rows["pretrain"].state == "partial" and rows["pretrain"].detail == "resumable from step 3"
    execute(loaded.llm, "pretrain", _pretrain_body, sections=("pretrain",), inputs=("data",), keep_partial=True)
    assert states(loaded)["pretrain"] == "done"
    stale = tiny_config(tmp_path, "pretrain.lr.peak=1e-4")
    rows = {r.stage: r for r in run_status(stale.llm)}
    assert rows["data"].state == "done" and rows["pretrain"].state == "stale"
    assert "pretrain.lr.peak" in rows["pretrain"].detail
    # A rerun of data makes pretrain's input stale even with the same pretrain config.
    execute(loaded.llm, "data", _data_body, sections=("data",), force=True)
    rows = {r.stage: r for r in run_status(loaded.llm)}
    assert rows["pretrain"].state == "stale" and "input data" in rows["pretrain"].detail
    text = format_status(run_status(loaded.llm))
    assert "disabled" in text and "stale" in text


def test_report_with_stages_missing_embeds_decodable_images(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    loaded = tiny_config(tmp_path)
    execute(loaded.llm, "data", _data_body, sections=("data",))
    execute(loaded.llm, "pretrain", _pretrain_body, sections=("pretrain",), inputs=("data",))
    page = build_report(loaded)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # data funnel, pretrain curves
    for b64 in images:
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(b64)), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    for missing in ("sweep", "finetune", "compress", "serve"):
        assert f"{missing} has not run" in page
    assert "data has not run" not in page and "pretrain has not run" not in page
    assert "a.gz" in page and "truncated gzip stream" in page  # read errors named
    assert "http://" not in page.replace("http://127.0.0.1", "")  # nothing fetched from a network
    out = write_report(loaded)
    assert out == Path(loaded.llm.storage) / loaded.llm.run / "report.html" and out.read_text() == page


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="no headless browser installed")
def test_report_opens_in_a_headless_browser(tmp_path: Path) -> None:
    import subprocess

    loaded = tiny_config(tmp_path)
    execute(loaded.llm, "data", _data_body, sections=("data",))
    out = write_report(loaded)
    dom = subprocess.run(["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "data funnel" in dom
