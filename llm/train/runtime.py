"""Where the one loop runs: inside a Ray Train worker, or in one process without Ray.

A runtime supplies rank, world size, device and node; the checkpoint to resume from; and where a
checkpoint and its metrics are reported. Data is not the runtime's business: every rank reads its own
slice of the shards (`llm.train.data`), the same way under both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
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
        self.publish: tuple[str, str] | None = None
        """(local out_dir, store URI): with an object store, rank 0's metrics.jsonl is uploaded at each
        checkpoint so the driver's view (and a restart) sees the records up to it."""
        self.publish_each = False
        """Upload metrics.jsonl before every report, not only at checkpoints (a sweep trial: `extra.publish`)."""

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
        if self.publish_each:  # before the report: a scheduler may stop the trial on hearing it
            self._publish()
        ray.train.report(metrics, checkpoint=checkpoint)
        if folder and not self.publish_each:
            self._publish()

    def _publish(self) -> None:
        if self.publish and self.rank == 0:
            from llm import storage

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


def store_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point when the stage folder is in an object store (`config["extra"]["store"]`).

    Inputs a library needs on disk (the tokenizer, a base model) are copied from the store into this node's
    cache; the loop writes its outputs (metrics.jsonl, ranks/, model/) to a node-local folder, and this
    rank uploads what it wrote there into the store, so nothing depends on which node rank 0 ran on.
    Checkpoints go to the store through Ray Train's `storage_path`.
    """
    from llm import storage
    from llm.train.loop import LoopSpec, run_loop

    spec = LoopSpec(**config)
    store = spec.extra["store"]
    if spec.tokenizer_dir and storage.is_remote(spec.tokenizer_dir):
        spec.tokenizer_dir = str(storage.cached_copy(spec.tokenizer_dir))
    if spec.model.get("path") and storage.is_remote(spec.model["path"]):
        spec.model = {**spec.model, "path": str(storage.cached_copy(spec.model["path"]))}
    rt = RayRuntime()
    if spec.out_dir:  # one folder per rank: ranks sharing a node never upload each other's half-written files
        spec.out_dir = str(Path(spec.out_dir) / f"rank{rt.rank}")
        shutil.rmtree(spec.out_dir, ignore_errors=True)  # a node reused by a restarted group: no stale files
        Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
        records = storage.join(store, "metrics.jsonl")
        if rt.rank == 0 and storage.size(records) is not None:  # a resumed run appends to the stored records
            (Path(spec.out_dir) / "metrics.jsonl").write_bytes(storage.read_bytes(records))
        rt.publish = (spec.out_dir, store)
        rt.publish_each = spec.extra.get("publish") == "report"
    with tempfile.TemporaryDirectory(prefix="llmray-resume-") as tmp:
        for name in ("resume_from", "init_checkpoint"):  # every rank copies the checkpoint to its own node
            uri = getattr(spec, name)
            if uri and storage.is_remote(uri):
                setattr(spec, name, str(storage.download(uri, Path(tmp) / name)))
        run_loop(spec, rt)
    if spec.out_dir:
        storage.upload(spec.out_dir, store)
