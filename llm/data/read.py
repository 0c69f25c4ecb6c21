"""Read one source file into document rows, never crashing and never holding more than a bounded line.

Every row has `text`, `source` (`file` or `file:line`), `reason` (empty when the row is a document to keep
going with, else why it is dropped) and `utf8_errors` (bytes replaced). Problems become rows too, so that
the driver counts them from the same table: `bad_json`, `missing_field`, `empty_file`, `read_error`,
`too_long`. A `.txt` file is one document; a `.jsonl` line is one; a parquet row is one. A `read_error` row
carries the one-line reason (`read_error_message`) as its text, so that the failed file can be named.

A hostile line is one bad record, never a failed stage or a lost file: JSON nested too deeply, an integer past
Python's digit limit and lone UTF-16 surrogates are handled per line. A `.gz` file inflates through
`llm.data.compressed.CappedGzip`: a decompression bomb ends its file with a `read_error` instead of filling
memory or disk.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

from llm.data import builtin
from llm.data.compressed import CappedGzip, InflateLimit
from llm.data.sources import SourceFile, hf_rows

BATCH_ROWS = 256
_CHUNK = 1 << 20
_FFFD = "\ufffd".encode()
_MAX_DETAIL = 200  # a library's message can be long; the summary shows one line per failed file
# gzip raises EOFError on a truncated stream, BadGzipFile (OSError) on garbage, zlib.error on a corrupt
# block; pyarrow ArrowInvalid (ValueError) or OSError on a broken parquet file.
READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)
_SPOOL_BYTES = 64 << 20  # a `.parquet.gz` is inflated into a temporary file, in memory only up to this
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class Unreadable(NamedTuple):
    """A file that failed to read: few per run, so every one travels back to the driver by name."""

    file: str
    error: str


def read_error_message(e: BaseException, src: SourceFile) -> str:
    """One line saying why `src` failed to read: what went wrong in words, then the library's own message.

    The file path is not repeated: whoever shows the message puts it first.
    """
    if isinstance(e, InflateLimit):
        return str(e)
    detail = " ".join(str(e).split())  # pyarrow's messages can span lines
    if len(detail) > _MAX_DETAIL:
        detail = detail[: _MAX_DETAIL - 3] + "..."
    if isinstance(e, OSError) and e.strerror:  # the OS's words; its message would repeat the path
        return f"cannot read ({e.strerror})"
    if src.gz and isinstance(e, EOFError):
        what = "truncated gzip stream"
    elif src.gz and isinstance(e, gzip.BadGzipFile | zlib.error):
        what = "not a gzip file" if detail.startswith("Not a gzipped file") else "corrupt gzip stream"
    elif src.kind == "parquet":
        what = "unreadable parquet file"
    else:
        what = type(e).__name__
    return f"{what} ({detail})" if detail else what


def row(text: str, source: str, reason: str = "", utf8_errors: int = 0) -> dict[str, Any]:
    return {"text": text, "source": source, "reason": reason, "utf8_errors": utf8_errors}


def decode(data: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of invalid sequences replaced by U+FFFD (genuine U+FFFD not counted)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.count(_FFFD)


def without_surrogates(text: str) -> tuple[str, int]:
    """`text` with lone UTF-16 surrogates (valid in JSON escapes, not in UTF-8) replaced by U+FFFD, and how
    many: parquet and the tokenizer refuse them, and one would fail a whole unit."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.subn("\ufffd", text)
    return text, 0


def parse_json(text: str) -> tuple[Any, str]:
    """The value of one JSON line and "", or (None, why it is not one). Never raises: a line nested 100,000
    deep (RecursionError) or holding a 5,000-digit integer (ValueError past `sys.get_int_max_str_digits`)
    is one bad line, not a failed stage or file."""
    try:
        return json.loads(text), ""
    except json.JSONDecodeError as e:
        return None, f"{e.msg} at column {e.colno}"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as e:
        return None, " ".join(str(e).split())[:_MAX_DETAIL]


def open_binary(src: SourceFile) -> BinaryIO:
    """A binary stream of the file, decompressed when it is `.gz` (capped: `llm.data.compressed`); local paths
    and URIs alike."""
    if "://" in src.path and not src.path.startswith("file://"):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(src.path)
        raw: BinaryIO = fs.open_input_stream(path)
    else:
        raw = open(src.path.removeprefix("file://"), "rb")  # closed by the caller
    if not src.gz:
        return raw
    return io.BufferedReader(CappedGzip(raw))


def bounded_lines(f: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes without the newline) per line, or None for a line longer than
    `max_bytes`: the rest of such a line is skipped in 1 MiB chunks, so a 100 MB line costs 1 MiB."""
    lineno = 0
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while (rest := f.readline(_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield lineno, None
            continue
        yield lineno, line.rstrip(b"\r\n")


def _txt(src: SourceFile, f: BinaryIO, max_bytes: int) -> Iterator[dict[str, Any]]:
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        while f.read(_CHUNK):  # drain, so a truncated .gz still reports its error
            pass
        yield row("", src.path, "too_long")
        return
    if not data:
        yield row("", src.path, "empty_file")
        return
    text, bad = decode(data)
    yield row(text, src.path, "", bad)


def _jsonl(src: SourceFile, f: BinaryIO, max_bytes: int, field: str) -> Iterator[dict[str, Any]]:
    empty = True
    for lineno, line in bounded_lines(f, max_bytes):
        empty = False
        where = f"{src.path}:{lineno}"
        if line is None:
            yield row("", where, "too_long")
            continue
        if not line.strip():
            continue
        text, bad = decode(line)
        record, error = parse_json(text)
        if error:
            yield row(error, where, "bad_json", bad)
            continue
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            yield row(f"no string field {field!r}", where, "missing_field", bad)
            continue
        value, lone = without_surrogates(value)
        yield row(value, where, "", bad + lone)
    if empty:
        yield row("", src.path, "empty_file")


def _value_row(value: Any, where: str, max_chars: int) -> dict[str, Any]:
    """A column value as a document row, or the reason it is not one."""
    if not isinstance(value, str):
        return row("", where, "missing_field")
    if len(value) > max_chars:
        return row("", where, "too_long")
    return row(value, where)


def _parquet(src: SourceFile, f: BinaryIO, field: str, max_chars: int) -> Iterator[dict[str, Any]]:
    if not src.gz:
        yield from _parquet_rows(src, f, field, max_chars)
        return
    # Parquet needs a seekable file: a `.parquet.gz` is inflated (capped) into a temporary file, not memory.
    with tempfile.SpooledTemporaryFile(_SPOOL_BYTES) as tmp:
        shutil.copyfileobj(f, tmp, _CHUNK)
        tmp.seek(0)
        yield from _parquet_rows(src, tmp, field, max_chars)  # type: ignore[arg-type]


def _parquet_rows(src: SourceFile, f: BinaryIO, field: str, max_chars: int) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    if field not in pf.schema_arrow.names:
        yield row(f"no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})", src.path, "read_error")
        return
    n = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[field]):
        for value in batch.column(0).to_pylist():
            n += 1
            yield _value_row(value, f"{src.path}:{n}", max_chars)
    if n == 0:
        yield row("", src.path, "empty_file")


def _builtin(src: SourceFile) -> Iterator[dict[str, Any]]:
    if src.kind == "builtin-topics":
        for key, text in builtin.topics():
            yield row(text, key)
    elif (doc := builtin.module_document(src.path)) is not None:
        yield row(doc[1], doc[0])


def _hf_arrow(src: SourceFile, field: str, max_chars: int) -> Iterator[dict[str, Any]]:
    """Rows of one Arrow shard of a `datasets` folder, as a parquet file's: the text field, or a reason."""
    try:
        for i, rec in hf_rows(src.path):
            yield _value_row(rec.get(field), f"{src.path}[{i}]", max_chars)
    except (OSError, ValueError) as e:
        yield row(f"{src.path}: unreadable datasets Arrow shard ({e})", src.path, "read_error")


def read_rows(src: SourceFile, *, text_field: str, max_chars: int) -> Iterator[dict[str, Any]]:
    """Every row of one source. Errors while reading (a truncated `.gz`, an unreadable file) end this file
    with a `read_error` row naming it, its text the reason; rows read before the error are kept."""
    if src.kind.startswith("builtin"):
        yield from _builtin(src)
        return
    if src.kind == "hf-arrow":
        yield from _hf_arrow(src, text_field, max_chars)
        return
    max_bytes = 4 * max_chars  # UTF-8 needs at most 4 bytes per character
    try:
        with open_binary(src) as f:
            if src.kind == "txt":
                yield from _txt(src, f, max_bytes)
            elif src.kind == "jsonl":
                yield from _jsonl(src, f, max_bytes, text_field)
            else:
                yield from _parquet(src, f, text_field, max_chars)
    except READ_ERRORS as e:
        yield row(read_error_message(e, src), src.path, "read_error")
