"""Resolve `data.sources` into a list of files to read, before any Ray work starts.

A source is a local path or glob, an `s3://` / `gs://` URI (globs allowed, listed through pyarrow's
filesystems, the same layer Ray's readers use, and matched one path segment at a time as a shell does:
`s3://bucket/*.jsonl` lists the bucket's top level only, never every object under it), a Hugging Face
`datasets` folder written by `save_to_disk` (a Dataset or a DatasetDict: every split, one unit per Arrow
shard, read with `datasets`), or a built-in corpus name (`builtin:...`). A source that matches nothing is a
`DataError` that names it: a typo should not produce an empty, "successful" run.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from llm.data import builtin
from llm.errors import DataError

BUILTINS = ("builtin:python-docs", "builtin:python-sft")
_WILD = re.compile(r"[*?[]")
SUFFIXES = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "jsonl",
            ".ndjson": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class SourceFile:
    """One unit of reading: a file (local or URI) or one piece of a built-in corpus."""

    path: str
    kind: str  # txt | jsonl | parquet | hf-arrow | builtin-docs | builtin-topics | builtin-sft
    gz: bool = False


def file_kind(path: str) -> tuple[str, bool]:
    """The format of a file from its name, and whether it is gzip-compressed."""
    name = path.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for suffix, kind in SUFFIXES.items():
        if name.endswith(suffix):
            return kind, gz
    raise DataError(f"{path}: unknown file type (expected .txt, .jsonl, .parquet, optionally .gz)")


def segments_match(pattern: str, path: str) -> bool:
    """Whether `path` matches the glob `pattern` one `/`-separated segment at a time, as a shell glob does:
    `*`, `?` and `[...]` never cross a `/`, and a `**` segment stands for any number of segments (none too).
    Case-sensitive, as object keys are."""
    return _match(pattern.split("/"), path.split("/"))


def _match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(pattern[1:], parts[1:])


def glob_files(fs: Any, base: str, pattern: str) -> list[str]:
    """The files under the folder `base` of the pyarrow filesystem `fs` whose path relative to `base` matches
    `pattern` (`segments_match`). Without `**`, one folder level is listed per segment, so `*.jsonl` lists
    `base` alone; with `**`, `base` is listed recursively once."""
    import pyarrow.fs as pafs

    segments = pattern.split("/")
    if "**" in segments:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return [i.path for i in infos
                if i.type == pafs.FileType.File and segments_match(pattern, i.path[len(base):].lstrip("/"))]
    level = [base]
    for n, segment in enumerate(segments):
        want = pafs.FileType.File if n == len(segments) - 1 else pafs.FileType.Directory
        found = []
        for folder in level:
            if _WILD.search(segment):
                infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
                found += [i.path for i in infos if i.type == want and fnmatch.fnmatchcase(i.base_name, segment)]
            elif fs.get_file_info(f"{folder}/{segment}").type == want:
                found.append(f"{folder}/{segment}")
        level = found
    return level


def _expand_uri(source: str) -> list[str]:
    import pyarrow.fs as pafs

    scheme, _, rest = source.partition("://")
    segments = rest.split("/")
    wild = next((n for n, s in enumerate(segments) if _WILD.search(s)), None)
    if wild is None:
        fs, path = pafs.FileSystem.from_uri(source)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [source]
        if info.type == pafs.FileType.NotFound:
            return []
        base, pattern = path.rstrip("/"), "**"  # a folder: every file under it
    elif wild == 0:
        raise DataError(f"{source}: a wildcard in the bucket name cannot be listed; name the bucket")
    else:
        base, pattern = "/".join(segments[:wild]), "/".join(segments[wild:])
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{base}")
    return sorted(f"{scheme}://{p}" for p in glob_files(fs, base, pattern))


def _expand_local(source: str) -> list[str]:
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        path = os.path.join(path, "**", "*")
    matches = glob.glob(path, recursive=True)
    return sorted(m for m in matches if os.path.isfile(m))


def is_hf_dataset(path: str) -> bool:
    """A local folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    p = os.path.expanduser(path)
    return os.path.isdir(p) and any(os.path.exists(os.path.join(p, f)) for f in ("dataset_info.json",
                                                                                 "dataset_dict.json"))


def hf_units(path: str) -> list[SourceFile]:
    """The Arrow shards of a `save_to_disk` folder, splits in the order the folder lists them."""
    root = os.path.expanduser(path)
    try:
        if os.path.exists(os.path.join(root, "dataset_dict.json")):
            with open(os.path.join(root, "dataset_dict.json")) as f:
                folders = [os.path.join(root, split) for split in json.load(f)["splits"]]
        else:
            folders = [root]
        out = []
        for folder in folders:
            with open(os.path.join(folder, "state.json")) as f:
                shards = [d["filename"] for d in json.load(f)["_data_files"]]
            out += [SourceFile(os.path.join(folder, name), "hf-arrow") for name in shards]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable Hugging Face datasets folder ({type(e).__name__}: {e})") from None
    return out


def hf_rows(path: str) -> Any:
    """(index, row dict) of one Arrow shard of a `save_to_disk` folder (memory-mapped by `datasets`)."""
    import datasets

    yield from enumerate(datasets.Dataset.from_file(path))


def builtin_units(source: str) -> list[SourceFile]:
    """The reading units of a built-in corpus: one per stdlib file (plus the manual's topics)."""
    if source == "builtin:python-sft":
        return [SourceFile(str(p), "builtin-sft") for p in builtin.stdlib_files()]
    return [SourceFile("pydoc_data.topics", "builtin-topics")] + [
        SourceFile(str(p), "builtin-docs") for p in builtin.stdlib_files()]


def resolve(sources: list[str], *, builtin_ok: tuple[str, ...] = BUILTINS) -> list[SourceFile]:
    """Every file the sources name, in a stable order.

    Raises:
        DataError: a source matches nothing, or names an unknown built-in or file type.
    """
    if not sources:
        raise DataError("data.sources is empty: name at least one path, glob, URI or builtin:python-docs")
    out: list[SourceFile] = []
    for source in sources:
        if source.startswith("builtin:"):
            if source not in builtin_ok:
                raise DataError(f"{source}: unknown built-in corpus (known: {', '.join(builtin_ok)})")
            out.extend(builtin_units(source))
            continue
        if "://" not in source and is_hf_dataset(source.removeprefix("file://")):
            out.extend(hf_units(source.removeprefix("file://")))
            continue
        paths = _expand_uri(source) if "://" in source and not source.startswith("file://") \
            else _expand_local(source.removeprefix("file://"))
        if not paths:
            raise DataError(f"{source}: matches no file")
        for p in paths:
            kind, gz = file_kind(p)
            out.append(SourceFile(p, kind, gz))
    return out
