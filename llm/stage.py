"""The stage contract: skip if done, write only under `<storage>/<run>/<stage>/`, commit with a manifest.

A stage module declares `STAGE = Stage(...)` and defines `run(cfg, force=False) -> StageResult`, which
calls `execute(cfg, STAGE, body)` with a body that writes into its folder and returns its metrics. Inputs
are earlier stages' folders (`stage_input`), and only committed ones (with a whole manifest) are ever read.

The body gets one `storage.Folder`: writers on any node write to `folder.uri` / `folder.path(...)`, this
process writes its own files under `folder.local` (with `storage` in an object store, a driver-local
staging folder uploaded before the manifest), inputs a library needs on disk come from `fetch`.

One run writes a stage folder at a time (its lease, `llm.lease`), and nothing a fault does undoes a commit:
a manifest that cannot be trusted stops the stage in one line instead of being taken for "not done", the
attempt marker outlives a failed commit (the rerun commits, it does not redo the work), and setting a folder
aside moves its manifest along with it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm import lease, storage
from llm.config import PipelineConfig
from llm.errors import StageInputError, StaleOutputError, StorageError
from llm.manifest import (
    ATTEMPT,
    CHECKSUMS,
    MANIFEST,
    Manifest,
    canonical_hash,
    is_done,
    manifest_hash,
    read_manifest,
    write_manifest,
)


def _read_attempt(folder: str | Path) -> dict[str, Any] | None:
    """The attempt marker of an uncommitted folder; None when there is none or it is torn (the folder then
    counts as another config's and is kept aside)."""
    where = storage.join(folder, ATTEMPT)
    try:
        value = json.loads(storage.retrying(where, "reading the attempt marker", lambda: storage.read_bytes(where)))
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_attempt(folder: str | Path, attempt: dict[str, Any]) -> None:
    where = storage.join(folder, ATTEMPT)
    blob = json.dumps(attempt, sort_keys=True, default=str).encode()  # metrics as the manifest writes them
    storage.retrying(where, "writing the attempt marker", lambda: storage.write_bytes(where, blob))


@dataclass
class StageResult:
    """What a stage did: where, whether it was skipped, its metrics, how long it took."""

    stage: str
    path: str
    skipped: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    kept_aside: str | None = None
    """Where an earlier output of this stage was moved before this run (never deleted)."""


@dataclass(frozen=True)
class StageModel:
    """A model a stage's committed output names, as its tracked run logs it: an MLflow pyfunc model."""

    path: str
    """The model directory (a path, or a URI in an object store)."""
    code: Path
    """The MLflow "models from code" file that opens the directory (logged as its `model` artifact)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The pyfunc's model config: the keys `mlflow.pyfunc.load_model(uri, model_config=...)` may override."""


@dataclass(frozen=True)
class Stage:
    """A stage, declared once, at the bottom of its own module; `llm.stages` lists them in pipeline order and
    the CLI verbs, `llmray run`, `jobs/`, status and the report derive from that list."""

    name: str
    """The CLI verb, the folder under `<storage>/<run>/` and the config section that enables it."""
    what: str
    """What it does, for its header line and the CLI help."""
    run: Callable[..., StageResult]
    """`run(cfg, force=False) -> StageResult`."""
    sections: tuple[str, ...] | Callable[[PipelineConfig], tuple[str, ...]]
    """Config sections whose output-changing fields are hashed into its manifest (a function of the config
    when they depend on it: the sweep hashes the section of the stage it sweeps for)."""
    inputs: tuple[str, ...] = ()
    """Earlier stages it may read (their manifest hashes are recorded and compared)."""
    resumable: bool = False
    """An uncommitted folder started for the same config and inputs is resumed (training)."""
    record_only: bool = False
    """The folder records a state of the cluster (serve's endpoint), not an artifact: a rerun replaces it."""
    foreground: bool = False
    """It may hold the foreground until Ctrl-C (serve): `llmray run` writes the report before it starts."""
    as_run: Callable[[PipelineConfig], PipelineConfig] | None = None
    """The config as the stage hashes it when it runs, for `llmray status` (the sweep hashes its trials'
    setup; `lr: best` stands for the winning schedule); None: as written."""
    progress: Callable[[str], str] | None = None
    """What a rerun of an interrupted run of it keeps, from its folder, for `llmray status`."""
    model: Callable[[PipelineConfig], StageModel] | None = None
    """The model its committed output names, which its tracked run logs as an MLflow model (compress: the
    chosen variant); None: no model to log."""

    def enabled(self, cfg: PipelineConfig) -> bool:
        return bool(getattr(cfg, self.name).enabled)

    def hashed_sections(self, cfg: PipelineConfig) -> tuple[str, ...]:
        return self.sections(cfg) if callable(self.sections) else self.sections


def stage_input(cfg: PipelineConfig, stage: str) -> storage.Folder:
    """A committed earlier stage's folder (read-only), whose `fetch` copies are checked against its manifest;
    a one-line error when it is missing or incomplete."""
    uri = cfg.stage_dir(stage)
    manifest = read_manifest(uri)
    if manifest is None:
        raise StageInputError(
            f"{uri}: no complete {stage} output ({MANIFEST} missing); run `llmray {stage}` first"
        )
    return committed_folder(uri, manifest)


def committed_folder(uri: str, manifest: Manifest | None = None) -> storage.Folder:
    """A committed folder whose `fetch` copies are checked against its manifest (the manifest included)."""
    manifest = manifest or read_manifest(uri)
    files = dict(manifest.files) if manifest else {}
    try:
        blob = storage.read_bytes(storage.join(uri, MANIFEST))
        files[MANIFEST] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    except FileNotFoundError:
        pass
    return storage.Folder(uri, files=files)


EXTERNAL: dict[str, tuple[str, ...]] = {
    "data": ("sources", "sft.sources", "tokenizer.path"),
    "pretrain": ("model.path", "model.config_file"),
    "finetune": ("base", "data", "eval.lm_eval.include_path"),
    "compress": ("eval.lm_eval.include_path",),
}
"""Keys of each section that name files outside the run (a corpus, a model or tokenizer directory): their
fingerprints (`storage.fingerprint`: size and mtime of every file) are hashed with the section, under
`files`, so a changed corpus file makes its stage stale as a changed key does."""


def _external(cfg: PipelineConfig, value: Any) -> list[str]:
    paths = value if isinstance(value, list) else [value] if isinstance(value, str) else []
    # `builtin:` sources ship with the package; the run's own folders are inputs with manifests already
    run = cfg.storage.rstrip("/") + "/" + cfg.run + "/"
    return [p for p in paths if ("://" in p or ":" not in p) and not storage.absolute(p).startswith(run)]


def external_fingerprints(cfg: PipelineConfig, section: str) -> dict[str, dict[str, str]]:
    """`{key: {path: fingerprint}}` of the files outside the run that `section` names (see `EXTERNAL`)."""
    out = {}
    for key in EXTERNAL.get(section, ()):
        value: Any = getattr(cfg, section)
        for part in key.split("."):
            value = getattr(value, part, None)
        paths = _external(cfg, value)
        if paths:
            out[key] = {p: storage.fingerprint(p) for p in paths}
    return out


def hashed_config(cfg: PipelineConfig, *sections: str) -> dict[str, Any]:
    """The output-changing fields of the config sections a stage depends on (see `Section.NOT_HASHED`),
    with the fingerprints of the files outside the run they name (`EXTERNAL`)."""
    out = {}
    for name in sections:
        hashed = getattr(cfg, name).hashed()
        files = external_fingerprints(cfg, name)
        out[name] = {**hashed, "files": files} if files else hashed
    return out


def config_hash(cfg: PipelineConfig, *sections: str) -> str:
    """Hash of the output-changing fields of the sections a stage depends on."""
    return canonical_hash(hashed_config(cfg, *sections))


def changed_since(cfg: PipelineConfig, manifest: Manifest, ran: PipelineConfig | None = None) -> list[str]:
    """What changed since `manifest` was committed: dotted config keys (as `ran`, the config as the stage
    hashes it, default `cfg`, would write them; the files outside the run included) and `input <stage>` for
    an input stage committed again since; [] when the folder is current."""
    ran = ran or cfg
    changed = changed_keys(manifest.config, hashed_config(ran, *manifest.config)) if manifest.config else []
    return changed + [f"input {name}" for name, h in manifest.inputs.items()
                      if manifest_hash(cfg.stage_dir(name)) != h]


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two hashed configs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def set_aside(folder: str | Path) -> str:
    """Move `folder` to `<name>.<UTC time>` beside it (never delete: it may hold a finished run). On an
    object store every object is copied and checked before the originals are deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = str(folder).rstrip("/")
    aside = f"{base}.{stamp}"
    n = 1
    while storage.exists(aside):
        n += 1
        aside = f"{base}.{stamp}-{n}"
    storage.move_tree(base, aside)
    return aside


def _why_stale(manifest: Any, hashed: dict[str, Any], inputs: dict[str, str], force: bool) -> str:
    if force:
        return "--force"
    keys = changed_keys(manifest.config, hashed) if manifest.config else ["(config of an older llmray)"]
    keys += [f"input {name}" for name in inputs if manifest.inputs.get(name) != inputs[name]]
    return "changed: " + ", ".join(keys or ["inputs"])


def _plan(cfg: PipelineConfig, stage: Stage, inputs: tuple[str, ...]) -> tuple[dict[str, str], dict[str, Any], str]:
    """(input manifest hashes, hashed config, its digest): what a commit of this stage records."""
    input_hashes = {name: manifest_hash(stage_input(cfg, name).uri) or "" for name in inputs}
    hashed = hashed_config(cfg, *stage.hashed_sections(cfg))
    return input_hashes, hashed, canonical_hash(hashed)


def _skipped(stage: Stage, uri: str) -> StageResult:
    manifest = read_manifest(uri)
    return StageResult(stage.name, uri, skipped=True, metrics=manifest.metrics if manifest else {})


def execute(cfg: PipelineConfig, stage: Stage, body: Callable[[storage.Folder], dict[str, Any]], *,
            force: bool = False, inputs: tuple[str, ...] | None = None,
            on_set_aside: Callable[[Path, Path], None] | None = None) -> StageResult:
    """Run `body(folder)` unless a matching manifest says it is done, then commit the folder.

    The run holds the folder's lease (`llm.lease`) from before it decides anything until after the commit: a
    second run of the stage refuses, naming the holder, or waits (`--wait`). A committed folder for another
    config (or `force`) is moved aside, never deleted; with `cfg.on_change: refuse` the stage stops instead,
    naming the changed keys. A partial folder is resumed when the stage is `resumable` and it was started
    for this very config and these inputs, and otherwise moved aside too. A folder whose body finished but
    whose commit failed is committed without running the body again. A manifest that is there but cannot be
    trusted stops the stage (`StorageError`), changing nothing.

    Args:
        cfg: the pipeline config.
        stage: the stage's declaration (its folder name, hashed sections, inputs, resume rule).
        body: writes the stage's outputs into the folder and returns its metrics.
        force: rerun even when the manifest matches, and start over even from a resumable folder.
        inputs: the earlier stages this run reads (default: all of `stage.inputs`).
        on_set_aside: called with (old, new) path when a folder on disk is moved aside, before `body` runs.
    """
    uri = cfg.stage_dir(stage.name)
    inputs = stage.inputs if inputs is None else inputs
    input_hashes, hashed, digest = _plan(cfg, stage, inputs)
    if not force and is_done(uri, digest, input_hashes):  # a done stage needs no lease: it writes nothing
        return _skipped(stage, uri)
    with lease.hold(uri, stage.name) as held:
        input_hashes, hashed, digest = _plan(cfg, stage, inputs)  # again: a run waited for may have changed it
        if not force and is_done(uri, digest, input_hashes):
            return _skipped(stage, uri)
        attempt = {"config_hash": digest, "inputs": input_hashes}
        finished = None if force or stage.record_only else _finished(uri, attempt)
        aside = None
        if finished is not None:
            print(f"{stage.name}: its last run finished but did not commit; committing it now", flush=True)
            metrics, seconds = finished["metrics"], float(finished["metrics"].get("seconds", 0.0))
        else:
            aside = _clear(cfg, stage, uri, attempt, hashed, force)
            folder = storage.open_for_writing(uri)
            if aside is not None and on_set_aside is not None and folder.on_disk:
                on_set_aside(Path(uri), Path(aside))
            _write_attempt(uri, attempt)
            t0 = time.perf_counter()
            metrics = body(folder)
            folder.flush(f"{CHECKSUMS}/_driver.json")  # the staged files, with their checksums (the commit trusts them)
            seconds = time.perf_counter() - t0
            metrics = {**metrics, "seconds": round(seconds, 3)}
            try:  # from here on a failed commit is redone without the work
                _write_attempt(uri, {**attempt, "finished": {"metrics": metrics}})
            except (OSError, StorageError):
                pass  # the commit below is tried all the same; if it fails too, a rerun redoes the work
            folder.close()
        _commit(held, uri, stage, digest, input_hashes, metrics, hashed)
    return StageResult(stage.name, uri, skipped=False, metrics=metrics, seconds=seconds, kept_aside=aside)


def _finished(uri: str, attempt: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a body that finished for this config and inputs in an uncommitted folder, or None."""
    if read_manifest(uri) is not None:
        return None
    found = _read_attempt(uri)
    if not found or {k: found.get(k) for k in attempt} != attempt or not isinstance(found.get("finished"), dict):
        return None
    metrics = found["finished"].get("metrics")
    return {"metrics": metrics} if isinstance(metrics, dict) else None


def _commit(held: lease.Lease, uri: str, stage: Stage, digest: str, input_hashes: dict[str, str],
            metrics: dict[str, Any], hashed: dict[str, Any]) -> None:
    """Write the manifest (the commit), then remove the attempt marker; a failed commit keeps the marker, so
    the next run commits the same files instead of redoing the work."""
    held.check()
    try:
        write_manifest(uri, stage.name, digest, input_hashes, metrics, config=hashed)
    except (OSError, StorageError) as e:
        raise StorageError(f"{storage.join(uri, MANIFEST)}: the commit failed ({storage.one_line(e)}); the "
                           f"outputs and {ATTEMPT} are kept: rerun to commit them without redoing the work") from e
    try:
        storage.remove_file(storage.join(uri, ATTEMPT))
    except OSError:  # committed: a leftover marker is never listed and never read once a manifest is there
        pass


def _clear(cfg: PipelineConfig, stage: Stage, uri: str, attempt: dict[str, Any], hashed: dict[str, Any],
           force: bool) -> str | None:
    """Make room for a run: keep a committed or foreign partial folder aside (returns where), or leave a
    partial folder of this very attempt in place to be resumed."""
    if stage.record_only and storage.exists(uri):
        storage.remove_tree(uri)
    if not storage.exists(uri):
        return None
    committed = read_manifest(uri)
    if committed is not None:
        why = _why_stale(committed, hashed, attempt["inputs"], force)
        if cfg.on_change == "refuse" and not force:
            raise StaleOutputError(f"{uri}: committed for another config ({why}); rerun with --force "
                                   "(the committed folder is kept aside) or set on_change: keep")
        aside = set_aside(uri)
        print(f"{stage.name}: {why}; the committed output was kept at {aside}", flush=True)
        return aside
    found = _read_attempt(uri)
    if stage.resumable and not force and found is not None and {k: found.get(k) for k in attempt} == attempt:
        return None
    aside = set_aside(uri)  # no manifest here (an unreadable one stopped the stage above): nothing half-committed
    print(f"{stage.name}: an unfinished run of another config was moved to {aside}", flush=True)
    return aside
