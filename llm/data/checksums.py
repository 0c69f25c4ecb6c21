"""Checksum sidecars written by the tasks that write a stage's files, so the commit reads no byte again.

`llm.manifest.list_files` takes `<stage folder>/_CHECKSUMS/<name>.json` = {relative path: {"size", "sha256"}}
for every file whose size still agrees. Each writing task records its own files under a name no other task
uses (its step and unit), so tasks never write the same sidecar.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from llm.manifest import CHECKSUMS, file_sha256


def record(folder: str | Path, name: str, files: Sequence[str | Path]) -> None:
    """Hash `files` (under `folder`) and write the sidecar `<folder>/_CHECKSUMS/<name>.json` atomically."""
    folder = Path(folder)
    entries = {}
    for f in files:
        p = Path(f)
        entries[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    side = folder / CHECKSUMS
    side.mkdir(parents=True, exist_ok=True)
    tmp = side / f".{name}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(entries, sort_keys=True))
    os.replace(tmp, side / f"{name}.json")
