"""lm-evaluation-harness tasks in the eval table: one column per task metric, for every model compared.

Each model is scored in-process through lm-eval's Hugging Face backend (`HFLM` given the loaded model and
tokenizer, so int8 and pruned variants are scored as our loader opens them, exactly as served). Task names
are any the installed lm-eval knows (`lm_eval --tasks list`; their data must be on this machine), any task
YAML in `include_path`, and two that llmray writes from the table's own held-out text, so a run with no hub
still has harness numbers:

- `llmray_ppl`: rolling log-likelihood of held-out passages (`loglikelihood_rolling`, as lm-eval's
  wikitext): `word_perplexity`, `byte_perplexity`, `bits_per_byte`;
- `llmray_cloze`: the true ending of a held-out passage among `CHOICES` endings (the others are endings of
  other passages), a multiple-choice continuation as HellaSwag or LAMBADA-style tasks score it: `acc`,
  `acc_norm` (log-likelihood per byte).

Their data (`<task>.jsonl`) and task files (`<task>.yaml`) are written once per table into the stage folder
(`lm_eval/`), so every model answers the same documents and the numbers can be reproduced with the
`lm_eval` CLI (`--include_path <stage>/lm_eval`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.config.train import LmEvalConfig
from llm.errors import ConfigError, DataError
from llm.eval.loss import model_device

BUILTIN_TASKS = ("llmray_ppl", "llmray_cloze")
CHOICES = 4
"""Endings offered per `llmray_cloze` document."""
MIN_WORDS, MAX_WORDS = 16, 64
"""Held-out text is cut into passages of at most `MAX_WORDS` words; shorter than `MIN_WORDS` is dropped."""
ENDING_WORDS = 8
"""Most words of a `llmray_cloze` ending."""
DOCS = 256
"""Most documents written per built-in task (`limit` takes the first ones)."""

_METRICS = {"llmray_ppl": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
            "llmray_cloze": ("acc", "acc_norm")}


@dataclass(frozen=True)
class HarnessSettings:
    """What lm-eval runs on every model of one table."""

    tasks: tuple[str, ...]
    """Task names (built-in, installed or in `include_path`)."""
    task_dir: Path | None = None
    """Where `write_tasks` wrote the built-in tasks (None: no built-in task is asked for)."""
    include_path: str | None = None
    """The user's folder of task YAML files."""
    limit: int | None = 64
    """Documents per task (None: all)."""
    batch_size: int = 8
    """Requests per forward pass."""
    key: str = "eval.lm_eval"
    """The config key named by errors."""

    def paths(self) -> list[str]:
        return [str(p) for p in (self.task_dir, self.include_path) if p is not None]

    @classmethod
    def of(cls, section: LmEvalConfig, task_dir: Path, text: Callable[[], Sequence[str]],
           key: str) -> HarnessSettings | None:
        """The settings of a config's `lm_eval` section (None: no task asked for). Built-in tasks asked for
        are written into `task_dir` from `text()` (held-out text, read only then); where it is too little,
        they are left out of the table with one printed line (the other tasks still run)."""
        tasks = tuple(section.tasks)
        written = None
        if set(tasks) & set(BUILTIN_TASKS):
            try:
                written = write_tasks(task_dir, text())
            except DataError as e:
                print(f"{key}: {e}; left out of the table", flush=True)
                tasks = tuple(t for t in tasks if t not in BUILTIN_TASKS)
        if not tasks:
            return None
        return cls(tasks, written, section.include_path, section.limit, section.batch_size, key)


def conversation_text(conversations: Sequence[Any]) -> list[str]:
    """Held-out text where there are only chat records: every message of every conversation, one stream (chat
    turns are short; passages are cut from the stream)."""
    return [" ".join(str(m.get("content") or "") for c in conversations for m in c)]


def passages(texts: Sequence[str]) -> list[str]:
    """Held-out `texts` cut into passages of `MIN_WORDS`-`MAX_WORDS` words, duplicates dropped, in order."""
    out: dict[str, None] = {}
    for text in texts:
        words = text.split()
        for i in range(0, len(words), MAX_WORDS):
            chunk = words[i:i + MAX_WORDS]
            if len(chunk) >= MIN_WORDS:
                out[" ".join(chunk)] = None
    return list(out)


def _cloze(items: list[str], seed: int) -> list[dict[str, Any]]:
    """Per passage: its last third (at most `ENDING_WORDS` words) as the true ending, the words before it as
    the context, and `CHOICES - 1` endings of other passages (distinct texts), the true one at a seeded
    random position. Short endings fit any context length (lm-eval left-truncates a long context)."""
    rng = random.Random(seed)
    cuts = [(w, len(w) - min(ENDING_WORDS, len(w) // 3)) for w in map(str.split, items)]
    split = [(" ".join(w[:cut]), " " + " ".join(w[cut:])) for w, cut in cuts]
    rows = []
    for i, (context, ending) in enumerate(split):
        others = list(dict.fromkeys(e for j, (_, e) in enumerate(split) if j != i and e != ending))
        if len(others) < CHOICES - 1:
            continue
        choices = rng.sample(others, CHOICES - 1)
        gold = rng.randrange(CHOICES)
        choices.insert(gold, ending)
        rows.append({"context": context, "choices": choices, "gold": gold})
    return rows


def write_tasks(folder: Path, texts: Sequence[str], seed: int = 0) -> Path:
    """Write `llmray_ppl` and `llmray_cloze` (data and task YAML) from held-out `texts` into `folder`.

    Raises:
        DataError: fewer than `CHOICES` passages of `MIN_WORDS` words in the held-out text.
    """
    items = passages(texts)[:DOCS]
    if len(items) < CHOICES:
        raise DataError(f"lm-eval tasks {', '.join(BUILTIN_TASKS)}: the held-out text gives {len(items)} passages "
                        f"of {MIN_WORDS}+ words; {CHOICES} are needed (more val text, or other tasks)")
    folder.mkdir(parents=True, exist_ok=True)
    data = {"llmray_ppl": [{"text": p} for p in items], "llmray_cloze": _cloze(items, seed)}
    specs = {
        "llmray_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}"},
        "llmray_cloze": {"output_type": "multiple_choice", "doc_to_text": "{{context}}",
                         "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}"},
    }
    for task, rows in data.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {"task": task, "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str((folder / f"{task}.jsonl").resolve())}},
                "test_split": "test", **specs[task],
                "metric_list": [{"metric": m} for m in _METRICS[task]], "metadata": {"version": 1.0}}
        # JSON is YAML: no YAML writer needed, and lm-eval reads it as its own task file.
        (folder / f"{task}.yaml").write_text(json.dumps(spec, indent=2) + "\n")
    return folder


@functools.lru_cache(maxsize=4)
def _index(paths: tuple[str, ...], defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def _task_manager(settings: HarnessSettings) -> Any:
    """lm-eval's task index: of the include paths alone when they hold every task asked for (indexing the
    hundreds of installed tasks takes seconds), else with the installed tasks too."""
    paths = tuple(settings.paths())
    if paths:
        local = _index(paths, False)
        if all(t in local.all_tasks for t in settings.tasks):
            return local
    return _index(paths, True)


def check_tasks(settings: HarnessSettings) -> None:
    """Raise a one-line `ConfigError` naming every task neither lm-eval nor the include paths know."""
    known = set(_task_manager(settings).all_tasks)
    unknown = [t for t in settings.tasks if t not in known]
    if unknown:
        where = f" or in {settings.include_path}" if settings.include_path else ""
        raise ConfigError(f"{settings.key}.tasks: {', '.join(unknown)}: no such lm-eval task (built in: "
                          f"{', '.join(BUILTIN_TASKS)}; installed: `lm_eval --tasks list`{where})")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def columns(results: dict[str, Any]) -> dict[str, float | None]:
    """`{"<task>/<metric>": value}` from `simple_evaluate`'s results, sorted by task and metric (filters
    other than `none` are named after the metric, standard errors and aliases left out)."""
    out = {}
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in sorted(metrics.items()):
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr"):
                continue
            out[f"{task}/{metric}" + ("" if filt == "none" else f"[{filt}]")] = _number(value)
    return out


@contextlib.contextmanager
def _tied_as_loaded(model: Any) -> Iterator[None]:
    """`HFLM` re-ties a given model's embeddings; an int8 variant's output layer is its own quantized module,
    so re-tying would fail or undo it: the model is scored as loaded."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights


def task_scores(model: Any, tokenizer: Any, settings: HarnessSettings) -> dict[str, float | None]:
    """Run `settings.tasks` on a loaded model (in eval mode, where it is) and return its table columns."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data only: never ask a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    for name in ("lm_eval", "lm-eval"):  # progress and per-task chatter: the stage log has it at WARNING+
        logging.getLogger(name).setLevel(logging.WARNING)
    with _tied_as_loaded(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
                  device=str(model_device(model)))
    # lm-eval's progress bars (stderr) are not the stage's live line: they are dropped
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        results = simple_evaluate(model=lm, tasks=list(settings.tasks), task_manager=_task_manager(settings),
                                  limit=settings.limit, bootstrap_iters=0, log_samples=False, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    if results is None:  # only on non-zero ranks of a distributed run, which this is not
        raise DataError(f"{settings.key}: lm-eval returned no results")
    return columns(results)
