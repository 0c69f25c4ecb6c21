"""Packing: fixed-length rows, eos between documents, no token lost or duplicated; the split is stable."""

from __future__ import annotations

import numpy as np

from llm.data.pack import pack, rows_table
from llm.eval.split import is_val


def test_pack_rows_and_remainder():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    rows, rest = pack(docs, eos_id=0, seq_len=4)
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert rest.tolist() == []
    rows, rest = pack([[1, 2, 3, 4, 5]], eos_id=0, seq_len=4, carry=np.array([9], np.int32))
    assert rows.tolist() == [[9, 1, 2, 3]] and rest.tolist() == [4, 5, 0]


def test_pack_loses_nothing_across_calls():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, rng.integers(1, 300)).tolist() for _ in range(200)]
    carry, out = None, []
    for i in range(0, 200, 17):  # batches of arbitrary size, carrying leftovers
        rows, carry = pack(docs[i:i + 17], eos_id=0, seq_len=64, carry=carry)
        out.append(rows)
    flat = np.concatenate([np.concatenate(out).ravel(), carry])
    expected = np.concatenate([np.array(d + [0]) for d in docs])
    assert np.array_equal(flat, expected)  # `==` would broadcast a length-1 result and pass
    assert all(r.shape[1] == 64 for r in out)


def test_rows_table_schema():
    t = rows_table(np.arange(12, dtype=np.int32).reshape(3, 4))
    assert str(t.schema.field("input_ids").type) == "list<item: int32>"
    assert t.column("input_ids").to_pylist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_split_by_hash_is_deterministic_and_proportional():
    h = np.arange(0, 10_000_000, 997, dtype=np.int64)
    val = is_val(h, 0.1)
    assert (val == is_val(h, 0.1)).all()
    assert 0.08 < val.mean() < 0.12
    assert not is_val(h, 0.0).any()
