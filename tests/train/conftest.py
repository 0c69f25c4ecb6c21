"""Fixtures for training tests: a committed data-stage folder built here (not by llm/data).

A tiny byte-level BPE trained with `tokenizers` on Python's own help topics, saved as a
`PreTrainedTokenizerFast`, and packed `input_ids` parquet shards (train and val), committed with the
data manifest so `llm.stage.stage_input` accepts it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.config import LoadedConfig
from llm.manifest import write_manifest
from llm.stage import config_hash
from tests.conftest import tiny_config

SEQ_LEN = 32
VOCAB = 384


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


_BUILT: dict[tuple[int, int, int], Path] = {}


def build_data_stage(loaded: LoadedConfig, train_rows: int = 256, val_rows: int = 64) -> Path:
    """Write and commit `<storage>/<run>/data/` for `loaded`'s config; returns the folder.

    Built once per process and copied afterwards: BPE training breaks frequency ties in hash order, so
    two builds can differ, and runs compared with each other must read the very same tokens.
    """
    cfg = loaded.llm
    folder = Path(cfg.stage_dir("data"))
    key = (cfg.data.seq_len, train_rows, val_rows)
    if key in _BUILT:
        shutil.copytree(_BUILT[key], folder, dirs_exist_ok=True)
        write_manifest(folder, "data", config_hash(cfg, "data"), {}, {"train_rows": train_rows, "val_rows": val_rows})
        return folder
    _BUILT[key] = _build(loaded, train_rows, val_rows)
    return _BUILT[key]


def _build(loaded: LoadedConfig, train_rows: int, val_rows: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    cfg = loaded.llm
    seq_len = cfg.data.seq_len
    folder = Path(cfg.stage_dir("data"))
    folder.mkdir(parents=True, exist_ok=True)
    texts = _corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    fast.save_pretrained(str(folder / "tokenizer"))
    eos = fast.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += fast(text)["input_ids"] + [eos]
        if len(stream) >= (train_rows + val_rows) * seq_len:
            break
    rows = np.array(stream[: (train_rows + val_rows) * seq_len], dtype=np.int32).reshape(-1, seq_len)
    assert len(rows) == train_rows + val_rows, "corpus too small for the fixture"
    for split, block, shards in (("train", rows[:train_rows], 2), ("val", rows[train_rows:], 1)):
        (folder / "packed" / split).mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(np.array_split(block, shards)):
            col = pa.array(list(part), type=pa.list_(pa.int32()))
            pq.write_table(pa.table({"input_ids": col}), folder / "packed" / split / f"part-{i:05d}.parquet")
    write_manifest(folder, "data", config_hash(cfg, "data"), {}, {"train_rows": train_rows, "val_rows": val_rows})
    return folder


def train_config(tmp_path: Path, *overrides: str) -> LoadedConfig:
    """cluster/local.yaml scaled down for tests: tiny llama, seq 32, few steps, 2 workers x 1 CPU."""
    return tiny_config(
        tmp_path, f"data.seq_len={SEQ_LEN}", "pretrain.model.context=32", "pretrain.max_steps=6",
        "pretrain.micro_batch_size=4", "pretrain.checkpoint_every=3", "pretrain.eval_every=3",
        "pretrain.eval_batches=2", "pretrain.log_every=1", "pretrain.lr.warmup_steps=2",
        "pretrain.lr.peak=3e-3", "pretrain.max_failures=0", *overrides,
    )


@pytest.fixture
def data_stage(tmp_path: Path) -> Path:
    """A committed data folder for the default test config under `tmp_path`."""
    return build_data_stage(train_config(tmp_path))


def fake_checkpoint(folder: Path, world: int, step: int = 3) -> Path:
    """A checkpoint folder as `world` ranks of ZeRO-2 bf16 write it (files of the real names, made-up bytes),
    each rank's part committed: for tests of what is written, read and downloaded, not of what DeepSpeed loads."""
    from llm.train import checkpoint as ckpt

    ds = folder / ckpt.TAG
    ds.mkdir(parents=True)
    (folder / "latest").write_text(ckpt.TAG)
    (folder / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"model" * 100)
    (folder / "loop_state.json").write_text(json.dumps({"step": step, "epoch": 0, "position": step, "tokens": 0,
                                                        "world_size": world, "micro": 4, "accum": 1}))
    for r in range(world):
        (ds / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(bytes([r]) * 1000)
        (folder / f"rng_rank{r}.pt").write_bytes(bytes([r]) * 10)
        (folder / f"rng_rank{r}.json").write_text("[3, [0], null]")
    for r in range(world):
        ckpt.commit_part(folder, r)
    return folder


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path) with its sha256: byte-identical trees have equal digests."""
    from llm.manifest import file_sha256

    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def ray_runtime(run: Any, scratch: Path) -> Any:
    """A `RayRuntime` of rank 0 of 1 outside a Ray worker: Ray Train's storage context `run` given, not asked for."""
    from llm.train.runtime import RayRuntime

    rt = object.__new__(RayRuntime)
    rt.rank, rt.world_size, rt.scratch, rt.run_storage = 0, 1, scratch, run
    rt.publish, rt.publish_each = None, False
    return rt
