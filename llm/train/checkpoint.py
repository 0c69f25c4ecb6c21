"""Checkpoints: DeepSpeed's own `save_checkpoint` plus the loop's position and each rank's RNG, each rank's
part committed by a file list written last, and a checkpoint loaded only when every part is whole.

Layout of one checkpoint folder (every rank writes its part: into the folder itself on a disk, into a
node-local copy that Ray Train uploads with an object store):
    ds/              DeepSpeed tag folder: model, optimizer (ZeRO partitions per rank)
    latest           DeepSpeed's pointer to the tag
    zero_to_fp32.py  DeepSpeed's consolidation script (rank 0 copies it in)
    loop_state.json  step, epoch, data position, tokens seen, world size (rank 0)
    rng_rank<r>.pt   torch CPU/CUDA generator states of rank r
    rng_rank<r>.json python `random` state of rank r
    _COMMIT_rank<r>.json  every file rank r wrote with size and sha256, written last by that rank
    ds_universal/    added when a run resumes its own checkpoint with another world size: DeepSpeed's
                     universal form of `ds/` (written once, under a temporary name then renamed; `ds/` itself
                     is never changed). A checkpoint continued on purpose (`init_from`) is converted into the
                     continuing stage's folder instead, never into its source.

Rank r's part: `rng_rank<r>.*` and DeepSpeed's `*zero_pp_rank_<r>_*` files; every other file is rank 0's
(`owner`). A rank loading a checkpoint reads its own ZeRO files and the shared ones (`reads`): from an object
store it downloads only those (`reading`), all of `ds/` when another world size must convert it.

A checkpoint is whole when the commit files of ranks 0..world_size-1 are all there and every file they
list has its recorded size and checksum. Anything else (a kill during the copy into storage, a truncated
or edited file) makes it damaged: the run names the file, sets the folder aside and loads the previous one.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm import storage
from llm.errors import TrainingError
from llm.manifest import file_sha256
from llm.train.ds_config import import_deepspeed
from llm.train.state import LoopState

TAG = "ds"
UNIVERSAL = "ds_universal"
COMMIT = "_COMMIT_rank{rank}.json"
DAMAGED_SUFFIX = ".damaged"


def save(engine: Any, folder: str | Path, state: LoopState, rank: int) -> None:
    """Write this rank's part of a checkpoint into `folder` (every rank calls this: ZeRO saves collectively)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMMIT.format(rank=rank)).unlink(missing_ok=True)  # left by a worker group that died writing it
    engine.save_checkpoint(str(folder), tag=TAG, client_state={"loop_state": state.to_json()})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / f"rng_rank{rank}.pt")
    (folder / f"rng_rank{rank}.json").write_text(json.dumps(random.getstate()))
    if rank == 0:
        (folder / "loop_state.json").write_text(json.dumps(state.to_json()))
    commit_part(folder, rank)


_RANK_FILE = re.compile(r"(?:^|/)(?:rng_rank(\d+)\.[a-z]+|[^/]*zero_pp_rank_(\d+)_[^/]*)$")


def owner(rel: str) -> int:
    """The rank whose part of a checkpoint the file `rel` is: r for `rng_rank<r>.*` and DeepSpeed's
    `*zero_pp_rank_<r>_*` files (ZeRO partitions, ZeRO-3 model states); 0 for the rest (loop state, `latest`,
    the model states of ZeRO < 3, `zero_to_fp32.py`), which rank 0 writes."""
    m = _RANK_FILE.search(rel)
    return int(m.group(1) or m.group(2)) if m else 0


def commit_part(folder: Path, rank: int) -> None:
    """Record every file of this rank's part in `folder`, last (the other ranks may be writing theirs into the
    same folder meanwhile: only this rank's own files are listed)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.name.startswith("_COMMIT_") and owner(rel) == rank and p.is_file():
            files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    tmp = folder / (COMMIT.format(rank=rank) + ".tmp")
    tmp.write_text(json.dumps({"rank": rank, "files": files}, sort_keys=True))
    tmp.replace(folder / COMMIT.format(rank=rank))


def verify(folder: str | Path, checksums: bool = True, reads: Callable[[str], bool] | None = None) -> str | None:
    """None when the checkpoint in `folder` (local or in an object store) is whole, else one line naming the
    file and what is wrong. With `reads` (`reads(rank, convert)`), only the files it selects are checked: a
    rank's own copy of its part."""
    try:
        state = json.loads(storage.read_bytes(storage.join(folder, "loop_state.json")))
        world = int(state.get("world_size", 1))
    except FileNotFoundError:
        return "loop_state.json: missing"
    except (OSError, ValueError, TypeError) as e:
        return f"loop_state.json: unreadable ({e})"
    present = storage.list_files(folder)
    for rank in range(world):
        commit = COMMIT.format(rank=rank)
        try:
            files = json.loads(storage.read_bytes(storage.join(folder, commit)))["files"]
        except FileNotFoundError:
            return f"{commit}: missing (rank {rank}'s part was never committed)"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{commit}: unreadable ({e})"
        for rel, meta in files.items():
            if reads is not None and not reads(rel):
                continue
            size = present.get(rel)
            if size is None:
                return f"{rel}: missing"
            if size != meta["size"]:
                return f"{rel}: {size:,} bytes, {meta['size']:,} were written"
            if checksums and storage.sha256(storage.join(folder, rel)) != meta["sha256"]:
                return f"{rel}: checksum differs from the one recorded at save"
    return None


def step_of(folder: str | Path) -> int:
    """The loop step a checkpoint folder was saved at (-1 when unreadable)."""
    try:
        return int(json.loads(storage.read_bytes(storage.join(folder, "loop_state.json")))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


@dataclass
class Choice:
    """The checkpoint a run resumes from, and the damaged ones passed over on the way."""

    path: str | None
    step: int
    damaged: list[tuple[str, str]]
    """(folder, problem) of each newer checkpoint that was not whole."""


def candidates(root: str | Path) -> list[str]:
    """Checkpoint folders (paths or store URIs) of every Ray Train attempt under `root`, newest step first."""
    found = [storage.join(root, attempt, name) for attempt in storage.subfolders(root)
             for name in storage.subfolders(storage.join(root, attempt))
             if name.startswith("checkpoint_") and not name.endswith((DAMAGED_SUFFIX, ".tmp"))]
    return sorted(found, key=lambda p: (step_of(p), p), reverse=True)


def choose(root: str | Path, set_aside: bool = False, checksums: bool = True) -> Choice:
    """The newest whole checkpoint under `root`; with `set_aside`, damaged ones are renamed `<name>.damaged`
    so that no later attempt tries them again (never deleted: the bytes may matter to whoever debugs it)."""
    damaged: list[tuple[str, str]] = []
    for folder in candidates(root):
        problem = verify(folder, checksums)
        if problem is None:
            return Choice(str(folder), step_of(folder), damaged)
        if set_aside:
            aside = f"{folder}{DAMAGED_SUFFIX}"
            storage.move_tree(folder, aside)
            damaged.append((str(aside), problem))
        else:
            damaged.append((str(folder), problem))
    return Choice(None, 0, damaged)


def prune(root: str | Path, keep: int) -> list[str]:
    """Delete whole checkpoints beyond the newest `keep` across attempts (Ray Train prunes only within one
    attempt); damaged ones stay set aside. Returns the deleted folders."""
    whole = [p for p in candidates(root) if verify(p, checksums=False) is None]
    gone = []
    for folder in whole[keep:]:
        storage.remove_tree(folder)
        gone.append(str(folder))
    return gone


def read_state(folder: str | Path) -> LoopState:
    """The loop state a checkpoint folder was saved with (step, epoch, position, world size, ...)."""
    return LoopState.from_json(json.loads(storage.read_bytes(storage.join(folder, "loop_state.json"))))


def partitioned(folder: str | Path) -> bool:
    """Whether the optimizer state is split across the saving ranks (ZeRO >= 1): then another world size
    loads it only through DeepSpeed's universal format; ZeRO-0 keeps it whole in the model-states file."""
    return any(rel.endswith("optim_states.pt") for rel in storage.list_files(storage.join(folder, TAG)))


def converts(folder: str | Path, world_size: int) -> bool:
    """Whether a fit of `world_size` ranks loads `folder` through DeepSpeed's universal form (saved by another
    world size, optimizer state partitioned)."""
    saved = read_state(folder).world_size or world_size
    return saved != world_size and partitioned(folder)


def reads(rank: int, convert: bool) -> Callable[[str], bool]:
    """Which files of a checkpoint rank `rank` reads when it loads it: its own ZeRO files, the shared ones
    (model states of ZeRO < 3, `latest`), the loop state, its RNG and every rank's commit list; with
    `convert`, every file of `ds/` (the conversion to the universal form reads all ranks' partitions)."""

    def wanted(rel: str) -> bool:
        if rel.startswith(f"{TAG}/"):
            return convert or owner(rel) == rank or "zero_pp_rank_" not in rel
        if rel.startswith(f"{UNIVERSAL}/") or "/" in rel:  # a conversion is made where it is read, not fetched
            return False
        return rel in ("loop_state.json", "latest") or rel.startswith("_COMMIT_rank") or (
            rel.startswith("rng_rank") and owner(rel) == rank)

    return wanted


@contextlib.contextmanager
def reading(folder: str | Path, rank: int, world_size: int, under: str | Path | None = None) -> Iterator[Path]:
    """The checkpoint `folder` as a local folder holding what rank `rank` of a `world_size`-rank fit reads,
    for the length of the block: the folder itself on a disk (read in place); from an object store a copy of
    only those files (`reads`) under `under`, checked against the commit lists (sizes and sha256) and removed
    afterwards. A copy that is not what was written raises `TrainingError` naming the file."""
    wanted = reads(rank, converts(folder, world_size))

    def check(copy: Path) -> None:
        problem = verify(copy, checksums=True, reads=wanted)
        if problem:
            raise TrainingError(f"{folder}: rank {rank}'s download of the checkpoint: {problem}")

    with storage.reading(folder, keep=wanted, under=under, check=check) as local:
        yield local


def universal(folder: str | Path, rank: int, into: str | Path | None = None) -> tuple[str, str]:
    """(load folder, tag) of `folder`'s checkpoint in DeepSpeed's universal format, which every rank loads
    with `checkpoint.load_universal` in its DeepSpeed config, whatever the world size.

    Rank 0 converts it once into `<into>/ds_universal` (`deepspeed.checkpoint.ds_to_universal`; default
    `into`: `folder` itself, a checkpoint of the continuing stage, so that a later resume from it reuses the
    conversion) while the other ranks wait. A rank that then does not see it reads a copy of its own (the
    checkpoint came from an object store, each rank downloaded it) or converts into a folder of its own, and
    converts that itself. The conversion writes `ds_universal.tmp-<pid>` and renames it: a kill mid-way leaves
    a temporary folder the next attempt replaces, never a half-converted `ds_universal`.
    """
    import torch.distributed as dist

    base = Path(into or folder)
    target = base / UNIVERSAL
    if rank == 0 and not (target / "zero").is_dir():
        _convert(Path(folder), target)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    if not (target / "zero").is_dir():  # this rank reads its own copy (an object store's download): convert it
        _convert(Path(folder), target)
    return str(base), UNIVERSAL


def _convert(folder: Path, target: Path) -> None:
    import argparse
    import contextlib
    import io
    import os
    import shutil

    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    tmp = target.with_name(f"{UNIVERSAL}.tmp-{os.getpid()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    for stale in target.parent.glob(f"{UNIVERSAL}.tmp-*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(folder / TAG), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # transformers models carry no UNIVERSAL_CHECKPOINT_INFO of their own (no TP)
                              inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # its step-by-step prints; kept for an error message
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = " | ".join(log.getvalue().strip().splitlines()[-3:])
        raise RuntimeError(f"{folder / TAG}: conversion to DeepSpeed's universal checkpoint failed: {e} "
                           f"({tail})") from e
    if target.exists():  # converted meanwhile by another attempt: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)


def load(engine: Any, folder: str | Path, rank: int, source: tuple[str, str] | None = None) -> LoopState:
    """Restore model, optimizer, loop position and this rank's RNG from `folder`; `source` is where
    DeepSpeed reads the model and optimizer (`universal(...)` for another world size; default: `folder`'s
    own `ds`). Returns the loop state."""
    import torch

    folder = Path(folder)
    load_dir, tag = source or (str(folder), TAG)
    path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"{folder}: DeepSpeed found no checkpoint to load")
    state = LoopState.from_json(json.loads((folder / "loop_state.json").read_text()))
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.exists():  # a different world size restores the model but not per-rank RNG streams
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        version, internal, gauss = json.loads((folder / f"rng_rank{rank}.json").read_text())
        random.setstate((version, tuple(internal), gauss))
    return state


def consolidate_fp32(folder: str | Path) -> dict[str, Any]:
    """Full fp32 weights from a checkpoint folder with DeepSpeed's own `zero_to_fp32` (any ZeRO stage >= 1)."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG))


def resume_detail(folder: str) -> str:
    """For `llmray status`: the step an interrupted training stage's folder resumes from."""
    choice = choose(storage.join(folder, "ray"), checksums=False)
    if choice.path:
        return f"resumable from step {choice.step}"
    return "interrupted before its first checkpoint; a rerun starts it over"
