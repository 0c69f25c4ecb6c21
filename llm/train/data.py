"""Reading training rows: each worker reads only its own slice of the parquet shards, and resume seeks.

The global order is the sorted shards' rows in order. Each epoch, rank r of W owns the contiguous slice
[r*L, (r+1)*L) of that order, L = rows // W, and consumes it `micro` rows at a time. The data position is
one integer, micro-batches consumed this epoch, the same on every rank (they step together), so a resumed
run starts reading at (shard, row) = where that position falls, found from parquet footers alone: it
neither re-reads nor skips a batch, and ingest per worker shrinks as workers are added.

A run resumed with a different world size (M ranks after N) first finishes the interrupted epoch: the
micro-batches the N ranks had not read yet, in the N-run's step order (step, old rank, accumulation
index), dealt round-robin to the M ranks (`rest_layout`). With the global batch kept (M x accumulation =
N x accumulation), every optimizer step of the resumed run reads exactly the rows the same step of an
uninterrupted N-rank run reads, to the end of that epoch (after an epoch end inside one step, the rows of
the epoch's tail only; fewer than M micro-batches left over are dropped, as every epoch drops its
remainder). From the next epoch on, the order is an uninterrupted M-rank run's. Those scattered
micro-batches are read through a small cache of decoded row groups, so each is decoded about once.

Why not Ray Data here: a Ray Data stream cannot start at a row without reading up to it, its
`streaming_split` order is not reproducible, and each worker's own read pipeline cost ~20 s of task
start-up on a small machine. The data stage writes these shards with Ray Data; training reads them with
pyarrow on a background thread, which also works on `s3://` paths.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from llm import storage
from llm.train.state import Layout, LoopState

COLUMN = "input_ids"
Collate = Callable[[dict[str, list[Any]]], Any]


def shard_files(data_dir: str | Path, split: str, kind: str = "packed") -> list[str]:
    """Sorted parquet shards of `data/<kind>/<split>/`."""
    return sorted(str(p) for p in (Path(data_dir) / kind / split).glob("*.parquet"))


def data_shards(data: storage.Folder, split: str, kind: str = "packed") -> list[str]:
    """The parquet shards of `<data>/<kind>/<split>/`, as paths or store URIs (pyarrow reads either)."""
    return sorted(data.path(kind, split, rel) for rel in data.list(kind, split)
                  if rel.endswith(".parquet") and "/" not in rel)


@dataclass(frozen=True)
class ShardIndex:
    """Row counts per shard and per row group, read from parquet footers (no data read)."""

    files: list[str]
    groups: list[list[int]]
    """Rows of each row group, per file."""

    @classmethod
    def of(cls, files: list[str]) -> ShardIndex:
        import pyarrow.parquet as pq

        groups = []
        for f in files:
            meta = pq.ParquetFile(f).metadata
            groups.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        return cls(list(files), groups)

    @property
    def rows(self) -> int:
        return sum(sum(g) for g in self.groups)

    def locate(self, row: int) -> tuple[int, int]:
        """(shard index, row within the shard) of a global row."""
        for i, groups in enumerate(self.groups):
            n = sum(groups)
            if row < n:
                return i, row
            row -= n
        return len(self.files), 0


@dataclass(frozen=True)
class RankSlice:
    """What one rank reads in an epoch: its slice of the global order, in micro-batches; or, for an epoch
    that another world size began, its share of that epoch's unread micro-batches (`layout`)."""

    index: ShardIndex
    rank: int
    world: int
    micro: int
    layout: Layout | None = field(default=None, compare=False)
    """A `rest_layout` for the current epoch only; None: contiguous slices."""

    @property
    def slice_rows(self) -> int:
        return self.index.rows // self.world

    @cached_property
    def starts(self) -> Any:
        """First global row of each of this rank's micro-batches this epoch, in reading order."""
        return batch_starts(self.index.rows, self.layout, self.world, self.rank, self.micro)

    @property
    def batches_per_epoch(self) -> int:
        return self.slice_rows // self.micro if self.layout is None else len(self.starts)

    def next_epoch(self) -> RankSlice:
        return self if self.layout is None else replace(self, layout=None)

    def start_row(self, position: int) -> int:
        """Global row of this rank's next micro-batch after `position` micro-batches this epoch."""
        if self.layout is not None:
            return int(self.starts[position]) if position < len(self.starts) else self.index.rows
        return self.rank * self.slice_rows + position * self.micro

    def where(self, position: int) -> dict[str, Any]:
        """(shard, row) of this rank's next batch: what a checkpoint records for people to read."""
        shard, row = self.index.locate(self.start_row(position))
        name = Path(self.index.files[shard]).name if shard < len(self.index.files) else None
        return {"shard": name, "row": row}


def batch_starts(rows: int, layout: Layout | None, world: int, rank: int, micro: int) -> Any:
    """First rows of the micro-batches `rank` of `world` reads in an epoch of `rows` rows laid out by `layout`."""
    if layout is None:
        per = rows // world
        return rank * per + np.arange(per // micro, dtype=np.int64) * micro
    old_world, accum, position = layout.world, layout.accum, layout.position
    rest = np.stack([batch_starts(rows, layout.parent, old_world, r, micro)[position:] for r in range(old_world)])
    n = rest.shape[1]
    # The old run's order from the resume point: its step, then its rank, then the accumulation index.
    i = np.arange(n)
    key = ((i // accum)[None, :] * old_world + np.arange(old_world)[:, None]) * accum + (i % accum)[None, :]
    order = rest.reshape(-1)[np.argsort(key.reshape(-1), kind="stable")]
    # Round-robin: new step k reads entries [k*M*a', (k+1)*M*a') whatever the new accumulation a' is.
    usable = len(order) - len(order) % world
    return order[:usable][rank::world]


def rest_layout(rows: int, saved: LoopState, world: int, micro: int) -> tuple[int, int, Layout | None]:
    """(epoch, position, layout) for `world` ranks continuing a run saved with `saved` by another world size.

    `saved` holds the `epoch`, `position` (micro-batches each old rank read this epoch), `world_size`,
    `accum` and `layout` (the epoch's own layout, if a world change began it too). The rest of that epoch
    is read as described in the module docstring; an epoch with nothing left goes on to the next one.
    """
    epoch = saved.epoch
    layout = Layout(int(saved.world_size or 1), int(saved.accum or 1), saved.position, saved.layout)
    if len(batch_starts(rows, layout, world, 0, micro)) == 0:
        return epoch + 1, 0, None
    return epoch, 0, layout


def read_rows(index: ShardIndex, start: int, stop: int, columns: list[str]) -> Iterator[dict[str, list[Any]]]:
    """Global rows [start, stop) as column dicts, one row group at a time; row groups before `start` are
    skipped from the footer's counts, never read."""
    import pyarrow.parquet as pq

    base = 0
    for path, groups in zip(index.files, index.groups, strict=True):
        if base >= stop:
            return
        if base + sum(groups) <= start:
            base += sum(groups)
            continue
        pf = pq.ParquetFile(path)
        for g, n in enumerate(groups):
            lo, hi = max(start - base, 0), min(stop - base, n)
            if lo < hi:
                table = pf.read_row_group(g, columns=columns).slice(lo, hi - lo)
                yield {c: table.column(c).to_pylist() if c != COLUMN else _ids(table.column(c)) for c in columns}
            base += n
            if base >= stop:
                return


def _ids(col: Any) -> Any:
    """A list<int32> column as a list of numpy rows without a Python object per token."""
    chunks = col.chunks if hasattr(col, "chunks") else [col]
    rows: list[Any] = []
    for chunk in chunks:
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy(zero_copy_only=False)
        rows.extend(values[offsets[i]:offsets[i + 1]] for i in range(len(chunk)))
    return rows


def micro_batches(part: RankSlice, epoch: int, position: int, collate: Collate, columns: list[str],
                  prefetch: int = 4) -> Iterator[tuple[int, int, Any]]:
    """(epoch, position after this batch, collated batch) forever, from `position` of `epoch` on; a
    background thread reads ahead `prefetch` batches (pyarrow decodes without the GIL)."""
    if part.next_epoch().batches_per_epoch < 1:
        raise RuntimeError(f"train split has {part.index.rows} rows, fewer than micro_batch_size x workers "
                           f"({part.micro} x {part.world})")
    q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
        e, pos, cur = epoch, position, part
        try:
            while not stop.is_set():
                if cur.layout is not None:  # the rest of an epoch another world size began
                    for batch in _scattered(cur, pos, columns, stop):
                        pos += 1
                        q.put((e, pos, collate(batch)))
                    e, pos, cur = e + 1, 0, cur.next_epoch()
                    continue
                lo = cur.start_row(pos)
                hi = cur.start_row(cur.batches_per_epoch)
                pending: dict[str, list[Any]] = {c: [] for c in columns}
                for block in read_rows(cur.index, lo, hi, columns):
                    if stop.is_set():
                        return
                    for c in columns:
                        pending[c].extend(block[c])
                    while len(pending[columns[0]]) >= cur.micro and not stop.is_set():
                        batch = {c: v[:cur.micro] for c, v in pending.items()}
                        pending = {c: v[cur.micro:] for c, v in pending.items()}
                        pos += 1
                        q.put((e, pos, collate(batch)))
                e, pos = e + 1, 0
        except BaseException as exc:  # surfaced in the consumer, with its own traceback
            q.put(exc)

    thread = threading.Thread(target=produce, name="llmray-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Stop the reader before returning: a reader left running would keep reading shards behind the
        # caller's back (and hold the files open).
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a producer waiting on a full queue
                q.get_nowait()
            thread.join(timeout=0.05)


def _scattered(part: RankSlice, position: int, columns: list[str], stop: threading.Event,
               cache_groups: int | None = None) -> Iterator[dict[str, list[Any]]]:
    """This rank's micro-batches from `position` on, each `micro` rows starting anywhere: row groups are
    decoded into a small LRU cache (one per old rank is live at a time) instead of once per batch."""
    import pyarrow.parquet as pq

    bounds = np.cumsum([0] + [n for groups in part.index.groups for n in groups])
    where = [(f, g) for f, groups in enumerate(part.index.groups) for g in range(len(groups))]
    cache: OrderedDict[int, dict[str, list[Any]]] = OrderedDict()
    limit = cache_groups or 2 + (part.layout.world if part.layout is not None else 1)
    files: dict[int, Any] = {}

    def group(i: int) -> dict[str, list[Any]]:
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        f, g = where[i]
        if f not in files:
            files[f] = pq.ParquetFile(part.index.files[f])
        table = files[f].read_row_group(g, columns=columns)
        cache[i] = {c: table.column(c).to_pylist() if c != COLUMN else _ids(table.column(c)) for c in columns}
        if len(cache) > limit:
            cache.popitem(last=False)
        return cache[i]

    for start in part.starts[position:]:
        if stop.is_set():
            return
        batch: dict[str, list[Any]] = {c: [] for c in columns}
        row, end = int(start), int(start) + part.micro
        while row < end:
            i = int(np.searchsorted(bounds, row, side="right")) - 1
            hi = min(end, int(bounds[i + 1]))
            block = group(i)
            for c in columns:
                batch[c].extend(block[c][row - int(bounds[i]):hi - int(bounds[i])])
            row = hi
        yield batch


def collate_packed(batch: dict[str, list[Any]]) -> dict[str, Any]:
    """Packed rows are all `seq_len` long: inputs are their own labels, no padding, no mask needed."""
    import torch

    ids = torch.from_numpy(np.stack(batch[COLUMN]).astype(np.int64, copy=False))
    return {"input_ids": ids, "labels": ids}


def collate_padded(pad_id: int) -> Collate:
    """Variable-length rows (SFT) padded to the longest in the batch: -100 labels and mask 0 on padding."""
    def collate(batch: dict[str, list[Any]]) -> dict[str, Any]:
        import torch

        rows = [np.asarray(r, dtype=np.int64) for r in batch[COLUMN]]
        labels = [np.asarray(r, dtype=np.int64) for r in batch.get("labels", rows)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
            ids[i, :len(r)] = torch.from_numpy(r)
            lab[i, :len(lb)] = torch.from_numpy(lb)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": mask}
    return collate


def parquet_batches(files: list[str], rows: int) -> Iterator[Any]:
    """Batches of `rows` packed sequences (tensors) straight from parquet: one epoch, last partial batch
    dropped. Validation reads its few batches this way."""
    index = ShardIndex.of(files)
    stop = index.rows - index.rows % rows
    pending: list[Any] = []
    for block in read_rows(index, 0, stop, [COLUMN]):
        pending.extend(block[COLUMN])
        while len(pending) >= rows:
            yield collate_packed({COLUMN: pending[:rows]})["input_ids"]
            pending = pending[rows:]


def synthetic_rows(vocab: int, seq_len: int, rows: int, seed: int = 0) -> Any:
    """Random token rows (benchmarks without a data stage)."""
    return np.random.default_rng(seed).integers(0, vocab, size=(rows, seq_len), dtype=np.int32)


def write_rows(rows: Any, folder: str | Path, shards: int = 4) -> list[str]:
    """Write int32 token rows as packed parquet shards (benchmarks and tests)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, part in enumerate(np.array_split(np.asarray(rows, dtype=np.int32), shards)):
        path = folder / f"part-{i:05d}.parquet"
        flat = pa.array(part.reshape(-1))
        col = pa.ListArray.from_arrays(pa.array(np.arange(0, part.size + 1, part.shape[1], dtype=np.int32)), flat)
        pq.write_table(pa.table({COLUMN: col}), path)
        out.append(str(path))
    return out
