"""The tokens compress calibrates, distils and evaluates on, always in the original model's own tokenizer.

A user who brings a base and chat data has no raw corpus and no data stage; and a data stage made with this
project's tokenizer packs ids that mean nothing to a Qwen or Phi-3 model. Packed text and chat rows are
looked for separately:

- packed text: the data stage's `packed/`, when it is committed and its vocabulary is the original's;
- chat (SFT) rows, the first that fits: the data stage's `sft/` when it was rendered with the original's very
  tokenizer and template; the finetune stage's `sft/` when the original is its model and it rendered the chat
  data with the base's tokenizer (the original's); else the chat records (`finetune.data`, else
  `data.sft.sources`) rendered here with the original's tokenizer into `compress/_work/sft/`.

Without packed text, calibration rows are cut from the SFT rows' tokens laid end to end, distillation runs on
SFT rows and the table has no val perplexity (its limit then does not apply; SFT perplexity and ROUGE-L do).
With neither, the stage stops in one line before anything moves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from llm import storage
from llm.compress.variants import calibration_rows as packed_calibration_rows
from llm.config import LLM_PREFIX, PipelineConfig
from llm.data.tokenizer import load_tokenizer
from llm.errors import ConfigError, StageInputError
from llm.manifest import read_manifest
from llm.stage import stage_input
from llm.train.base_model import context_of
from llm.train.data import data_shards
from llm.train.finetune import chat_sources, same_tokenizer, same_vocabulary
from llm.train.sft import prepare_tokenizer, render_sources

SftFrom = Literal["data", "finetune", "rendered"]


@dataclass(frozen=True)
class Tokens:
    """Where compress reads packed text and chat rows, and the chat records its held-out prompts come from."""

    packed: storage.Folder | None
    """A folder holding `packed/{train,val}` in the original's vocabulary (the data stage's), or None."""
    sft: storage.Folder | None
    """A folder holding `sft/{train,val}` rendered with the original's tokenizer, or None (None too for
    `rendered` until `render` made it)."""
    sft_from: SftFrom | None
    sources: list[str]
    """Chat records whose held-out side gives the prompts."""
    val_fraction: float

    @property
    def stages(self) -> tuple[str, ...]:
        """The earlier stages read (recorded in the manifest)."""
        used = ["data"] if self.packed is not None else []
        if self.sft_from in ("data", "finetune"):
            used.append(str(self.sft_from))
        return tuple(dict.fromkeys(used))

    def describe(self) -> str:
        packed = f"packed text from {self.packed.uri}" if self.packed is not None else "no packed text"
        chat = {"data": "the data stage's chat rows", "finetune": "the chat rows finetune rendered",
                "rendered": "chat records rendered here with the original's tokenizer", None: "no chat rows"}
        where = f" ({self.sft.uri})" if self.sft is not None else ""
        return f"tokens: {packed}; {chat[self.sft_from]}{where}"


def _data_stage(cfg: PipelineConfig, tok: Any) -> tuple[storage.Folder | None, storage.Folder | None]:
    """(the data stage's folder for packed text, for chat rows), each when it fits the original's `tok`."""
    if read_manifest(cfg.stage_dir("data")) is None:
        return None, None
    data = stage_input(cfg, "data")
    theirs = load_tokenizer(data.fetch("tokenizer"))
    packed = data if data_shards(data, "train") and same_vocabulary(tok, theirs) else None
    sft = data if data_shards(data, "train", "sft") and same_tokenizer(tok, theirs) else None
    return packed, sft


def plan(cfg: PipelineConfig, original_dir: Path, original_stage: str | None) -> Tokens:
    """Which tokens compress reads for the original in `original_dir` (from stage `original_stage`); runs on the
    driver before any folder moves.

    Raises:
        StageInputError: neither packed text in the original's vocabulary nor chat rows or records.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(original_dir), local_files_only=True)
    packed, data_sft = _data_stage(cfg, tok)
    if data_sft is not None:
        sft = cfg.data.sft
        return Tokens(packed, data_sft, "data", sft.sources, sft.val_fraction)
    sources, val_fraction, _ = chat_sources(cfg)
    if original_stage == "finetune":
        tuned = stage_input(cfg, "finetune")
        if data_shards(tuned, "train", "sft"):
            return Tokens(packed, tuned, "finetune", sources, val_fraction)
    if sources:
        return Tokens(packed, None, "rendered", sources, val_fraction)
    if packed is not None:
        return Tokens(packed, None, None, [], 0.0)
    raise StageInputError(
        f"{cfg.stage_dir('data')}: no tokens in the tokenizer of {original_dir} to calibrate and evaluate on: run "
        f"`llmray data` with that tokenizer, or set {LLM_PREFIX}.finetune.data (chat records) to render them")


def render(cfg: PipelineConfig, tokens: Tokens, work: storage.Folder, original_dir: Path,
           from_finetune: bool) -> Tokens:
    """`tokens` with its chat rows: for `rendered`, the records rendered with the original's tokenizer into
    `<work>/sft/` and published for the distillation workers; otherwise as planned."""
    if tokens.sft_from != "rendered":
        return tokens
    _, _, key = chat_sources(cfg)
    comp = cfg.compress
    tok = prepare_tokenizer(original_dir, work.local / "tokenizer")
    # Unless distillation trains on them, only calibration and the table read these rows: render that many.
    distils = any("distilled" in v for v in comp.variants) and _wants_sft(cfg, tokens.packed is not None, True,
                                                                         from_finetune)
    budget = {} if distils else {"train_tokens": comp.prune.calib_rows * cfg.data.seq_len,
                                 "val_rows": comp.eval.sft_rows}
    done = render_sources(tok, tokens.sources, work.local / "sft", cfg.finetune.max_len or cfg.data.sft.max_len,
                          tokens.val_fraction, key, **budget)
    for d in done.dropped[:5]:
        print(f"compress: dropped {d['record']}: {d['reason']}", flush=True)
    work.publish("sft")
    return replace(tokens, sft=work)


def _wants_sft(cfg: PipelineConfig, has_packed: bool, has_sft: bool, from_finetune: bool) -> bool:
    choice = cfg.compress.distill.data
    return choice == "sft" or (choice == "auto" and has_sft and (from_finetune or not has_packed))


def distill_rows(cfg: PipelineConfig, tokens: Tokens, from_finetune: bool) -> tuple[storage.Folder, bool]:
    """(the folder distillation reads, whether it reads SFT rows): `compress.distill.data` where both kinds are
    there (`auto`: SFT rows for a fine-tuned original), else the kind there is; asking for a kind that is not
    there is a one-line error."""
    choice = cfg.compress.distill.data
    want_sft = _wants_sft(cfg, tokens.packed is not None, tokens.sft is not None, from_finetune)
    folder = tokens.sft if want_sft else tokens.packed
    if folder is None:
        kind = "chat (SFT) rows" if want_sft else "packed text"
        raise ConfigError(f"{LLM_PREFIX}.compress.distill.data: {choice}, but there is no {kind} in the original's "
                          f"tokenizer ({tokens.describe()})")
    return folder, want_sft


def calibration_rows(tokens: Tokens, rows: int, seq_len: int, original_dir: Path) -> Any:
    """(rows, length) token ids pruning ranks channels on: the first packed train rows, else the SFT train rows'
    tokens laid end to end and cut into rows of `seq_len` (at most the model's context; fewer rows, or one
    shorter row, when the data is short)."""
    import numpy as np
    import pyarrow.parquet as pq

    if tokens.packed is not None:
        return packed_calibration_rows(tokens.packed, rows)
    assert tokens.sft is not None
    files = data_shards(tokens.sft, "train", "sft")
    if not files:
        raise StageInputError(f"{tokens.sft.path('sft', 'train')}: no SFT shards to calibrate on")
    config = SimpleNamespace(**json.loads((original_dir / "config.json").read_text()))
    length = min(seq_len, context_of(config) or seq_len)
    stream: list[int] = []
    for f in files:
        for ids in pq.read_table(f, columns=["input_ids"]).column(0).to_pylist():
            stream += ids
            if len(stream) >= rows * length:
                break
        if len(stream) >= rows * length:
            break
    n = min(rows, len(stream) // length)
    if n == 0:
        return np.asarray([stream], dtype=np.int64)
    return np.asarray(stream[: n * length], dtype=np.int64).reshape(n, length)
