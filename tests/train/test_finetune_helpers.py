"""Builders shared by the fine-tuning tests (no tests here): SFT records, a committed data stage with SFT
shards, a committed pretrain stage holding a tiny Llama, and a tiny GPT-2 with another tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm.config import LoadedConfig
from llm.manifest import manifest_hash, write_manifest
from llm.stage import config_hash
from tests.conftest import tiny_config

VOCAB = 384


def sft_records(n: int = 160) -> list[dict[str, Any]]:
    """Learnable chat records: single-turn prompt/response and multi-turn messages."""
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "maple"]
    out: list[dict[str, Any]] = []
    for i in range(n):
        w = words[i % len(words)]
        if i % 4 == 3:
            out.append({"messages": [
                {"role": "system", "content": "You repeat words."},
                {"role": "user", "content": f"Say {w} twice."},
                {"role": "assistant", "content": f"{w} {w}"},
                {"role": "user", "content": f"Now number {i}."},
                {"role": "assistant", "content": f"{w} {i}"}]})
        else:
            out.append({"prompt": f"Say {w} twice, item {i}.", "response": f"{w} {w}"})
    return out


def write_jsonl(path: Path, records: list[Any], bad_lines: tuple[str, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    for j, bad in enumerate(bad_lines):  # bad lines at known positions: line 3, 5, ...
        lines.insert(2 + 2 * j, bad)
    path.write_text("\n".join(lines) + "\n")
    return path


def label_ends(folder: Path) -> set[int]:
    """The last labelled token of every answer in a finetune folder's rendered train shards (`sft/train/`)."""
    import pyarrow.parquet as pq

    from llm.models.chat import IGNORE

    ends = set()
    for f in (folder / "sft" / "train").glob("*.parquet"):
        for labels in pq.read_table(f)["labels"].to_pylist():
            ends.update(lab for i, lab in enumerate(labels)
                        if lab != IGNORE and (i + 1 == len(labels) or labels[i + 1] == IGNORE))
    return ends


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)] + [json.dumps(r) for r in sft_records()]


def our_tokenizer(folder: Path) -> Any:
    """The data stage's kind of tokenizer (byte-level BPE, role tokens, chat template)."""
    from llm.data.tokenizer import train_tokenizer

    return train_tokenizer(corpus(), folder, vocab_size=VOCAB, min_frequency=2)


def tiny_llama(folder: Path, tok: Any, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Llama saved with its tokenizer."""
    from llm.config import ModelConfig
    from llm.train.model import build_model

    model = build_model(ModelConfig(n_layers=2, d_model=64, n_heads=4, context=256), len(tok), seed, tok)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def tiny_gpt2(folder: Path) -> Path:
    """A 2-layer GPT-2 with its own tokenizer (another vocabulary, no pad token, no chat template)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(corpus()[::-1], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", bos_token="<eos>")
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def finetune_config(tmp: Path, *overrides: str) -> LoadedConfig:
    """cluster/local.yaml scaled down: SFT from a JSONL, 4 fine-tuning steps on 2 workers x 1 CPU."""
    return tiny_config(
        tmp, f"data.sft.sources=[{tmp / 'sft.jsonl'}]", "data.sft.max_len=96", "data.sft.val_fraction=0.1",
        "finetune.enabled=true", "finetune.max_steps=4", "finetune.micro_batch_size=4", "finetune.checkpoint_every=2",
        "finetune.eval_every=2", "finetune.eval_batches=2", "finetune.log_every=1", "finetune.lr.warmup_steps=1",
        "finetune.lr.peak=3e-3", "finetune.max_failures=0", "finetune.sizing={workers: 2, cpus_per_worker: 1}",
        "finetune.eval.prompts=4", "finetune.eval.max_new_tokens=8", "finetune.eval.sft_rows=16", *overrides,
    )


def build_stages(loaded: LoadedConfig, tok_dir: Path) -> tuple[Path, Path]:
    """Commit `data/` (tokenizer + SFT shards rendered as the data stage does) and `pretrain/` (a tiny
    Llama exported with that tokenizer) for `loaded`'s config."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from llm.eval.split import is_held_out
    from llm.models.chat import render, to_messages

    cfg = loaded.llm
    write_jsonl(Path(cfg.data.sft.sources[0]), sft_records())
    data = Path(cfg.stage_dir("data"))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.save_pretrained(str(data / "tokenizer"))
    rows: dict[str, list[tuple[list[int], list[int]]]] = {"train": [], "val": []}
    for rec in sft_records():
        msgs = to_messages(rec)
        assert not isinstance(msgs, str)
        rows["val" if is_held_out(msgs, cfg.data.sft.val_fraction) else "train"].append(render(tok, msgs))
    for split, ex in rows.items():
        (data / "sft" / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"input_ids": pa.array([e[0] for e in ex], pa.list_(pa.int32())),
                                 "labels": pa.array([e[1] for e in ex], pa.list_(pa.int32()))}),
                       data / "sft" / split / "part-00000.parquet")
    write_manifest(data, "data", config_hash(cfg, "data"), {}, {"sft": {k: len(v) for k, v in rows.items()}})
    pre = Path(cfg.stage_dir("pretrain"))
    tiny_llama(pre / "model", tok)
    write_manifest(pre, "pretrain", config_hash(cfg, "pretrain"), {"data": manifest_hash(data) or ""}, {})
    return data, pre
