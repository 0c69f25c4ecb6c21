"""Where the one loop runs: inside a Ray Train worker, or in one process without Ray.

A runtime supplies rank, world size, device and node; the checkpoint to resume from; where a rank writes
its part of a checkpoint (in place on the stage's volume: no copy through /tmp) and where a checkpoint and
its metrics are reported. Data is not the runtime's business: every rank reads its own
slice of the shards (`llm.train.data`), the same way under both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from llm import storage
from llm.train import checkpoint as ckpt


class Runtime(Protocol):
    """What the loop asks of the process it runs in."""

    rank: int
    world_size: int
    device: Any
    """A `torch.device`."""
    node: str

    def reported_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """The newest whole checkpoint reported in this fit (after a worker-group restart), if any, as a local
        folder holding what this rank reads of it (`checkpoint.reading`)."""
        ...

    def checkpoint_folder(self, step: int) -> contextlib.AbstractContextManager[str]:
        """The folder this rank writes its part of step `step`'s checkpoint into, then `report`s (the same
        folder on every rank when they share a disk)."""
        ...

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        """Hand the step's metrics (and with `folder`, from `checkpoint_folder`, the step's checkpoint) to the
        driver."""
        ...


class RayRuntime:
    """Inside a Ray Train worker: its rank, device, report and the run's latest reported checkpoint.

    Checkpoints: with the run's storage on a disk, every rank writes its part straight into
    `<attempt>/checkpoint_<step>` and reports it where it is (`CheckpointUploadMode.NO_UPLOAD`); with an object
    store, into a folder on this node's disk (`scratch`) that Ray Train uploads, removed right after.
    """

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node: str = ray.get_runtime_context().get_node_id()
        self.publish: tuple[str, str] | None = None
        """(local out_dir, store URI): with an object store, rank 0's metrics.jsonl is uploaded at each
        checkpoint so the driver's view (and a restart) sees the records up to it."""
        self.publish_each = False
        """Upload metrics.jsonl before every report, not only at checkpoints (`LoopSpec.publish_each`)."""
        self.scratch = storage.cache_dir() / "scratch" / f"pid{os.getpid()}"
        """A folder on this node's disk for checkpoints written before their upload and downloaded to be read
        (object stores only); `llm.train.worker` puts it beside the stage's node-local working folder."""
        self.run_storage = ctx.get_storage()
        """Ray Train's storage context: where this run's checkpoints go (`experiment_fs_path`)."""

    @contextlib.contextmanager
    def reported_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None:
            yield None
            return
        uri = storage.ray_uri(found.filesystem, found.path)
        # Every rank decides on the same listing (sizes, commit lists), then reads only its own part.
        if ckpt.verify(uri, checksums=False) is not None:  # not whole: the stage's own choice instead
            yield None
            return
        with ckpt.reading(uri, self.rank, self.world_size, self.scratch) as folder:
            yield str(folder)

    @contextlib.contextmanager
    def checkpoint_folder(self, step: int) -> Iterator[str]:
        import torch.distributed as dist

        name = checkpoint_name(step)
        run = self.run_storage
        final = storage.disk_path(run.storage_filesystem, run.build_checkpoint_path_from_name(name))
        if final is not None:
            if self.rank == 0:  # a worker group that died writing this step left it; it was never reported
                shutil.rmtree(final, ignore_errors=True)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()
            yield str(final)
            return
        staging = Path(self.scratch) / name
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            yield str(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        import ray.train

        if self.publish_each:  # before the report: a scheduler may stop the trial on hearing it
            self._publish()
        fs = self.run_storage.storage_filesystem
        if folder is None:
            ray.train.report(metrics)
        elif storage.disk_path(fs, folder) is not None:  # written in place: Ray Train registers it where it is
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint(folder, fs),
                             checkpoint_dir_name=Path(folder).name,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        else:  # this node's copy: uploaded by Ray Train now (`checkpoint_folder` removes it after)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        if folder and not self.publish_each:
            self._publish()

    def _publish(self) -> None:
        if self.publish and self.rank == 0:
            local, store = self.publish
            if (Path(local) / "metrics.jsonl").exists():
                storage.write_bytes(storage.join(store, "metrics.jsonl"), (Path(local) / "metrics.jsonl").read_bytes())


class LocalRuntime:
    """One process, no Ray: checkpoints go to `<checkpoint_root>/local/checkpoint_<step>` (written under
    `<name>.tmp` there, renamed when reported), reports to a list."""

    def __init__(self, checkpoint_root: str | None = None, keep: int = 2, device: Any = None) -> None:
        import torch

        self.rank, self.world_size, self.node = 0, 1, "local"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint_root, self.keep = checkpoint_root, keep
        self.reports: list[dict[str, Any]] = []
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                           ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)

    @contextlib.contextmanager
    def reported_checkpoint(self) -> Iterator[str | None]:
        yield None  # a new process: the stage chose the checkpoint to resume from (`LoopSpec.resume_from`)

    @contextlib.contextmanager
    def checkpoint_folder(self, step: int) -> Iterator[str]:
        if not self.checkpoint_root:  # nowhere to keep it
            with tempfile.TemporaryDirectory(prefix="llmray-ckpt-") as scratch:
                yield scratch
            return
        # Written under a temporary name beside its final one, renamed by `report`: a kill mid-write leaves a
        # `.tmp` folder that no reader picks, never a folder mixing two steps.
        tmp = Path(self.checkpoint_root) / "local" / f"{checkpoint_name(step)}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield str(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when reported

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        self.reports.append(metrics)
        if not (folder and self.checkpoint_root):
            return
        dest = Path(folder).with_name(Path(folder).name.removesuffix(".tmp"))
        if dest.exists():
            shutil.rmtree(dest)
        Path(folder).rename(dest)
        ckpt.prune(self.checkpoint_root, self.keep)


def checkpoint_name(step: int) -> str:
    """A checkpoint folder's name (`checkpoint_` first: `checkpoint.candidates` lists those)."""
    return f"checkpoint_{step:08d}"


def free_port() -> int:
    """A TCP port free on this machine now (for torch.distributed's rendezvous in one process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
