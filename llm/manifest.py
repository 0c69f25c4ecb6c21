"""Stage outputs: `_MANIFEST.json` written last and atomically; its presence is the commit.

A folder without a manifest is incomplete: it is never read as input and its stage runs. A manifest that is
there but cannot be trusted (unreadable, not JSON, from a newer llmray, a listed file missing or resized) is
never taken for "not done": reading it raises `StorageError`, one line naming the file and the reason, and
nothing is moved or deleted. The manifest holds the stage's config hash, its inputs' manifest hashes, the
package version and commit, metrics, and every file with its size and sha256; fields a newer llmray adds are
ignored, a higher `schema` is refused.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import llm
from llm import storage
from llm.errors import StorageError
from llm.storage import file_sha256 as file_sha256  # re-exported: the checksum of a local file

MANIFEST = "_MANIFEST.json"
SCHEMA_VERSION = 1
"""The manifest format this llmray writes; it reads this one and older ones (a missing `schema` is 1)."""
ATTEMPT = "_ATTEMPT.json"
"""Which config and inputs a folder's uncommitted run is for, and, once its body returned, its metrics
(a failed commit is then redone without the work). Never listed in the manifest; removed after it."""


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
    return not (name == MANIFEST or name.startswith(f"{MANIFEST}.") or rel.startswith(f"{CHECKSUMS}/")
                or rel == ATTEMPT)


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
    blob = json.dumps(asdict(manifest), indent=2, sort_keys=True, default=str).encode()
    where = storage.join(folder, MANIFEST)
    storage.retrying(where, "writing the manifest", lambda: storage.write_bytes(where, blob))
    return manifest


def read_manifest(folder: str | Path, verify: bool = False) -> Manifest | None:
    """The folder's manifest; None only when there is none.

    Raises:
        StorageError: the manifest is there but cannot be trusted: unreadable (after retries), not JSON,
            lacking a field, written by a newer llmray, a file it lists missing or of another size, or (with
            `verify`) of another sha256. One line naming the file; nothing is changed.
    """
    where = storage.join(folder, MANIFEST)
    try:
        blob = storage.retrying(where, "reading the manifest", lambda: storage.read_bytes(where))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _untrusted(where, f"cannot be read ({storage.one_line(e)})") from None
    manifest = parse_manifest(blob, where)
    present = storage.retrying(folder, "listing the folder", lambda: storage.list_files(folder)) \
        if manifest.files else {}
    for rel, meta in manifest.files.items():
        if rel not in present:
            raise _untrusted(where, f"lists {rel} ({meta['size']} bytes), which is missing")
        if present[rel] != meta["size"]:
            raise _untrusted(where, f"lists {rel} at {meta['size']} bytes, but it has {present[rel]} now")
        if verify and storage.sha256(storage.join(folder, rel)) != meta.get("sha256"):
            raise _untrusted(where, f"lists {rel} with another sha256 than it has now")
    return manifest


_REQUIRED = tuple(f.name for f in fields(Manifest) if f.default is MISSING and f.default_factory is MISSING)


def parse_manifest(blob: bytes, where: str) -> Manifest:
    """A manifest from its bytes: fields this llmray does not know are ignored (a newer one may add some), a
    newer `schema` is refused; `StorageError` naming `where` when it is not a manifest."""
    try:
        data = json.loads(blob)
    except ValueError as e:
        raise _untrusted(where, f"is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _untrusted(where, "is not a JSON object")
    schema = data.get("schema", 1)
    if not isinstance(schema, int):
        raise _untrusted(where, f"has a schema that is not a number ({schema!r})")
    if schema > SCHEMA_VERSION:
        raise _untrusted(where, f"was written by a newer llmray (manifest schema {schema}; this llmray "
                                f"{llm.__version__} reads up to {SCHEMA_VERSION})", advice="upgrade llmray to use it")
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise _untrusted(where, f"lacks {', '.join(missing)}")
    files = data["files"]
    if not (isinstance(files, dict) and all(isinstance(m, dict) and isinstance(m.get("size"), int)
                                            for m in files.values())):
        raise _untrusted(where, "has a file list without sizes")
    for name in ("inputs", "metrics", "config"):
        if not isinstance(data.get(name, {}), dict):
            raise _untrusted(where, f"has a {name} that is not a mapping")
    known = {f.name for f in fields(Manifest)}
    return Manifest(**{k: v for k, v in data.items() if k in known})


def _untrusted(where: str, reason: str,
               advice: str = "repair it, or move its folder away to run the stage again") -> StorageError:
    return StorageError(f"{where}: {reason}; nothing was changed ({advice})")


def manifest_hash(folder: str | Path) -> str | None:
    """sha256 of the manifest's bytes: what a downstream stage records as its input; None when there is none
    (`StorageError` when it is there but cannot be read)."""
    where = storage.join(folder, MANIFEST)
    try:
        return hashlib.sha256(storage.retrying(where, "reading the manifest",
                                               lambda: storage.read_bytes(where))).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _untrusted(where, f"cannot be read ({storage.one_line(e)})") from None


def is_done(folder: str | Path, config_hash: str, inputs: dict[str, str]) -> bool:
    """True when the folder holds a manifest for this config and these inputs (`StorageError` when it holds
    one that cannot be trusted)."""
    manifest = read_manifest(folder)
    return manifest is not None and manifest.config_hash == config_hash and manifest.inputs == inputs
