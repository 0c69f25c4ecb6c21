"""Model facts and input reading: measured peak memory, parameter counts, val rows in a fixed order."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.errors import DataError, StageInputError
from llm.eval import PeakMemory, packed_rows, param_count, read_jsonl, sft_rows
from llm.eval import facts as facts_module

MB = 1 << 20


def _hold(mb: int) -> None:
    block = np.ones(mb * MB, dtype=np.uint8)  # touched, so resident
    time.sleep(0.05)
    del block


def test_peak_memory_sees_a_freed_allocation():
    with PeakMemory("cpu") as peak:
        _hold(64)
    assert peak.bytes >= 60 * MB


def test_peak_memory_by_sampling_where_the_kernel_mark_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(facts_module.PeakMemory, "_reset_hwm", staticmethod(lambda: False))
    with PeakMemory("cpu") as peak:
        _hold(64)
    assert peak.bytes >= 60 * MB


def test_param_count_counts_tied_weights_once(model):
    import torch

    lin = torch.nn.Linear(4, 3)
    tied = torch.nn.Sequential(lin, lin)
    assert param_count(tied) == 4 * 3 + 3
    cfg = model.config
    embed = cfg.vocab_size * cfg.hidden_size
    assert param_count(model) == sum(p.numel() for p in model.parameters())
    assert param_count(model) > 2 * embed  # untied here: input and output matrices both counted


def _write(folder, name, **cols):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, pa.list_(pa.int32())) for k, v in cols.items()}), folder / name)


def test_int8_model_counts_its_packed_weights(model):
    """torch.ao's dynamic int8 Linear keeps weights packed outside `parameters()`: still counted, at 1 byte."""
    import warnings

    import torch

    from llm.eval import weights_bytes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert param_count(q) == param_count(model)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert weights_bytes(q) == pytest.approx(weights_bytes(model) - 3 * linear, abs=64)


def test_packed_rows_in_sorted_shard_order(tmp_path):
    val = tmp_path / "packed" / "val"
    _write(val, "part-00001.parquet", input_ids=[[3, 3, 3], [4, 4, 4]])
    _write(val, "part-00000.parquet", input_ids=[[1, 1, 1], [2, 2, 2]])
    assert packed_rows(tmp_path).tolist() == [[1] * 3, [2] * 3, [3] * 3, [4] * 3]
    assert packed_rows(tmp_path, max_rows=3)[:, 0].tolist() == [1, 2, 3]
    _write(tmp_path / "empty" / "packed" / "val", "part-00000.parquet", input_ids=[])
    with pytest.raises(DataError, match="hold no rows"):
        packed_rows(tmp_path / "empty")
    _write(val, "part-00002.parquet", input_ids=[[5, 5]])
    with pytest.raises(DataError, match="part-00002.parquet: row 0 has 2 tokens"):
        packed_rows(tmp_path)


def test_sft_rows_name_their_source_and_missing_input_is_one_line(tmp_path):
    _write(tmp_path / "sft" / "val", "part-00000.parquet", input_ids=[[1, 2]], labels=[[-100, 2]])
    [row] = sft_rows(tmp_path)
    assert row["input_ids"] == [1, 2] and row["labels"] == [-100, 2] and row["source"].endswith(".parquet:0")
    with pytest.raises(StageInputError, match="no parquet shards"):
        sft_rows(tmp_path / "nowhere")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not JSON"):
        read_jsonl(bad)
    assert read_jsonl(bad, limit=1) == [{"prompt": "a", "response": "b"}]
