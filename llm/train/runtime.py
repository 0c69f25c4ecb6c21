"""Where the one loop runs: inside a Ray Train worker, or in one process without Ray.

A runtime supplies rank, world size, device and node; the checkpoint to resume from; and where a
checkpoint and its metrics are reported. Data is not the runtime's business: every rank reads its own
slice of the shards (`llm.train.data`), the same way under both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
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
        """The newest checkpoint reported in this fit (after a worker-group restart), if any."""
        ...

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        """Hand the step's metrics (and with `folder`, this rank's part of a checkpoint) to the driver."""
        ...


class RayRuntime:
    """Inside a Ray Train worker: its rank, device, report and the run's latest reported checkpoint."""

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

    @contextlib.contextmanager
    def reported_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None:
            yield None
            return
        with found.as_directory() as folder:
            yield folder

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        if self.publish_each:  # before the report: a scheduler may stop the trial on hearing it
            self._publish()
        ray.train.report(metrics, checkpoint=checkpoint)
        if folder and not self.publish_each:
            self._publish()

    def _publish(self) -> None:
        if self.publish and self.rank == 0:
            local, store = self.publish
            if (Path(local) / "metrics.jsonl").exists():
                storage.write_bytes(storage.join(store, "metrics.jsonl"), (Path(local) / "metrics.jsonl").read_bytes())


class LocalRuntime:
    """One process, no Ray: checkpoints go to `<checkpoint_root>/local/checkpoint_<step>`, reports to a list."""

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

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        self.reports.append(metrics)
        if not (folder and self.checkpoint_root):
            return
        # Copy under a temporary name, then rename: a kill mid-copy leaves a `.tmp` folder that no
        # reader picks, never a folder mixing two steps.
        dest = Path(self.checkpoint_root) / "local" / f"checkpoint_{int(metrics['step']):08d}"
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        ckpt.prune(self.checkpoint_root, self.keep)


def free_port() -> int:
    """A TCP port free on this machine now (for torch.distributed's rendezvous in one process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
