"""Stage outputs: `_MANIFEST.json` written last and atomically, read back only when whole.

A folder without a readable manifest is incomplete: it is never read as input and its stage reruns.
The manifest holds the stage's config hash, its inputs' manifest hashes, the package version and
commit, metrics, and every file with its size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llm

MANIFEST = "_MANIFEST.json"
SCHEMA_VERSION = 1


@dataclass
class Manifest:
    """The commit record of one stage folder."""

    stage: str
    config_hash: str
    inputs: dict[str, str]
    metrics: dict[str, Any]
    files: dict[str, dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    """The hashed config itself, so a changed config can name the keys that changed."""
    version: str = llm.__version__
    commit: str | None = None
    created: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION


def canonical_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj` (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


CHECKSUMS = "_CHECKSUMS"
"""Folder of sidecar files (`<any name>.json`: {relative path: {"size", "sha256"}}) written by the tasks that
write a stage's files, so the commit does not read every byte again on the driver."""


def known_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """The checksums the writing tasks recorded under `<folder>/_CHECKSUMS/`."""
    out: dict[str, dict[str, Any]] = {}
    for side in sorted((folder / CHECKSUMS).glob("*.json")):
        out.update(json.loads(side.read_text()))
    return out


def list_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` (the manifest and the checksum sidecars excluded) with size and sha256, by
    relative path; a file a writing task already hashed (same size) is not read again."""
    known = known_checksums(folder)
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or p.name == MANIFEST or p.name.startswith(f"{MANIFEST}.") or \
                rel.startswith(f"{CHECKSUMS}/"):
            continue
        size = p.stat().st_size
        meta = known.get(rel)
        out[rel] = {"size": size, "sha256": meta["sha256"] if meta and meta.get("size") == size else file_sha256(p)}
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(folder: str | Path, stage: str, config_hash: str, inputs: dict[str, str],
                   metrics: dict[str, Any], config: dict[str, Any] | None = None) -> Manifest:
    """Commit `folder`: hash its files, then write the manifest to a temp file and rename it into place.

    `os.replace` is atomic on POSIX, so a reader sees either no manifest or a whole one.
    """
    folder = Path(folder)
    manifest = Manifest(stage=stage, config_hash=config_hash, inputs=dict(inputs), metrics=metrics,
                        files=list_files(folder), config=config or {}, commit=_git_commit())
    fd, tmp = tempfile.mkstemp(prefix=f"{MANIFEST}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(manifest), f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


def read_manifest(folder: str | Path, verify: bool = False) -> Manifest | None:
    """The folder's manifest, or None when it is missing, torn, or (with `verify`) its files changed."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
        manifest = Manifest(**data)
    except (OSError, ValueError, TypeError):
        return None
    if manifest.schema != SCHEMA_VERSION:
        return None
    for rel, meta in manifest.files.items():
        f = Path(folder) / rel
        try:
            if f.stat().st_size != meta["size"]:
                return None
        except OSError:
            return None
        if verify and file_sha256(f) != meta["sha256"]:
            return None
    return manifest


def manifest_hash(folder: str | Path) -> str | None:
    """sha256 of the manifest's bytes: what a downstream stage records as its input."""
    try:
        return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


def is_done(folder: str | Path, config_hash: str, inputs: dict[str, str]) -> bool:
    """True when the folder holds a whole manifest for this config and these inputs."""
    manifest = read_manifest(folder)
    return manifest is not None and manifest.config_hash == config_hash and manifest.inputs == inputs
