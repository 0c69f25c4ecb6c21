"""Where the one loop runs: inside a Ray Train worker, or in one process without Ray.

A runtime supplies rank, world size, device and node; the checkpoint to resume from; and where a
checkpoint and its metrics are reported. Data is not the runtime's business: every rank reads its own
slice of the shards (`llm.train.data`), the same way under both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.train import checkpoint as ckpt


class RayRuntime:
    """Inside a Ray Train worker: its rank, device, report and the run's latest reported checkpoint."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node = ray.get_runtime_context().get_node_id()

    @contextlib.contextmanager
    def reported_checkpoint(self) -> Iterator[str | None]:
        """The newest checkpoint reported in this fit (after a worker-group restart), if any."""
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
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalRuntime:
    """One process, no Ray: checkpoints go to `<checkpoint_root>/local/checkpoint_<step>`, reports to a list."""

    def __init__(self, checkpoint_root: str | None = None, keep: int = 2, device: Any = None) -> None:
        import torch

        self.rank, self.world_size, self.node = 0, 1, "local"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint_root, self.keep = checkpoint_root, keep
        self.reports: list[dict[str, Any]] = []
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
