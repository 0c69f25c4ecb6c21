"""`llmray status` on fresh, partial, done and stale runs; the report from a run with stages missing."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from llm import storage
from llm.config import LoadedConfig, PipelineConfig
from llm.report import build_report, format_status, run_status, write_report
from llm.stage import execute
from llm.stages import by_name
from llm.train import checkpoint as ckpt
from tests.conftest import tiny_config

DATA, PRETRAIN = by_name("data"), by_name("pretrain")


def states(loaded: LoadedConfig) -> dict[str, str]:
    return {r.stage: r.state for r in run_status(loaded.llm)}


def _pretrain_body(folder: storage.Folder) -> dict:
    records = [{"step": s, "loss": 6.0 - s / 2, "lr": 1e-3 * s, "tokens": 100 * s, "tokens_per_s": 1e3,
                "mfu": 0.1, **({"val_loss": 5.5 - s / 4, "val_ppl": 2.0} if s % 2 == 0 else {})} for s in (1, 2, 3, 4)]
    (folder.local / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"val_ppl": 7.5, "final_loss": 4.0}


def _data_body(folder: storage.Folder) -> dict:
    stats = {"documents_in": 100, "dropped": {"too_short": 10, "language": 5}, "exact_duplicates": 3,
             "fuzzy_duplicates": 2, "documents_out": 80, "tokens_train": 5000, "tokens_val": 100,
             "read_errors": [{"file": "a.gz", "error": "truncated gzip stream"}]}
    (folder.local / "stats.json").write_text(json.dumps(stats))
    return {"documents_out": 80}


def test_status_fresh_partial_done_stale(tmp_path: Path) -> None:
    loaded = tiny_config(tmp_path)
    assert states(loaded) == {"data": "not started", "pretrain": "not started", "sweep": "not started",
                              "finetune": "not started", "compress": "not started", "serve": "not started"}
    execute(loaded.llm, DATA, _data_body)
    # An interrupted pretrain: a whole checkpoint at step 3 in its Ray Train attempt folder.
    part = Path(loaded.llm.stage_dir("pretrain")) / "ray" / "attempt-1" / "checkpoint_x"
    part.mkdir(parents=True)
    (part / "loop_state.json").write_text(json.dumps({"step": 3, "world_size": 1}))
    ckpt.commit_part(part, 0)
    rows = {r.stage: r for r in run_status(loaded.llm)}
    assert rows["data"].state == "done" and "documents_out 80" in rows["data"].detail
    assert rows["pretrain"].state == "partial" and rows["pretrain"].detail == "resumable from step 3"
    execute(loaded.llm, PRETRAIN, _pretrain_body, inputs=("data",))
    assert states(loaded)["pretrain"] == "done"
    stale = tiny_config(tmp_path, "pretrain.lr.peak=1e-4")
    rows = {r.stage: r for r in run_status(stale.llm)}
    assert rows["data"].state == "done" and rows["pretrain"].state == "stale"
    assert "pretrain.lr.peak" in rows["pretrain"].detail
    # A rerun of data makes pretrain's input stale even with the same pretrain config.
    execute(loaded.llm, DATA, _data_body, force=True)
    rows = {r.stage: r for r in run_status(loaded.llm)}
    assert rows["pretrain"].state == "stale" and "input data" in rows["pretrain"].detail
    text = format_status(run_status(loaded.llm))
    assert "disabled" in text and "stale" in text


def test_status_partial_sweep_and_compress_name_what_a_rerun_keeps(tmp_path: Path) -> None:
    loaded = tiny_config(tmp_path)
    sweep = Path(loaded.llm.stage_dir("sweep"))
    for trial in ("a1", "b2"):  # each trial writes trial.json first; files deeper in it are not trials
        (sweep / "trials" / trial / "train").mkdir(parents=True)
        (sweep / "trials" / trial / "trial.json").write_text("{}")
        (sweep / "trials" / trial / "train" / "trial.json").write_text("{}")
    compress = Path(loaded.llm.stage_dir("compress"))
    for done in ("int8", "pruned", "_work/pruned-distilled-int8"):
        (compress / done).mkdir(parents=True)
        (compress / done / ".done").write_text("")
    (compress / "pruned-distilled").mkdir()  # half-built: no .done
    rows = {r.stage: r for r in run_status(loaded.llm)}
    assert rows["sweep"].state == "partial"
    assert rows["sweep"].detail == "2 trials started; Tune saved no experiment yet, a rerun starts the sweep over"
    (sweep / "tune").mkdir()
    (sweep / "tune" / "tuner.pkl").write_bytes(b"")
    rows = {r.stage: r for r in run_status(loaded.llm)}
    assert rows["sweep"].detail == "2 trials started; a rerun continues the sweep (ended trials are kept)"
    assert rows["compress"].state == "partial"
    assert rows["compress"].detail == "variants done: int8, pruned; a rerun keeps them"
    for done in ("int8", "pruned"):
        (compress / done / ".done").unlink()
    rows = {r.stage: r for r in run_status(loaded.llm)}
    assert rows["compress"].detail == "no variant done yet; a rerun builds every variant"


def test_report_with_stages_missing_embeds_decodable_images(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    loaded = tiny_config(tmp_path)
    execute(loaded.llm, DATA, _data_body)
    execute(loaded.llm, PRETRAIN, _pretrain_body, inputs=("data",))
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


def _sweep_body(cfg: PipelineConfig) -> Callable[[storage.Folder], dict]:
    from llm.tune.results import TrialRow, choose_best
    from llm.tune.stage import write_record

    def body(folder: storage.Folder) -> dict:
        rows = [TrialRow(trial_id=tid, kind="cosine", peak=peak, warmup_fraction=0.1, warmup_steps=6, floor=0.1,
                         weight_decay=None, micro_batch_size=None, steps=steps, final_val_loss=loss,
                         best_val_loss=loss, stopped_early=steps < 60, wall_s=1.0,
                         status="finished" if steps == 60 else "stopped",
                         curve=[(s, loss + (60 - s) / 100) for s in range(10, steps + 1, 10)])
                for tid, peak, steps, loss in (("aaa01", 1e-3, 60, 4.2), ("bbb02", 3e-3, 60, 3.9),
                                               ("ccc03", 1e-2, 20, 5.5))]
        best = choose_best(rows)
        assert best is not None
        write_record(folder, rows, best, cfg.sweep)  # trials.csv, best.json, curves.png as the stage writes them
        return {"trials": 3, "best_trial": best.trial_id, "best_val_loss": best.final_val_loss}
    return body


def _finetune_body(folder: storage.Folder) -> dict:
    _pretrain_body(folder)
    rows = [{"model": "base", "params": 1000, "sft_loss": 3.0, "sft_ppl": 20.1, "rouge_l": 0.1, "bleu": 2.0},
            {"model": "finetuned", "params": 1000, "sft_loss": 2.0, "sft_ppl": 7.4, "rouge_l": 0.3, "bleu": 9.0}]
    (folder.local / "eval.json").write_text(json.dumps(rows))
    return {"final_loss": 4.0}


def _compress_body(folder: storage.Folder) -> dict:
    from llm.compress.choose import write_chosen
    from llm.compress.compare import write_eval

    rows = [{"model": name, "params": params, "disk_mb": mb, "val_loss": loss, "val_ppl": round(2.718 ** loss, 2),
             "sft_ppl": 7.5, "rouge_l": 0.3}
            for name, params, mb, loss in (("original", 1000, 4.0, 2.30), ("int8", 1000, 1.1, 2.31),
                                           ("pruned", 600, 2.4, 2.45))]
    write_eval(folder.local, rows)
    write_chosen(folder.local, {"variant": "int8", "reason": "smallest disk (disk_mb 1.1) of 1 passing variant(s)",
                                "rule": {}, "checks": {}}, folder.local.parent / "finetune" / "model")
    return {"chosen": "int8"}


def _whole_run(tmp_path: Path) -> LoadedConfig:
    """Committed data, sweep, pretrain (with the sweep's schedule), finetune and compress folders, each
    committed as its stage commits it: the sweep hashes its trials' config, pretrain the winner's schedule."""
    from llm.train.best_lr import apply_best
    from llm.tune.stage import trial_config

    loaded = tiny_config(tmp_path, "sweep.enabled=true", "pretrain.lr=best")
    cfg = loaded.llm
    execute(cfg, DATA, _data_body)
    tcfg = trial_config(cfg)
    execute(tcfg, by_name("sweep"), _sweep_body(tcfg), inputs=("data",))
    execute(apply_best(cfg, "pretrain")[0], PRETRAIN, _pretrain_body, inputs=("data", "sweep"))
    execute(cfg, by_name("finetune"), _finetune_body, inputs=("data", "pretrain"))
    execute(cfg, by_name("compress"), _compress_body, inputs=("data", "finetune"))
    return loaded


def test_report_of_a_whole_run_embeds_every_stage_and_marks_the_winners(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    loaded = _whole_run(tmp_path)
    # Neither the sweep (hashed as its trials run) nor `pretrain.lr=best` (hashed as the winner) is stale.
    assert states(loaded) == {"data": "done", "sweep": "done", "pretrain": "done", "finetune": "done",
                              "compress": "done", "serve": "not started"}
    page = build_report(loaded)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    # data funnel; sweep curves; pretrain curves; finetune curves and eval; compress size/ppl and variants
    assert len(images) == 7
    for b64 in images:
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(b64)), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    for stage in ("data", "sweep", "pretrain", "finetune", "compress"):
        assert f"{stage} has not run" not in page
    assert "serve has not run" in page
    marked = [row for row in re.findall(r"<tr>(.*?)</tr>", page) if "&lt;- best" in row]
    assert len(marked) == 1 and "<td>bbb02</td>" in marked[0]  # the lowest final val loss among finished
    assert "chosen: <b>int8</b>" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser installed (.ci/run installs chromium)")
def test_report_opens_in_a_headless_browser(tmp_path: Path) -> None:
    """A real browser at 1280 px: every image decodes, the page does not scroll sideways (wide tables scroll
    in their own box), the route overview comes first, and the page asks the network for nothing."""
    import subprocess

    page = write_report(_whole_run(tmp_path)).read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page)
    # On load (after every image decoded or failed), write what the browser saw into the DOM it dumps; the
    # virtual time budget keeps it from dumping before the script ran.
    probe = ('<script>addEventListener("load", () => { const out = document.createElement("pre"); out.id = "probe";'
             ' out.textContent = JSON.stringify({widths: Array.from(document.images, i => i.naturalWidth),'
             ' scroll: document.documentElement.scrollWidth, view: window.innerWidth,'
             ' requests: performance.getEntriesByType("resource").map(e => e.name),'
             ' first: document.querySelector("h1").nextElementSibling.className});'
             " document.body.append(out); });</script>")
    check = tmp_path / "check.html"
    check.write_text(page.replace("</body>", probe + "</body>"))
    dom = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                          "--virtual-time-budget=10000", "--dump-dom", check.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="probe">([^<]*)</pre>', dom)
    assert found is not None, dom[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    assert len(seen["widths"]) == page.count("<img ") == 7 and all(w > 0 for w in seen["widths"]), seen
    assert seen["view"] == 1280 and seen["scroll"] <= seen["view"], seen  # no horizontal page scroll
    assert seen["requests"] == [] and seen["first"] == "route", seen


def test_tables_use_human_names_and_drop_empty_columns() -> None:
    from llm.report.tables import table

    rows = [{"model": "original", "weights_mb": 1.5, "peak_mem_mb": 0.0, "base_sft_loss": 2.0},
            {"model": "int8", "weights_mb": 0.5, "peak_mem_mb": 0.0, "base_sft_loss": None}]
    out = table(rows)
    assert "in memory (MiB)" in out and "base chat loss" in out and "weights_mb" not in out
    assert "peak" not in out  # 0.0 for every model says nothing
    assert out.startswith('<div class="scroll">')


def test_status_and_report_show_an_unreadable_manifest_instead_of_stopping(tmp_path: Path) -> None:
    from llm.report.status import run_status

    loaded = _whole_run(tmp_path)
    manifest = Path(loaded.llm.stage_dir("pretrain")) / "_MANIFEST.json"
    manifest.write_text("{not json")
    states = {r.stage: r for r in run_status(loaded.llm)}
    assert states["pretrain"].state == "unreadable" and "not valid JSON" in states["pretrain"].detail
    page = build_report(loaded)
    assert "unreadable" in page and "pretrain has not run" in page
