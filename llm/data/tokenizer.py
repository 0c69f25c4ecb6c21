"""The tokenizer: a byte-level BPE trained with Hugging Face `tokenizers`, or a local one, saved under
`data/tokenizer/` so that `transformers.AutoTokenizer.from_pretrained` loads it with a chat template.

Special tokens: `<|endoftext|>` (document separator and eos), `<|pad|>`, and the chat roles
`<|system|>`, `<|user|>`, `<|assistant|>` closed by `<|end|>`. Byte-level means no unknown token ever.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llm import storage
from llm.data import checksums
from llm.data.clean import unit_of
from llm.data.shuffle import marks_of_unit
from llm.errors import ConfigError, DataError
from llm.models.chat import CHAT_TEMPLATE, EOS, PAD, SPECIAL


def train_tokenizer(texts: Iterable[str], out_dir: Path, *, vocab_size: int, min_frequency: int) -> Any:
    """Train a byte-level BPE on `texts` and save it (with its chat template) into `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=SPECIAL[2:], model_max_length=1 << 30)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def sample(paths: list[str], marks: list[str], limit: int) -> Iterator[str]:
    """Kept, non-duplicate texts of the cleaned units `paths`, in corpus order, until `limit` bytes: the
    training sample, streamed (one parquet batch at a time) so its size alone bounds memory."""
    import numpy as np
    import pyarrow.parquet as pq

    seen = 0
    for path in paths:
        drop = marks_of_unit(marks, unit_of(path))
        fs, inside = storage.resolve(path)
        row = 0
        for rb in pq.ParquetFile(fs.open_input_file(inside)).iter_batches(columns=["text", "reason"]):
            keep = rb.column("reason").to_numpy(zero_copy_only=False) == ""
            keep &= ~np.isin(np.arange(row, row + len(keep)), drop)
            row += len(keep)
            for text, k in zip(rb.column("text").to_pylist(), keep, strict=True):
                if k:
                    yield text
                    seen += len(text.encode("utf-8"))
                    if seen >= limit:
                        return


def tokenizer_unit(batch: dict[str, Any], *, paths: list[str], marks: list[str], sample_bytes: int, vocab_size: int,
                   min_frequency: int, out_dir: str) -> dict[str, list]:
    """Ray Data UDF (one row): train the tokenizer in this task on a sample streamed from the cleaned units, save
    it to `<out_dir>/tokenizer/` (`out_dir` is the stage folder) with its checksums; returns its vocab size.
    The keyword arguments are the job's `fn_kwargs`, one per setting the task needs (hence seven)."""
    folder = Path(out_dir) / "tokenizer"
    tok = train_tokenizer(sample(paths, marks, sample_bytes), folder, vocab_size=vocab_size,
                          min_frequency=min_frequency)
    checksums.record(out_dir, "tokenizer", sorted(p for p in folder.rglob("*") if p.is_file()))
    return {"unit": [int(batch["unit"][0])], "vocab_size": [len(tok)]}


def copy_tokenizer(path: str, out_dir: Path) -> Any:
    """Load a local tokenizer directory, complete what the pipeline needs (pad, chat template), save it."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"data.tokenizer.path {path!r}: does not load with AutoTokenizer ({e})") from e
    if not getattr(tok, "is_fast", False):
        raise DataError(f"data.tokenizer.path {path!r}: a fast (tokenizers-backed) tokenizer is needed")
    if tok.eos_token is None:
        raise DataError(f"data.tokenizer.path {path!r}: has no eos token to separate documents")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padding is masked out, so reusing eos is safe
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    return tok


def load_tokenizer(data_dir: str | Path) -> Any:
    """The data stage's tokenizer (`<data_dir>/tokenizer`, or a tokenizer folder itself), for other stages."""
    from transformers import AutoTokenizer

    folder = Path(data_dir)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def check_model_vocab(model_dir: str | Path, tokenizer: Any, key: str) -> None:
    """Raise a `ConfigError` naming `key` unless the model directory fits `tokenizer` (the data stage's): its
    embedding has a row for every token id (`config.json`'s `vocab_size` >= `len(tokenizer)`), and a tokenizer
    shipped with it has the same vocabulary (the same id for every token string). A model trained with
    another tokenizer would read every id of the packed data as some other token, without an error."""
    from transformers import AutoTokenizer

    folder = Path(model_dir)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {folder}/config.json does not read ({e})") from None
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    fix = "use a model made for this tokenizer, or set data.tokenizer.path to the model's folder and rerun " \
          "`llmray data`"
    if isinstance(rows, int) and rows < len(tokenizer):
        raise ConfigError(f"{key}: the model in {folder} has {rows:,} token embeddings but the data stage's tokenizer "
                          f"has {len(tokenizer):,} tokens; {fix}")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return
    try:
        own = AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab()
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{key}: the tokenizer in {folder} does not load ({e})") from None
    theirs = tokenizer.get_vocab()
    if own != theirs:
        moved = sorted(t for t in theirs.keys() & own.keys() if theirs[t] != own[t])
        example = f"e.g. {moved[0]!r} is {own[moved[0]]} there, {theirs[moved[0]]} here" if moved else (
            f"{len(theirs.keys() - own.keys()):,} of the data's tokens are not in it")
        raise ConfigError(f"{key}: the model in {folder} was made with another tokenizer ({len(own):,} tokens, "
                          f"{example}); {fix}")


def fast_tokenizer(folder: str | Path) -> Any:
    """The raw `tokenizers.Tokenizer` of a saved folder: what workers use for batched encoding."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
