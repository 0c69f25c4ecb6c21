"""Reading the data stage's packed shards: Ray Data for Train workers, pyarrow when Ray is absent.

Order is deterministic (Ray Data's `preserve_order`), and every worker reads the same stream of
global micro-batches and keeps its own rank's rows. That makes the data position one integer (global
micro-batches consumed this epoch), so a resumed run neither repeats nor skips a batch, and a step
consumes the same rows whatever the split between micro-batches and accumulation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

COLUMN = "input_ids"


def shard_files(data_dir: str | Path, split: str) -> list[str]:
    """Sorted parquet shards of `data/packed/<split>/`."""
    return sorted(str(p) for p in (Path(data_dir) / "packed" / split).glob("*.parquet"))


def stack_ids(batch: dict[str, Any]) -> Any:
    """`collate_fn` for `iter_torch_batches`: a list<int32> column arrives as an object array of rows."""
    import torch

    ids = batch[COLUMN]
    if ids.dtype == object:
        ids = np.stack(ids)
    return torch.from_numpy(ids.astype(np.int64, copy=False))


def ray_datasets(data_dir: str | Path) -> dict[str, Any]:
    """Lazy Ray datasets over the train and val shards (val only when it has shards). Under Ray Train the
    order is kept by the trainer's `DataConfig(execution_options=...)`, which replaces these options."""
    import ray.data

    out = {}
    for split in ("train", "val"):
        files = shard_files(data_dir, split)
        if not files:
            continue
        ds = ray.data.read_parquet(files, columns=[COLUMN], shuffle=None)
        ds.context.execution_options.preserve_order = True
        out[split] = ds
    return out


def parquet_batches(files: list[str], rows: int) -> Iterator[Any]:
    """Global micro-batches of `rows` sequences straight from parquet (no Ray): one epoch, last partial
    batch dropped, streaming one record batch at a time."""
    import pyarrow.parquet as pq
    import torch

    pending: list[np.ndarray] = []
    have = 0
    for path in files:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=max(rows, 256), columns=[COLUMN]):
            col = rb.column(0)
            arr = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)
            pending.append(arr)
            have += len(arr)
            while have >= rows:
                block = np.concatenate(pending)
                yield torch.from_numpy(block[:rows].astype(np.int64))
                pending, have = [block[rows:]], len(block) - rows


def synthetic_batches(vocab: int, seq_len: int, rows: int, batches: int, seed: int = 0) -> Iterator[Any]:
    """Random token batches (benchmarks without a data stage)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        yield torch.randint(0, vocab, (rows, seq_len), generator=gen)
