"""Bad input never crashes reading or loses the rest of a file; a source that matches nothing is an error."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.data.read import read_rows
from llm.data.sources import SourceFile, resolve
from llm.errors import DataError


def rows(path: Path, max_chars: int = 1000, field: str = "text") -> list[dict]:
    [src] = resolve([str(path)])
    return list(read_rows(src, text_field=field, max_chars=max_chars))


def test_invalid_utf8_replaced_counted_rest_read(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "caf\xc3\xa9 ok"}\n{"text": "bad \xff\xfe byte"}\n{"text": "after"}\n')
    out = rows(p)
    assert [r["text"] for r in out] == ["caf\u00e9 ok", "bad \ufffd\ufffd byte", "after"]
    assert [r["utf8_errors"] for r in out] == [0, 2, 0]
    t = tmp_path / "b.txt"
    t.write_bytes(b"hello \xc3 world \xef\xbf\xbd")  # one invalid byte; a genuine U+FFFD is not counted
    [r] = rows(t)
    assert r["utf8_errors"] == 1 and r["text"].endswith("world \ufffd")


def test_huge_line_bounded_memory_dropped_as_too_long(tmp_path):
    p = tmp_path / "big.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "before"}\n{"text": "')
        chunk = b"x" * (1 << 20)
        for _ in range(100):  # a single 100 MB line
            f.write(chunk)
        f.write(b'"}\n{"text": "after"}\n')
    tracemalloc.start()
    out = rows(p, max_chars=1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(r["text"], r["reason"]) for r in out] == [("before", ""), ("", "too_long"), ("after", "")]
    assert out[1]["source"].endswith("big.jsonl:2")
    assert peak < 8 << 20  # read in 1 MiB pieces, never held whole


def test_empty_files_counted(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    (tmp_path / "e.jsonl").write_bytes(b"")
    assert [r["reason"] for r in rows(tmp_path / "e.txt")] == ["empty_file"]
    assert [r["reason"] for r in rows(tmp_path / "e.jsonl")] == ["empty_file"]


def test_truncated_gz_names_file_keeps_earlier_rows(tmp_path):
    lines = b"".join(json.dumps({"text": f"line {i} " + "pad " * 50}).encode() + b"\n" for i in range(2000))
    blob = gzip.compress(lines)
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(blob[: len(blob) // 2])
    out = rows(p, max_chars=10_000)
    assert out[-1]["reason"] == "read_error" and out[-1]["source"] == str(p)
    assert out[-1]["text"] == ("truncated gzip stream "
                               "(Compressed file ended before the end-of-stream marker was reached)")
    good = [r for r in out if not r["reason"]]
    assert len(good) > 100 and good[0]["text"].startswith("line 0 ")


def test_read_errors_are_one_line_saying_what_went_wrong(tmp_path):
    """The reason a file failed is shown after its path in the summary: one line, in words, library message kept."""
    (tmp_path / "plain.txt.gz").write_bytes(b"not gzip at all")
    whole = gzip.compress(b"hello world " * 1000)
    (tmp_path / "bad.jsonl.gz").write_bytes(whole[:10] + b"\xff" * 30 + whole[40:])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is no parquet file")
    expected = {
        "plain.txt.gz": "not a gzip file (Not a gzipped file (b'no'))",
        "bad.jsonl.gz": "corrupt gzip stream (Error -3 while decompressing data: invalid block type)",
        "broken.parquet": "unreadable parquet file (Parquet magic bytes not found in footer. Either the file is "
                          "corrupted or this is not a parquet file.)",
    }
    for name, error in expected.items():
        assert [(r["reason"], r["source"], r["text"]) for r in rows(tmp_path / name)] == [
            ("read_error", str(tmp_path / name), error)]
    [src] = resolve([str(tmp_path / "plain.txt.gz")])
    (tmp_path / "plain.txt.gz").unlink()  # gone between listing and reading
    [r] = read_rows(src, text_field="text", max_chars=1000)
    assert (r["reason"], r["text"]) == ("read_error", "cannot read (No such file or directory)")


def test_malformed_json_line_dropped_with_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"text": "one"}\n{"text": oops}\n[1, 2]\n{"body": "x"}\n{"text": "five"}\n')
    out = rows(p)
    assert [(r["reason"], r["source"].rsplit(":", 1)[1]) for r in out] == [
        ("", "1"), ("bad_json", "2"), ("missing_field", "3"), ("missing_field", "4"), ("", "5")]


def test_text_field_and_parquet(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"body": "hello"}\n')
    assert rows(p, field="body")[0]["text"] == "hello"
    q = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["a", "b" * 2000, None]}), q)
    assert [(r["text"], r["reason"]) for r in rows(q, field="body")] == [("a", ""), ("", "too_long"),
                                                                         ("", "missing_field")]
    assert [(r["reason"], r["text"]) for r in rows(q, field="text")] == [
        ("read_error", "no column 'text' (columns: body)")]


def test_source_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nothing.txt: matches no file"):
        resolve([str(tmp_path / "nothing.txt")])
    with pytest.raises(DataError, match="unknown built-in"):
        resolve(["builtin:nope"])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="unknown file type"):
        resolve([str(tmp_path / "*.csv")])


def test_builtin_units_and_documents():
    units = resolve(["builtin:python-docs"])
    assert units[0] == SourceFile("pydoc_data.topics", "builtin-topics")
    docs = list(read_rows(units[0], text_field="text", max_chars=10**6))
    assert len(docs) > 50 and all(r["source"].startswith("pydoc_data.topics:") for r in docs)
    json_unit = next(u for u in units if u.path.endswith("/json/__init__.py"))
    [mod] = read_rows(json_unit, text_field="text", max_chars=10**6)
    assert "JSON" in mod["text"] and "dumps(" in mod["text"]


def test_deeply_nested_line_is_a_named_drop(tmp_path):
    """A line nested 100,000 deep raised an uncaught RecursionError: the stage failed without naming it."""
    p = tmp_path / "deep.jsonl"
    p.write_text('{"text": "before"}\n' + "[" * 100_000 + "]" * 100_000 + '\n{"text": "after"}\n')
    out = rows(p, max_chars=10**6)
    assert [(r["reason"], r["source"]) for r in out] == [("", f"{p}:1"), ("bad_json", f"{p}:2"), ("", f"{p}:3")]
    assert out[1]["text"] == "nested too deeply"


def test_huge_integer_drops_its_line_only(tmp_path):
    """A 5,000-digit integer (past Python's int max str digits) was caught for the whole file: the lines after
    it were skipped without a word."""
    p = tmp_path / "digits.jsonl"
    p.write_text('{"text": "before"}\n{"n": 1' + "0" * 5000 + ', "text": "x"}\n{"text": "after"}\n')
    out = rows(p, max_chars=10**6)
    assert [(r["reason"], r["source"]) for r in out] == [("", f"{p}:1"), ("bad_json", f"{p}:2"), ("", f"{p}:3")]
    assert "integer string conversion" in out[1]["text"]


def test_lone_surrogate_replaced_and_counted(tmp_path):
    """`\\ud800` is valid JSON but not UTF-8: parquet refuses it, which failed the whole unit."""
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "a \\ud800 b"}\n{"text": "pair \\ud83d\\ude00 ok"}\n')
    out = rows(p)
    assert [(r["text"], r["reason"], r["utf8_errors"]) for r in out] == [
        ("a \ufffd b", "", 1), ("pair \U0001f600 ok", "", 0)]
    pa.array([r["text"] for r in out])  # writable


def test_decompression_bomb_is_capped_and_named(tmp_path, monkeypatch):
    """A `.parquet.gz` was inflated whole into memory, and a `.txt.gz` or `.jsonl.gz` bomb inflated in full:
    now a file stops once it inflates past the ratio cap, with a read_error naming it."""
    from llm.data import compressed

    monkeypatch.setattr(compressed, "FREE_INFLATE_BYTES", 256 << 10)
    zeros = gzip.compress(b"\0" * (16 << 20))  # ~1000x: a bomb (a real one inflates to terabytes)
    for name, blob in [("bomb.parquet.gz", zeros), ("bomb.txt.gz", zeros),
                       ("bomb.jsonl.gz", gzip.compress(b"\n" * (16 << 20)))]:
        (tmp_path / name).write_bytes(blob)
        tracemalloc.start()
        out = rows(tmp_path / name, max_chars=10**6)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert [(r["reason"], r["source"]) for r in out] == [("read_error", str(tmp_path / name))], name
        assert out[0]["text"].startswith(f"decompression capped: inflates past {compressed.MAX_INFLATE_RATIO}x"), name
        assert peak < 8 << 20, (name, peak)  # stopped near 100x its ~16 KiB, never holding the 16 MiB


def test_compressed_parquet_and_jsonl_still_read(tmp_path):
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(1000)]}), buf)
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress(buf.getvalue().to_pybytes()))
    assert [r["text"] for r in rows(tmp_path / "t.parquet.gz")] == [f"row {i}" for i in range(1000)]
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(b'{"text": "one"}\n{"text": "two"}\n'))
    assert [r["text"] for r in rows(tmp_path / "t.jsonl.gz")] == ["one", "two"]
