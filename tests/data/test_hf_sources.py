"""Hugging Face `datasets` folders (`save_to_disk`) as sources: one unit per Arrow shard of every split,
the text field read like a parquet column, chat records rendered like JSONL ones, bad rows named."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llm.data.read import read_rows
from llm.data.sft import records
from llm.data.sources import SourceFile, resolve
from llm.errors import DataError
from tests.conftest import tiny_config
from tests.data.test_stage import prose


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    import datasets

    root = tmp_path_factory.mktemp("hf")
    rng = random.Random(3)
    texts = [{"text": prose(rng), "id": i} for i in range(30)] + [{"text": None, "id": 30}]
    datasets.Dataset.from_list(texts).save_to_disk(str(root / "text"), num_shards=3)
    chats = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                           {"role": "assistant", "content": f"Answer {i}."}]} for i in range(24)]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(chats[:20]),
                                   "test": datasets.Dataset.from_list(chats[20:])})
    splits.save_to_disk(str(root / "chat"))
    return {"text": root / "text", "chat": root / "chat", "root": root}


def test_a_datasets_folder_resolves_to_its_arrow_shards(folders) -> None:
    units = resolve([str(folders["text"])])
    assert [u.kind for u in units] == ["hf-arrow"] * 3
    assert [Path(u.path).name for u in units] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    chat = resolve([str(folders["chat"])])
    assert [Path(u.path).parent.name for u in chat] == ["train", "test"]  # every split, as the folder lists them


def test_rows_of_a_shard_and_a_missing_text_named(folders) -> None:
    rows = [r for u in resolve([str(folders["text"])]) for r in read_rows(u, text_field="text", max_chars=10_000)]
    assert len(rows) == 31
    bad = [r for r in rows if r["reason"]]
    assert len(bad) == 1 and bad[0]["reason"] == "missing_field"
    assert bad[0]["source"].endswith("data-00002-of-00003.arrow[9]")  # the shard and the row named
    assert all(r["text"] for r in rows if not r["reason"])


def test_chat_records_of_every_split(folders) -> None:
    got = [rec for u in resolve([str(folders["chat"])]) for _, rec in records(u.path, u.kind, u.gz)]
    assert len(got) == 24 and got[-1]["messages"][1]["content"] == "Answer 23."


def test_a_torn_datasets_folder_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "dataset_info.json").write_text("{}")
    with pytest.raises(DataError, match=r"torn: not a readable Hugging Face datasets folder \(FileNotFoundError"):
        resolve([str(tmp_path / "torn")])


def test_an_unreadable_shard_is_a_read_error_row(tmp_path: Path) -> None:
    shard = tmp_path / "data-00000-of-00001.arrow"
    shard.write_bytes(b"not arrow")
    (row,) = read_rows(SourceFile(str(shard), "hf-arrow"), text_field="text", max_chars=100)
    assert row["reason"] == "read_error" and "unreadable datasets Arrow shard" in row["text"]


@pytest.mark.ray
def test_data_stage_reads_datasets_folders(ray_session, folders, tmp_path) -> None:
    from llm.data.stage import run

    cfg = tiny_config(tmp_path, f"data.sources=[{folders['text']}]", f"data.sft.sources=[{folders['chat']}]",
                      "data.min_chars=50", "data.seq_len=16", "data.tokenizer.vocab_size=320").llm
    m = run(cfg).metrics
    assert m["documents_in"] == 31 and m["dropped"]["missing_field"] == 1, json.dumps(m)[:400]
    assert m["sft"]["examples"] == 24
