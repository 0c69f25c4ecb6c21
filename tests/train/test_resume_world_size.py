"""Resuming on a different world size: the data position dealt out to the new ranks (units, no Ray), and
2 -> 1 and 1 -> 2 Ray Train workers through DeepSpeed's universal checkpoint (integration)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from llm.errors import ConfigError
from llm.train import ds_config
from llm.train.data import (
    COLUMN,
    RankSlice,
    ShardIndex,
    batch_starts,
    collate_packed,
    micro_batches,
    rest_layout,
    write_rows,
)
from llm.train.state import Layout, LoopState

SEQ = 4
MICRO = 4


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    # Row i holds [i, i, i, i]: a batch says exactly which global rows it came from.
    rows = np.repeat(np.arange(100, dtype=np.int32)[:, None], SEQ, axis=1)
    return write_rows(rows, tmp_path / "train", shards=4)  # 25 rows per shard, one row group each


class Run:
    """`world` ranks stepping together with `accum` micro-batches each per step, as the loop does."""

    def __init__(self, index: ShardIndex, world: int, accum: int, epoch: int = 0, position: int = 0,
                 layout: Layout | None = None) -> None:
        self.world, self.accum, self.layout, self.rest_epoch = world, accum, layout, epoch
        self.its = [micro_batches(RankSlice(index, r, world, MICRO, layout), epoch, position, collate_packed,
                                  [COLUMN]) for r in range(world)]
        self.epoch, self.position = epoch, position

    def steps(self, n: int) -> list[list[int]]:
        """Rows each of `n` optimizer steps read (over all ranks), sorted."""
        out = []
        for _ in range(n):
            rows: list[int] = []
            for it in self.its:
                for _ in range(self.accum):
                    self.epoch, self.position, batch = next(it)
                    rows += batch["input_ids"][:, 0].tolist()
            out.append(sorted(rows))
        if self.epoch != self.rest_epoch:
            self.layout = None
        return out

    def state(self) -> LoopState:
        return LoopState(epoch=self.epoch, position=self.position, world_size=self.world, accum=self.accum,
                         layout=self.layout)

    def close(self) -> None:
        for it in self.its:
            it.close()


def resumed(index: ShardIndex, old: Run, world: int) -> Run:
    """The run `old` continued on `world` ranks with the same global batch."""
    epoch, position, layout = rest_layout(index.rows, old.state(), world, MICRO)
    old.close()
    return Run(index, world, old.world * old.accum // world, epoch, position, layout)


def test_2_to_1_reads_the_uninterrupted_steps_then_the_1_worker_order(shards: list[str]) -> None:
    index = ShardIndex.of(shards)
    straight = Run(index, 2, 1)
    expected = straight.steps(12 + 3)  # epoch 0: 12 steps of 2 ranks x 1 x 4 rows (2 rows per rank dropped)
    straight.close()
    first = Run(index, 2, 1)
    done = first.steps(5)
    second = resumed(index, first, 1)
    rest = second.steps(7)
    assert done + rest == expected[:12]  # the very rows of every step, to the end of the epoch
    consumed = sum(done + rest, [])
    assert len(consumed) == len(set(consumed)) == 96  # none read twice, none of the 96 skipped
    one = Run(index, 1, 2)
    assert second.epoch == 0 and second.steps(3) == one.steps(3)  # epoch 1: a 1-worker run's epoch order
    second.close()
    one.close()


def test_1_to_2_reads_the_uninterrupted_steps_and_drops_only_an_uneven_last_micro_batch(shards: list[str]) -> None:
    index = ShardIndex.of(shards)
    straight = Run(index, 1, 2)
    expected = straight.steps(12)  # 25 micro-batches per epoch: the 13th step straddles two epochs
    straight.close()
    first = Run(index, 1, 2)
    done = first.steps(5)
    second = resumed(index, first, 2)
    rest = second.steps(7)
    assert done + rest == expected
    # 15 micro-batches were left for 2 ranks: the 15th (rows 96-99) cannot pair up and is dropped, as an
    # epoch's remainder always is; then epoch 1 begins in the 2-worker order.
    assert sorted(sum(done + rest, [])) == list(range(96))
    assert (second.epoch, second.position) == (0, 7)
    two = Run(index, 2, 1)
    assert second.steps(2) == two.steps(2)
    second.close()
    two.close()


def test_changes_twice_in_one_epoch_still_match_the_uninterrupted_run(shards: list[str]) -> None:
    index = ShardIndex.of(shards)
    straight = Run(index, 2, 2)
    expected = straight.steps(6)  # 12 micro-batches per rank: 6 steps of 4
    straight.close()
    a = Run(index, 2, 2)
    got = a.steps(1)
    b = resumed(index, a, 1)  # accumulation 4
    got += b.steps(2)
    c = resumed(index, b, 4)  # accumulation 1; the layout nests the first change
    assert c.layout is not None and c.layout.parent is not None
    got += c.steps(3)
    c.close()
    assert got == expected


def test_a_change_at_the_end_of_an_epoch_starts_the_next_one() -> None:
    state = LoopState(epoch=2, position=12, world_size=2, accum=1)
    assert rest_layout(100, state, 1, MICRO) == (3, 0, None)


def test_position_mapping_is_a_partition_for_many_shapes() -> None:
    """Every micro-batch the old ranks had left is dealt to exactly one new rank (but for < M left over)."""
    for rows in (97, 256):
        for old, new in ((2, 1), (1, 2), (4, 3), (3, 4), (8, 2)):
            for accum in (1, 3):
                per = rows // old // MICRO
                for position in (0, 1, per // 2, per - 1):
                    state = LoopState(epoch=0, position=position, world_size=old, accum=accum)
                    left = np.concatenate([batch_starts(rows, None, old, r, MICRO)[position:] for r in range(old)])
                    _, pos, layout = rest_layout(rows, state, new, MICRO)
                    if layout is None:  # fewer than one micro-batch per new rank left: the next epoch
                        assert len(left) < new
                        continue
                    dealt = np.concatenate([batch_starts(rows, layout, new, r, MICRO) for r in range(new)])
                    assert len(dealt) == len(set(dealt.tolist())), (rows, old, new, accum, position)
                    assert set(dealt.tolist()) <= set(left.tolist())
                    assert len(left) - len(dealt) < new
                    counts = {len(batch_starts(rows, layout, new, r, MICRO)) for r in range(new)}
                    assert len(counts) == 1 and pos == 0  # the ranks step together


def test_scattered_reads_decode_each_row_group_once(shards: list[str], monkeypatch) -> None:
    index = ShardIndex.of(shards)
    decoded: list[str] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        decoded.append(f"{id(self)}:{i}")  # one ParquetFile per shard
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    _, _, layout = rest_layout(index.rows, LoopState(epoch=0, position=2, world_size=2, accum=1), 1, MICRO)
    part = RankSlice(index, 0, 1, MICRO, layout)
    it = micro_batches(part, 0, 0, collate_packed, [COLUMN])
    rows = [next(it)[2]["input_ids"][:, 0].tolist() for _ in range(part.batches_per_epoch)]
    it.close()
    # The two old ranks' rests interleave (shards 0-1 and 2-3): 20 micro-batches, 4 row groups decoded once
    # (the reader may have begun epoch 1 ahead, in the contiguous 1-rank order: shard 0 again).
    assert rows[:3] == [[8, 9, 10, 11], [58, 59, 60, 61], [12, 13, 14, 15]]
    assert len(rows) == 20 and sorted(sum(rows, [])) == list(range(8, 48)) + list(range(58, 98))
    assert len(set(decoded[:4])) == 4 and len(decoded) <= 5
    assert part.where(1) == {"shard": "part-00002.parquet", "row": 8}


def test_keep_global_batch_adjusts_accumulation_or_names_the_keys(local_cfg) -> None:
    train = local_cfg.llm.pretrain.model_copy(update={"micro_batch_size": 4, "grad_accum": 1})
    cfg = ds_config.build(train, 2)
    one = ds_config.keep_global_batch(cfg, 8, 1, "pretrain", "ckpt")
    assert (one["gradient_accumulation_steps"], one["train_batch_size"]) == (2, 8)
    with pytest.raises(ConfigError, match=r"^metadata\.llm\.pretrain\.sizing\.workers: 3 workers x micro_batch_size 4 "
                                          r"does not divide the global batch of 8 sequences that ckpt") as e:
        ds_config.keep_global_batch(cfg, 8, 3, "pretrain", "ckpt")
    assert "\n" not in str(e.value)


# --- 2 -> 1 and 1 -> 2 Ray Train workers -------------------------------------------------------------


def record_rows(spec):
    """Loss hook: each rank appends the rows of every micro-batch it trains on, with the optimizer step."""
    import os

    import torch.distributed as dist

    seen = Path(spec.out_dir) / "seen"
    seen.mkdir(parents=True, exist_ok=True)
    path = seen / f"rank{dist.get_rank()}-{os.getpid()}.jsonl"

    def loss_fn(engine, outputs, batch):
        with path.open("a") as f:
            f.write(json.dumps({"step": int(engine.global_steps), "rows": batch["input_ids"].tolist()}) + "\n")
        return outputs.loss
    return loss_fn


HOOK = record_rows


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _steps_rows(folder: Path, train_rows: list[list[int]]) -> dict[int, list[int]]:
    """Optimizer step (0-based) -> sorted global row indices every rank read in it."""
    index = {tuple(r): i for i, r in enumerate(train_rows)}
    out: dict[int, list[int]] = {}
    for path in (folder / "seen").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).extend(index[tuple(r)] for r in rec["rows"])
    return {k: sorted(v) for k, v in out.items()}


def _resume_elsewhere(tmp_path: Path, first: Path, workers: int, *overrides: str) -> Path:
    """A copy of `first`'s step-3 checkpoint as the only checkpoint of a new stage folder, continued with
    `workers` Ray Train workers through the pretrain stage's `fit` (resume point, checks, conversion)."""
    import shutil

    from llm.storage import Folder
    from llm.train import checkpoint as ckpt
    from llm.train.pretrain import fit
    from tests.train.conftest import build_data_stage, train_config

    source = Path(next(p for p in ckpt.candidates(first / "ray") if ckpt.step_of(p) == 3))
    loaded = train_config(tmp_path / "m", f"pretrain.sizing.workers={workers}", *overrides)
    build_data_stage(loaded)
    folder = Path(loaded.llm.stage_dir("pretrain"))
    shutil.copytree(source, folder / "ray" / "attempt-1" / source.name)
    fit(loaded.llm, Folder(folder), loss_hook=HOOK)
    return folder


def _check_continuation(first: Path, second: Path, old_world: int, new_world: int, accum: int) -> None:
    from llm.train import checkpoint as ckpt
    from llm.train.data import shard_files

    base, cont = _records(first), _records(second)
    assert [r["step"] for r in cont] == [4, 5, 6]
    # The same rows in every step, the same weights and optimizer state: the same losses, up to the order
    # of bf16 sums (ranks vs accumulation).
    assert [r["loss"] for r in cont] == pytest.approx([r["loss"] for r in base[3:]], abs=2e-3)
    assert cont[-1]["tokens"] == base[-1]["tokens"]
    ranks = [json.loads(p.read_text()) for p in sorted((second / "ranks").glob("rank*.json"))]
    assert [(r["world_size"], r["resumed_at"]) for r in ranks] == [(new_world, 3)] * new_world
    data = Path(str(first).replace("/pretrain", "/data"))
    rows = [r for f in shard_files(data, "train") for r in pq.read_table(f).column(COLUMN).to_pylist()]
    a, b = _steps_rows(first, rows), _steps_rows(second, rows)
    assert sorted(b) == [3, 4, 5] and all(b[s] == a[s] for s in b)  # each step's rows: the uninterrupted run's
    consumed = sum((a[s] for s in (0, 1, 2)), []) + sum(b.values(), [])
    assert len(consumed) == len(set(consumed)) == 6 * 8  # none read twice; with a's own, none skipped
    assert sorted(consumed) == sorted(sum(a.values(), []))
    copy = next((second / "ray").glob("attempt-1/checkpoint_*"))
    assert (copy / ckpt.UNIVERSAL / "zero").is_dir()  # converted beside `ds/`, which is left as it was
    assert ckpt.verify(copy, checksums=True) is None
    last = max(ckpt.candidates(second / "ray"), key=ckpt.step_of)
    state = ckpt.read_state(last)
    assert (state.world_size, state.accum, state.micro) == (new_world, accum, 4)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.multiprocess
def test_2_workers_resume_on_1(ray_session, tmp_path: Path) -> None:
    from llm.train.pretrain import run
    from tests.train.conftest import build_data_stage, train_config

    loaded = train_config(tmp_path / "n")  # 2 workers x micro 4, checkpoints at 3 and 6
    build_data_stage(loaded)
    first = Path(run(loaded.llm, loss_hook=HOOK).path)
    second = _resume_elsewhere(tmp_path, first, 1)
    _check_continuation(first, second, 2, 1, accum=2)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.multiprocess
def test_1_worker_resumes_on_2(ray_session, tmp_path: Path) -> None:
    from llm.train.pretrain import run
    from tests.train.conftest import build_data_stage, train_config

    loaded = train_config(tmp_path / "n", "pretrain.sizing.workers=1", "pretrain.grad_accum=2")
    build_data_stage(loaded)
    first = Path(run(loaded.llm, loss_hook=HOOK).path)
    second = _resume_elsewhere(tmp_path, first, 2, "pretrain.grad_accum=2")
    _check_continuation(first, second, 1, 2, accum=1)


def test_resume_on_3_workers_is_refused_before_workers_start(local_cfg, tmp_path: Path) -> None:
    """A global batch of 8 cannot be split over 3 workers x micro 4: one line naming the keys, in the driver."""
    from llm.config import ModelConfig
    from llm.train.fit import _check_resume
    from llm.train.spec import LoopSpec, train_fields

    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    (folder / "loop_state.json").write_text(json.dumps({"step": 3, "epoch": 0, "position": 3, "tokens": 768,
                                                        "world_size": 2, "micro": 4, "accum": 1}))
    train = local_cfg.llm.pretrain.model_copy(update={"micro_batch_size": 4, "grad_accum": 1})
    spec = LoopSpec(train=train_fields(train), model=ModelConfig(), vocab_size=8, seq_len=4,
                    resume_from=str(folder))
    _check_resume(spec, 1, "pretrain")  # 1 x 4 divides 8: accumulation 2
    _check_resume(spec, 2, "pretrain")
    with pytest.raises(ConfigError, match=r"^metadata\.llm\.pretrain\.sizing\.workers: 3 workers x "
                                          rf"micro_batch_size 4 does not divide the global batch of 8 .*{folder.name}"):
        _check_resume(spec, 3, "pretrain")
