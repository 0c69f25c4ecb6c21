"""One comparison table for any models: the same inputs, the same decoding, the same row keys for each.

Fine-tuning compares the base with the tuned model and compression compares variants with the original;
both call `evaluate_models`, so their `eval.json` rows can sit side by side. Models given as directories
are opened one at a time through the one loader (`llm.models.load`) and released before the next, so a
model's load time and memory are not inflated by the one before it.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm.eval.data import PromptPair, packed_rows, sft_rows
from llm.eval.facts import PeakMemory, dir_bytes, param_count, tokens_per_second, weights_bytes
from llm.eval.generate import encode_prompts, generation_metrics, pad_id
from llm.eval.harness import HarnessSettings, check_tasks, task_scores
from llm.eval.loss import assistant_loss, model_device, packed_perplexity
from llm.models.load import load_model

MB = float(1 << 20)

# Every row has exactly these keys, in this order; a figure that was not measured is None.
ROW_DOC: dict[str, str] = {
    "model": "name given by the caller",
    "source": "model directory, or 'in-memory'",
    "device": "torch device the model ran on",
    "params": "parameters, tied weights once",
    "weights_mb": "parameters and buffers in memory (MiB)",
    "disk_mb": "files in the model directory (MiB)",
    "load_s": "seconds to load the directory",
    "val_loss": "mean next-token loss on packed val rows",
    "val_ppl": "exp(val_loss)",
    "val_tokens": "tokens val_loss is averaged over",
    "sft_loss": "mean loss over assistant tokens of SFT val rows",
    "sft_ppl": "exp(sft_loss)",
    "sft_tokens": "assistant tokens sft_loss is averaged over",
    "sft_skipped": "SFT rows with no assistant token",
    "rouge_l": "mean ROUGE-L F1 of greedy answers (0-1)",
    "bleu": "corpus BLEU of greedy answers (0-100)",
    "exact_match": "fraction of answers equal to the reference, whitespace normalised",
    "token_f1": "mean token-level F1 of greedy answers against the reference (0-1, SQuAD normalisation)",
    "prompts": "held-out prompts answered",
    "tok_s_b1": "greedy tokens/s, batch 1",
    "tok_s_b8": "greedy tokens/s, batch 8",
    "tok_s_serve": "greedy tokens/s at the serving batch (compress.eval.serve_batch: serve.max_batch_size)",
    "peak_mem_mb": "peak memory growth while decoding at batch 8 (MiB): CUDA allocated, or CPU RSS",
}
ROW_KEYS = tuple(ROW_DOC)

ModelSpec = str | Path | tuple[Any, Any]
Loader = Callable[[Path, str], tuple[Any, Any]]
SftVal = Sequence[dict[str, Any]] | Callable[[Any], Sequence[dict[str, Any]]]


@dataclass(frozen=True)
class EvalSettings:
    """What every model in one comparison is evaluated with."""

    batch_size: int = 8
    """Rows per forward pass for the two losses (the figures do not depend on it)."""
    val_rows: int | None = 256
    """Packed val rows scored, first in sorted-shard order (None: all)."""
    sft_rows: int | None = 256
    """SFT val rows scored, first in order (None: all)."""
    max_new_tokens: int = 64
    """Most tokens generated per held-out prompt."""
    gen_batch_size: int = 8
    """Prompts per `generate` call for the quality metrics."""
    speed_tokens: int = 32
    """Tokens generated per row when measuring tokens/s and peak memory."""
    measure_speed: bool = True
    """Measure tokens/s and peak memory (needs prompts); off leaves those keys None."""
    serve_batch: int | None = None
    """Also measure tokens/s at this batch (`tok_s_serve`: what serving a variant costs); None: not measured."""
    device: str = "cpu"
    """Where models given as directories are loaded (in-memory models stay where they are)."""
    harness: HarnessSettings | None = None
    """lm-evaluation-harness tasks run on every model: one column per task metric after `ROW_KEYS`
    (`llm.eval.harness`); None: none."""


def _load_dir(path: Path, device: str) -> tuple[Any, Any]:
    loaded = load_model(path, device)
    return loaded.model, loaded.tokenizer


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Dropout off while evaluating; a model handed over mid-training gets its mode back."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _plain(value: Any) -> Any:
    """A JSON-ready value: numpy scalars as Python numbers, inf/nan as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _sft_for(sft_val: SftVal | None, tokenizer: Any, limit: int | None) -> Sequence[dict[str, Any]] | None:
    if sft_val is None:
        return None
    rows = sft_val(tokenizer) if callable(sft_val) else sft_val
    return rows[:limit] if limit is not None else rows


def _speed(model: Any, tokenizer: Any, prompts: Sequence[PromptPair], settings: EvalSettings) -> dict[str, Any]:
    prompt = encode_prompts(tokenizer, prompts[:1])[0]
    pad = pad_id(tokenizer)
    b1 = tokens_per_second(model, prompt, 1, settings.speed_tokens, pad)
    with PeakMemory(model_device(model)) as peak:
        b8 = tokens_per_second(model, prompt, 8, settings.speed_tokens, pad)
    batch = settings.serve_batch
    serve = {1: b1, 8: b8}.get(batch) if batch else None  # batch 1 or 8: measured already
    if batch and serve is None:  # one more batch size, fewer repeats: it is one figure
        serve = tokens_per_second(model, prompt, batch, settings.speed_tokens, pad, repeats=2)
    return {"tok_s_b1": b1, "tok_s_b8": b8, "tok_s_serve": serve, "peak_mem_mb": peak.bytes / MB}


def evaluate_model(name: str, model: Any, tokenizer: Any, *, packed_val: np.ndarray | None = None,
                   sft_val: SftVal | None = None, prompts: Sequence[PromptPair] = (),
                   settings: EvalSettings | None = None) -> dict[str, Any]:
    """One table row for a loaded model (the load facts are the caller's: `source`, `disk_mb`, `load_s`).

    The inputs after `tokenizer` are keyword-only and optional: each one left out leaves its figures None
    (the same keywords as `evaluate_models`, which passes them through).

    Args:
        name: the row's `model`.
        model: a `transformers` causal LM; it is evaluated in eval mode and given its mode back.
        tokenizer: its tokenizer, with a chat template when `prompts` are given.
        packed_val: (rows, seq_len) packed val tokens; scored up to `settings.val_rows`.
        sft_val: SFT rows (`input_ids`, `labels`), or a function of the tokenizer that renders them.
        prompts: held-out prompts; also what tokens/s and peak memory decode (the first one).
        settings: batch sizes, row counts and decoding length.
    """
    settings = settings or EvalSettings()
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(model=name, source="in-memory", device=str(model_device(model)), params=param_count(model),
               weights_mb=weights_bytes(model) / MB)
    with _eval_mode(model):
        if packed_val is not None:
            val = packed_perplexity(model, packed_val[:settings.val_rows], settings.batch_size)
            row.update(val_loss=val["loss"], val_ppl=val["ppl"], val_tokens=val["tokens"])
        rows = _sft_for(sft_val, tokenizer, settings.sft_rows)
        if rows is not None:
            sft = assistant_loss(model, rows, settings.batch_size, pad_id(tokenizer))
            row.update(sft_loss=sft["loss"], sft_ppl=sft["ppl"], sft_tokens=sft["tokens"], sft_skipped=sft["skipped"])
        if prompts:
            row.update(generation_metrics(model, tokenizer, prompts, settings.max_new_tokens, settings.gen_batch_size))
            if settings.measure_speed:
                row.update(_speed(model, tokenizer, prompts, settings))
        tasks = task_scores(model, tokenizer, settings.harness) if settings.harness else {}
    return {k: _plain(v) for k, v in {**{k: row[k] for k in ROW_KEYS}, **tasks}.items()}


def evaluate_models(models: Mapping[str, ModelSpec], *, packed_val: str | Path | np.ndarray | None = None,
                    sft_val: str | Path | SftVal | None = None, prompts: Sequence[PromptPair] = (),
                    settings: EvalSettings | None = None, loader: Loader | None = None) -> list[dict[str, Any]]:
    """Evaluate every model on the same inputs: one `eval.json`-ready row each, all with `ROW_KEYS` (and the
    lm-eval task columns of `settings.harness`, checked before any model loads).

    Args:
        models: name -> a model directory (any compress variant or Hugging Face directory with its tokenizer)
            or a loaded `(model, tokenizer)`.
        packed_val: `<run>/data` (or a folder of packed shards), or (rows, seq_len) token ids.
        sft_val: `<run>/data` (or a folder of SFT shards), SFT rows, or a function of a model's tokenizer
            returning rows (e.g. `lambda tok: render_rows(tok, records)` for models with other tokenizers).
        prompts: held-out prompts from `llm.eval.data.prompt_pairs`, answered by every model.
        settings: shared batch sizes, row counts, decoding length and load device.
        loader: opens a directory as `(model, tokenizer)`; defaults to `llm.models.load.load_model`.

    Raises:
        LLMRayError: a model directory that does not load, or missing or malformed val data (one line).
    """
    settings = settings or EvalSettings()
    if settings.harness:
        check_tasks(settings.harness)
    if isinstance(packed_val, (str, Path)):
        packed_val = packed_rows(packed_val, settings.val_rows)
    if isinstance(sft_val, (str, Path)):
        sft_val = sft_rows(sft_val, settings.sft_rows)
    rows = []
    for name, spec in models.items():
        if isinstance(spec, tuple):
            rows.append(evaluate_model(name, *spec, packed_val=packed_val, sft_val=sft_val, prompts=prompts,
                                       settings=settings))
            continue
        folder = Path(spec)
        start = time.perf_counter()
        model, tokenizer = (loader or _load_dir)(folder, settings.device)
        load_s = time.perf_counter() - start
        row = evaluate_model(name, model, tokenizer, packed_val=packed_val, sft_val=sft_val, prompts=prompts,
                             settings=settings)
        row.update(source=str(folder), disk_mb=dir_bytes(folder) / MB, load_s=load_s)
        rows.append(row)
        del model, tokenizer
        _release()
    return rows


def _release() -> None:
    """Free a model that was evaluated before loading the next one."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# (key, header, format) of the columns `format_table` shows by default: what fits one screen.
COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", "s"), ("params", "params", "count"), ("disk_mb", "disk MB", ".1f"),
    ("load_s", "load s", ".2f"), ("val_ppl", "val ppl", ".2f"), ("sft_loss", "sft loss", ".3f"),
    ("sft_ppl", "sft ppl", ".2f"), ("rouge_l", "ROUGE-L", ".3f"), ("bleu", "BLEU", ".1f"),
    ("exact_match", "EM", ".2f"), ("token_f1", "F1", ".2f"), ("tok_s_b1", "tok/s b1", ".1f"),
    ("tok_s_b8", "tok/s b8", ".1f"),
    ("tok_s_serve", "tok/s serve", ".1f"),
    ("peak_mem_mb", "peak MB", ".1f"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "count" and isinstance(value, (int, float)):
        for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= scale:
                return f"{value / scale:.1f}{suffix}"
        return str(value)
    if fmt != "s" and isinstance(value, float):
        return format(value, fmt)
    return str(value)


def task_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lm-eval task columns (`<task>/<metric>`) of `rows`, in first-seen order."""
    return list(dict.fromkeys(k for row in rows for k in row if k not in ROW_DOC and "/" in k))


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of evaluation rows, one model per line, columns aligned (no terminal needed).

    Args:
        rows: rows from `evaluate_models` (or read back from `eval.json`).
        columns: keys to show, in order; defaults to the one-screen set in `COLUMNS` (less those no row has a
            non-zero value in: they carry no information) and the task columns.
    """
    known = {key: (header, fmt) for key, header, fmt in COLUMNS}
    keys = list(columns) if columns is not None else [
        key for key, _, _ in COLUMNS if key == "model" or any(row.get(key) not in (None, 0) for row in rows)
    ] + task_columns(rows)
    specs = [(key, *known.get(key, (key, ".4g"))) for key in keys]
    grid = [[header for _, header, _ in specs]]
    grid += [[_cell(row.get(key), fmt) for key, _, fmt in specs] for row in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(specs))]

    def line(cells: list[str]) -> str:
        # The first column (the name) reads left to right; figures line up on their last digit.
        parts = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(grid[0]), rule, *(line(cells) for cells in grid[1:])])
