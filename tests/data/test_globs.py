"""Globs match one path segment at a time, on disk and in an object store: `s3://bucket/*.jsonl` lists the
bucket's top level, it does not walk every object under it and match the run's own `metrics.jsonl`."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from llm.data.sources import glob_files, resolve, segments_match
from llm.errors import DataError

FILES = ["a.jsonl", "b.txt", "runs/r/pretrain/metrics.jsonl", "sub/c.jsonl", "sub/deeper/d.jsonl"]


@pytest.mark.parametrize(("pattern", "path", "matches"), [
    ("*.jsonl", "a.jsonl", True), ("*.jsonl", "runs/r/pretrain/metrics.jsonl", False),
    ("*/*.jsonl", "sub/c.jsonl", True), ("*/*.jsonl", "sub/deeper/d.jsonl", False),
    ("**/*.jsonl", "a.jsonl", True), ("**/*.jsonl", "sub/deeper/d.jsonl", True),
    ("sub/**", "sub/deeper/d.jsonl", True), ("s?b/[cd].jsonl", "sub/c.jsonl", True), ("*.JSONL", "a.jsonl", False),
])
def test_segments_match(pattern: str, path: str, matches: bool) -> None:
    assert segments_match(pattern, path) is matches


def test_glob_files_lists_per_segment_on_a_filesystem(tmp_path) -> None:
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    found = {p: sorted(x[len(str(tmp_path)) + 1:] for x in glob_files(pafs.LocalFileSystem(), str(tmp_path), p))
             for p in ("*.jsonl", "*/*.jsonl", "**/*.jsonl", "sub/**")}
    assert found == {"*.jsonl": ["a.jsonl"], "*/*.jsonl": ["sub/c.jsonl"],
                     "**/*.jsonl": ["a.jsonl", "runs/r/pretrain/metrics.jsonl", "sub/c.jsonl", "sub/deeper/d.jsonl"],
                     "sub/**": ["sub/c.jsonl", "sub/deeper/d.jsonl"]}


def test_object_store_glob_stays_in_its_segment(s3_prefix: str) -> None:
    """The glob walked the whole bucket with `*` crossing `/`, so a run's own metrics.jsonl was read as corpus."""
    fs, root = pafs.FileSystem.from_uri(s3_prefix)
    for name in FILES:
        with fs.open_output_stream(f"{root}/{name}") as f:
            f.write(b'{"text": "x"}\n')
    assert [f.path for f in resolve([f"{s3_prefix}/*.jsonl"])] == [f"{s3_prefix}/a.jsonl"]
    assert [f.path for f in resolve([f"{s3_prefix}/*/*.jsonl"])] == [f"{s3_prefix}/sub/c.jsonl"]
    assert [f.path for f in resolve([f"{s3_prefix}/sub/**/*.jsonl"])] == [f"{s3_prefix}/sub/c.jsonl",
                                                                          f"{s3_prefix}/sub/deeper/d.jsonl"]
    assert [f.path for f in resolve([f"{s3_prefix}/sub"])] == [f"{s3_prefix}/sub/c.jsonl",
                                                               f"{s3_prefix}/sub/deeper/d.jsonl"]
    with pytest.raises(DataError, match=r"\*\.txt: matches no file"):
        resolve([f"{s3_prefix}/sub/*.txt"])
    with pytest.raises(DataError, match="wildcard in the bucket name"):
        resolve(["s3://llmray-*/a.jsonl"])
