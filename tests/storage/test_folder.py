"""The one storage seam: `storage.Folder` behaves the same on a local disk and on a real S3 API (moto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm import storage
from llm.errors import ConfigError


@pytest.fixture(params=["disk", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh folder URI: a local path, or a prefix in the S3 server's bucket."""
    if request.param == "disk":
        return str(tmp_path / "stage")
    return request.getfixturevalue("s3_prefix") + "/stage"


def test_a_stage_folder_reads_back_what_was_written_on_either_side(where: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMRAY_CACHE", str(tmp_path / "cache"))
    folder = storage.open_for_writing(where)
    folder.write_text("stats.json", '{"n": 1}')  # this process's own file
    storage.write_text(folder.path("parts", "p0.txt"), "from a task")  # a writer on another node
    assert folder.read_text("stats.json") == '{"n": 1}' and folder.read_text("parts", "p0.txt") == "from a task"
    assert folder.exists("stats.json") and folder.exists("parts") and not folder.exists("nothing")
    assert folder.size("stats.json") == 8 and folder.size("nothing") is None
    assert folder.list() == {"stats.json": 8, "parts/p0.txt": 11}
    (folder.local / "tokenizer").mkdir()
    (folder.local / "tokenizer" / "vocab.json").write_text("{}")
    shared = folder.publish("tokenizer")  # readable by workers on any node now, before the body returns
    assert shared == folder.path("tokenizer") and storage.read_text(storage.join(shared, "vocab.json")) == "{}"
    folder.flush("_CHECKSUMS/_driver.json")
    folder.close()
    assert storage.read_text(storage.join(where, "stats.json")) == '{"n": 1}'  # on the store after the flush
    again = storage.Folder(where)
    assert (again.fetch("tokenizer") / "vocab.json").read_text() == "{}"  # a local path a library can open
    assert again.child("parts").list() == {"p0.txt": 11}


def test_fetch_checks_the_committed_sizes(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMRAY_CACHE", str(tmp_path / "cache"))
    storage.write_text(storage.join(where, "m", "config.json"), "{}")
    right = storage.Folder(where, files={"m/config.json": {"size": 2}})
    assert (right.fetch("m") / "config.json").read_text() == "{}"
    wrong = storage.Folder(where, files={"m/config.json": {"size": 3}})
    if wrong.on_disk:  # a disk folder is read in place: nothing is copied, so nothing to check against
        assert wrong.fetch("m") == Path(where) / "m"
    else:
        with pytest.raises(OSError, match="differs from the committed one"):
            wrong.fetch("m")


def test_a_step_that_needs_a_disk_names_the_key(where: str) -> None:
    folder = storage.Folder(where)
    if folder.on_disk:
        assert folder.require_disk("k: needs a disk") == Path(where)
    else:
        with pytest.raises(ConfigError, match="^k: needs a disk$"):
            folder.require_disk("k: needs a disk")


def test_writing_lands_under_the_uri_from_any_node(where: str) -> None:
    with storage.writing(storage.join(where, "model")) as out:
        (out / "config.json").write_text("{}")
    assert storage.list_files(storage.join(where, "model")) == {"config.json": 2}


def test_file_uris_are_local_paths(tmp_path: Path) -> None:
    folder = storage.Folder(f"file://{tmp_path}/x")
    assert folder.on_disk and folder.uri == str(tmp_path / "x")
