"""Files outside the run are part of a stage's hash (issue 20, part 3): a corpus file, `finetune.base` or
`data.tokenizer.path` that changes makes its stage stale in `llmray status` and is rerun (kept aside), as a
changed key is. Cheap stage bodies through `execute`, no Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llm import storage
from llm.data.stage import STAGE as DATA_STAGE
from llm.report.status import stage_status
from llm.stage import Stage, StageResult, execute, hashed_config

from .conftest import tiny_config


def _unused(cfg: object, force: bool = False) -> StageResult:
    raise AssertionError("run through execute()")


DATA = Stage("data", "test data stage", _unused, sections=("data",))


def _body(folder: storage.Folder) -> dict:
    (folder.local / "out.txt").write_text("packed")
    return {}


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "one"}\n')
    (corpus / "b.jsonl").write_text('{"text": "two"}\n')
    (corpus / "notes.txt").write_text("not matched by the glob")
    return corpus


def _bump(path: Path, text: str) -> None:
    st = path.stat()
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_changed_corpus_file_makes_data_stale(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    cfg = tiny_config(tmp_path, f"data.sources=[{corpus}/*.jsonl]").llm
    first = execute(cfg, DATA, _body)
    assert stage_status(cfg, DATA_STAGE).state == "done"
    assert execute(cfg, DATA, _body).skipped

    (corpus / "notes.txt").write_text("a file the glob does not match changes nothing")
    assert stage_status(cfg, DATA_STAGE).state == "done"

    _bump(corpus / "b.jsonl", '{"text": "two, edited"}\n')
    row = stage_status(cfg, DATA_STAGE)
    assert row.state == "stale" and "data.files.sources" in row.detail, row
    again = execute(cfg, DATA, _body)
    assert not again.skipped and again.kept_aside and Path(again.kept_aside).exists()
    assert first.path == again.path


def test_a_new_corpus_file_and_a_removed_one_count(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    cfg = tiny_config(tmp_path, f"data.sources=[{corpus}/*.jsonl]").llm
    before = hashed_config(cfg, "data")["data"]["files"]
    (corpus / "c.jsonl").write_text('{"text": "three"}\n')
    added = hashed_config(cfg, "data")["data"]["files"]
    (corpus / "a.jsonl").unlink()
    removed = hashed_config(cfg, "data")["data"]["files"]
    assert len({str(before), str(added), str(removed)}) == 3
    assert added["sources"][f"{corpus}/*.jsonl"].startswith("3 files")


@pytest.mark.parametrize("section, key, name", [
    ("finetune", "base", ""), ("data", "tokenizer.path", ""), ("pretrain", "model.config_file", "config.json"),
    ("compress", "eval.lm_eval.include_path", ""), ("finetune", "eval.lm_eval.include_path", "")])
def test_model_tokenizer_config_and_task_paths_are_fingerprinted(tmp_path: Path, section: str, key: str,
                                                                  name: str) -> None:
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3"}')
    target = folder / name if name else folder
    cfg = tiny_config(tmp_path, f"{section}.{key}={target}").llm
    before = hashed_config(cfg, section)[section]["files"][key]
    _bump(folder / "config.json", '{"model_type": "qwen3", "changed": 1}')
    after = hashed_config(cfg, section)[section]["files"][key]
    assert before != after and before[str(target)].startswith("1 files")


def test_builtin_sources_and_unset_paths_add_nothing(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path).llm
    assert "files" not in hashed_config(cfg, "data", "pretrain")["data"]
    assert "files" not in hashed_config(cfg, "data", "pretrain")["pretrain"]


def test_object_store_globs_match_per_segment() -> None:
    assert storage._matches("/b/corpus/*.jsonl", "/b/corpus/a.jsonl")
    assert not storage._matches("/b/corpus/*.jsonl", "/b/corpus/sub/a.jsonl")
    assert not storage._matches("/b/*.jsonl", "/b/runs/r/pretrain/metrics.jsonl")
    assert storage._matches("/b/**/*.jsonl", "/b/runs/r/metrics.jsonl")


def test_a_path_inside_the_run_is_left_to_its_manifest(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path).llm
    model = Path(cfg.stage_dir("pretrain")) / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    inside = tiny_config(tmp_path, f"finetune.base={model}").llm
    assert "files" not in hashed_config(inside, "finetune")["finetune"]
