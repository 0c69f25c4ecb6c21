"""Evaluation: one module that fine-tuning and compression both call, so that their numbers share a table.

Perplexity on packed val tokens, loss over assistant tokens on SFT val, greedy generation scored with
ROUGE-L, BLEU, exact match and token F1, and model facts (size, load time, tokens/s, peak memory). Every model in a
comparison sees the same rows in the same order and the same prompts with the same decoding.
"""

from __future__ import annotations

from llm.eval.data import PromptPair, packed_rows, prompt_pairs, read_jsonl, render_rows, sft_rows
from llm.eval.facts import PeakMemory, dir_bytes, param_count, tokens_per_second, weights_bytes
from llm.eval.generate import encode_prompts, generate_texts, generation_metrics, greedy_generate
from llm.eval.harness import DOCS, HarnessSettings, conversation_text, write_tasks
from llm.eval.loss import assistant_loss, packed_perplexity, token_nll
from llm.eval.table import ROW_KEYS, EvalSettings, evaluate_model, evaluate_models, format_table, task_columns
from llm.eval.text import bleu, exact_match, normalize, rouge_l, text_metrics, token_f1

__all__ = [
    "DOCS", "ROW_KEYS", "EvalSettings", "HarnessSettings", "PeakMemory", "PromptPair", "assistant_loss", "bleu",
    "conversation_text", "dir_bytes", "encode_prompts", "evaluate_model", "evaluate_models", "exact_match",
    "format_table", "generate_texts", "generation_metrics", "greedy_generate", "normalize",
    "packed_perplexity", "packed_rows", "param_count", "prompt_pairs", "read_jsonl", "render_rows", "rouge_l",
    "sft_rows", "task_columns", "text_metrics", "token_f1", "token_nll", "tokens_per_second", "weights_bytes",
    "write_tasks",
]
