"""Stage outputs: `_MANIFEST.json` written last and atomically, read back only when whole.

A folder without a readable manifest is incomplete: it is never read as input and its stage reruns.
The manifest holds the stage's config hash, its inputs' manifest hashes, the package version and
commit, metrics, and every file with its size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llm
from llm import storage
from llm.storage import file_sha256 as file_sha256  # re-exported: the checksum of a local file

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


CHECKSUMS = "_CHECKSUMS"
"""Folder of sidecar files (`<any name>.json`: {relative path: {"size", "sha256"}}) written by the tasks that
write a stage's files, so the commit does not read every byte again on the driver."""


def known_checksums(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The checksums the writing tasks recorded under `<folder>/_CHECKSUMS/` (local or in a store)."""
    out: dict[str, dict[str, Any]] = {}
    sides = storage.join(folder, CHECKSUMS)
    for rel in sorted(storage.list_files(sides)):
        if rel.endswith(".json") and "/" not in rel:
            out.update(json.loads(storage.read_bytes(storage.join(sides, rel))))
    return out


def _listed(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return not (name == MANIFEST or name.startswith(f"{MANIFEST}.") or rel.startswith(f"{CHECKSUMS}/"))


def list_files(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` (the manifest and the checksum sidecars excluded) with size and sha256, by
    relative path; a file a writing task already hashed (same size) is not read again."""
    known = known_checksums(folder)
    out: dict[str, dict[str, Any]] = {}
    for rel, size in sorted(storage.list_files(folder).items()):
        if not _listed(rel):
            continue
        meta = known.get(rel)
        digest = meta["sha256"] if meta and meta.get("size") == size else storage.sha256(storage.join(folder, rel))
        out[rel] = {"size": size, "sha256": digest}
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
    """Commit `folder`: hash its files, then write the manifest last, atomically.

    Locally a temp file is renamed into place (`os.replace` is atomic on POSIX); on an object store the
    manifest is one PUT, which is atomic too. A reader sees either no manifest or a whole one.
    """
    manifest = Manifest(stage=stage, config_hash=config_hash, inputs=dict(inputs), metrics=metrics,
                        files=list_files(folder), config=config or {}, commit=_git_commit())
    blob = json.dumps(asdict(manifest), indent=2, sort_keys=True, default=str)
    storage.write_text(storage.join(folder, MANIFEST), blob)
    return manifest


def read_manifest(folder: str | Path, verify: bool = False) -> Manifest | None:
    """The folder's manifest, or None when it is missing, torn, a file it lists is missing or has another
    size, or (with `verify`) a file's checksum changed."""
    try:
        data = json.loads(storage.read_bytes(storage.join(folder, MANIFEST)))
        manifest = Manifest(**data)
    except (OSError, ValueError, TypeError):
        return None
    if manifest.schema != SCHEMA_VERSION:
        return None
    present = storage.list_files(folder) if manifest.files else {}
    for rel, meta in manifest.files.items():
        if present.get(rel) != meta["size"]:
            return None
        if verify and storage.sha256(storage.join(folder, rel)) != meta["sha256"]:
            return None
    return manifest


def manifest_hash(folder: str | Path) -> str | None:
    """sha256 of the manifest's bytes: what a downstream stage records as its input."""
    try:
        return hashlib.sha256(storage.read_bytes(storage.join(folder, MANIFEST))).hexdigest()
    except OSError:
        return None


def is_done(folder: str | Path, config_hash: str, inputs: dict[str, str]) -> bool:
    """True when the folder holds a whole manifest for this config and these inputs."""
    manifest = read_manifest(folder)
    return manifest is not None and manifest.config_hash == config_hash and manifest.inputs == inputs
