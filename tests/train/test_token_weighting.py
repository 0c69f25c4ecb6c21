"""Padded SFT rows carry different numbers of labelled tokens: a step's loss and gradient are the mean over
every labelled token of the step, whatever way the rows are cut into micro batches (one process, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llm.config import ModelConfig, ScheduleConfig, TrainConfig
from llm.train.loop import LoopSpec, run_loop
from llm.train.metrics import read_records
from llm.train.runtime import LocalRuntime

pytestmark = pytest.mark.multiprocess  # DeepSpeed's gloo group in this process

VOCAB, PAD = 96, 0


def _rows(path: Path, n: int = 32) -> list[str]:
    """Rows of 6..24 tokens whose labels cover 1 token on even rows and the whole row on odd ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    ids, labels = [], []
    for i in range(n):
        row = rng.integers(1, VOCAB, int(rng.integers(6, 25))).tolist()
        ids.append(row)
        labels.append(list(row) if i % 2 else [-100] * (len(row) - 1) + [row[-1]])
    path.mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                             "labels": pa.array(labels, pa.list_(pa.int32()))}), path / "part-00000.parquet")
    return [str(path / "part-00000.parquet")]


def _losses(tmp: Path, files: list[str], micro: int, accum: int) -> list[float]:
    train = TrainConfig(max_steps=3, micro_batch_size=micro, grad_accum=accum, zero_stage=0, precision="fp32",
                        checkpoint_every=100, eval_every=100, log_every=1, max_failures=0, grad_clip=0.0,
                        lr=ScheduleConfig(kind="constant", peak=1e-2, warmup_steps=0))
    model = ModelConfig(arch="llama", n_layers=1, d_model=32, n_heads=2, context=32)
    out = tmp / f"m{micro}a{accum}"
    spec = LoopSpec(train=train, model=model, vocab_size=VOCAB,
                    seq_len=32, train_files=files, columns=["input_ids", "labels"], pad_id=PAD, out_dir=str(out),
                    export=False, peak_flops=1e12)
    run_loop(spec, LocalRuntime(checkpoint_root=str(out / "ckpt"), keep=2, device="cpu"))
    return [r["loss"] for r in read_records(out / "metrics.jsonl")]


def test_accumulated_steps_weigh_every_labelled_token_alike(tmp_path: Path) -> None:
    files = _rows(tmp_path / "rows")
    whole = _losses(tmp_path, files, micro=4, accum=1)
    split = _losses(tmp_path, files, micro=1, accum=4)  # micro batches of 1 and 23 labelled tokens
    assert len(whole) == len(split) == 3
    # Same rows per step: the same token-weighted loss, and the same update (the next steps agree too).
    assert split == pytest.approx(whole, rel=1e-4)
