"""Resuming at another world size from a checkpoint each rank downloaded for itself (an object store): rank 0
converts its copy to DeepSpeed's universal form; another rank, whose copy is its own, converts that copy
instead of failing because rank 0's conversion is not in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.train import checkpoint as ckpt


def test_a_rank_with_its_own_copy_converts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converted: list[Path] = []

    def convert(folder: Path, target: Path) -> None:
        (target / "zero").mkdir(parents=True)
        converted.append(folder)

    monkeypatch.setattr(ckpt, "_convert", convert)
    rank0_copy, rank1_copy = tmp_path / "node0" / "ckpt", tmp_path / "node1" / "ckpt"
    rank0_copy.mkdir(parents=True)
    rank1_copy.mkdir(parents=True)
    assert ckpt.universal(rank0_copy, rank=0) == (str(rank0_copy), ckpt.UNIVERSAL)
    # rank 1 does not see node 0's conversion: it converts its own copy (it used to raise "missing after rank 0
    # converted it")
    assert ckpt.universal(rank1_copy, rank=1) == (str(rank1_copy), ckpt.UNIVERSAL)
    assert converted == [rank0_copy, rank1_copy]
    # a shared folder already converted is reused, not converted again
    assert ckpt.universal(rank0_copy, rank=1) == (str(rank0_copy), ckpt.UNIVERSAL) and len(converted) == 2
