"""Each rank reads only its own slice of the shards, and a resumed reader starts at its (shard, row)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from llm.train.data import (
    COLUMN,
    RankSlice,
    ShardIndex,
    collate_packed,
    collate_padded,
    micro_batches,
    write_rows,
)

SEQ = 4


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    # Row i holds [i, i, i, i]: a batch says exactly which global rows it came from.
    rows = np.repeat(np.arange(100, dtype=np.int32)[:, None], SEQ, axis=1)
    return write_rows(rows, tmp_path / "train", shards=4)  # 25 rows per shard


def row_ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def take(part: RankSlice, n: int, epoch: int = 0, position: int = 0) -> list[tuple[int, int, list[int]]]:
    it = micro_batches(part, epoch, position, collate_packed, [COLUMN])
    try:
        return [(e, p, row_ids(b)) for (e, p, b), _ in zip(it, range(n), strict=False)]
    finally:
        it.close()  # stops its reader thread before the caller looks at which files were opened


def test_ranks_read_disjoint_contiguous_slices(shards: list[str]) -> None:
    index = ShardIndex.of(shards)
    assert index.rows == 100
    parts = [RankSlice(index, r, 3, 4) for r in range(3)]  # 33 rows each, 8 batches of 4, 1 row dropped
    seen = [sum((ids for _, _, ids in take(p, 8)), []) for p in parts]
    assert seen == [list(range(0, 32)), list(range(33, 65)), list(range(66, 98))]
    # The 9th batch starts epoch 1 at the slice's beginning again.
    assert take(parts[1], 9)[-1] == (1, 1, [33, 34, 35, 36])


def test_resume_starts_at_the_position_without_reading_earlier_shards(shards: list[str], monkeypatch) -> None:
    index = ShardIndex.of(shards)
    part = RankSlice(index, 0, 1, 4)
    straight = take(part, 20)
    resumed = take(part, 5, epoch=0, position=15)
    assert resumed == straight[15:20]
    assert part.where(15) == {"shard": "part-00002.parquet", "row": 10}  # global row 60
    opened: list[str] = []
    original_init = pq.ParquetFile.__init__

    def init_spy(self, source, *args, **kwargs):
        opened.append(Path(str(source)).name)
        original_init(self, source, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "__init__", init_spy)
    take(part, 2, epoch=0, position=15)
    # Footers were read when the index was built, before the spy; resuming opened only shards 2 and 3.
    assert opened and set(opened) <= {"part-00002.parquet", "part-00003.parquet"}


def test_padded_collate_masks_padding() -> None:
    batch = collate_padded(pad_id=0)({COLUMN: [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [8]]})
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_too_few_rows_is_an_error(shards: list[str]) -> None:
    with pytest.raises(RuntimeError, match="fewer than micro_batch_size x workers"):
        next(micro_batches(RankSlice(ShardIndex.of(shards[:1]), 0, 8, 4), 0, 0, collate_packed, [COLUMN]))
