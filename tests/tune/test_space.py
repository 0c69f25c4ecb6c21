"""The sweep section without Ray: bad spaces are one-line errors, Tune objects built from the config,
the best trial chosen by final validation loss among trials that ran to the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.config import ConfigError
from llm.errors import StageInputError
from llm.tune import space
from llm.tune.results import TrialRow, choose_best
from tests.conftest import tiny_config


@pytest.mark.parametrize("override, key, words", [
    ("sweep.space.peak=[0.01, 0.001]", "metadata.llm.sweep.space.peak", "low <= high"),
    ("sweep.space.peak=[0, 0.001]", "metadata.llm.sweep.space.peak", "low > 0"),
    ("sweep.space.kind=[cosine, exponential]", "metadata.llm.sweep.space.kind", "cosine"),
    ("sweep.space.warmup_fraction=[0.1, 1.5]", "metadata.llm.sweep.space.warmup_fraction", "[0, 1)"),
    ("sweep.space.floor=[-0.1, 0.2]", "metadata.llm.sweep.space.floor", "[0, 1]"),
    ("sweep.space.kind=[]", "metadata.llm.sweep.space.kind", "at least 1"),
    ("sweep.grace_period=50", "metadata.llm.sweep", "grace_period (50) must be <= max_steps"),
    ("sweep.search=hyperopt", "metadata.llm.sweep.search", "optuna"),
    ("sweep.spce.peak=[1, 2]", "metadata.llm.sweep.spce", "unknown key"),
])
def test_bad_space_is_one_line_naming_the_key(tmp_path: Path, override: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path, "sweep.max_steps=40", override)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(key + ":") or message.startswith(key + "."), message
    assert words in message and "local.yaml" in message


def test_grid_space_and_trial_count(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "sweep.search=grid", "sweep.space.kind=[cosine, wsd]", "sweep.grid_peaks=3",
                      "sweep.space.peak=[1e-4, 1e-2]", "sweep.space.weight_decay=[0.0, 0.1]").llm
    grid = space.param_space(cfg.sweep)
    assert grid["peak"]["grid_search"] == pytest.approx([1e-4, 1e-3, 1e-2])
    assert grid["kind"]["grid_search"] == ["cosine", "wsd"]
    assert space.planned_trials(cfg.sweep) == 2 * 3 * 2
    assert grid["warmup_fraction"] == pytest.approx(0.1)


def test_random_and_optuna_searchers(tmp_path: Path) -> None:
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    cfg = tiny_config(tmp_path, "sweep.search=optuna", "sweep.space.floor=[0.1, 0.1]").llm
    limited = space.searcher(cfg.sweep, 2)
    assert isinstance(limited, ConcurrencyLimiter) and isinstance(limited.searcher, OptunaSearch)
    assert limited.max_concurrent == 2
    values = space.param_space(cfg.sweep)
    assert values["floor"] == 0.1  # a fixed value is not a dimension
    sched = space.schedule_of({"kind": "wsd", "peak": 1e-3, "warmup_fraction": 0.25, "floor": 0.1}, 40)
    assert (sched.kind, sched.warmup_steps) == ("wsd", 10)


def _row(trial_id: str, status: str, final: float, steps: int) -> TrialRow:
    return TrialRow(trial_id, "cosine", 1e-3, 0.1, 1, 0.1, None, None, steps, final, final, status == "stopped",
                    1.0, status)


def test_best_is_lowest_final_loss_among_finished_trials() -> None:
    rows = [_row("a", "finished", 3.0, 12), _row("b", "finished", 2.5, 12), _row("c", "stopped", 2.0, 4),
            _row("d", "error", 1.0, 2)]
    best = choose_best(rows)
    assert best is not None and best.trial_id == "b"
    only_stopped = choose_best([_row("c", "stopped", 2.0, 4), _row("e", "stopped", 1.5, 4)])
    assert only_stopped is not None and only_stopped.trial_id == "e"


def test_lr_best_without_a_sweep_names_the_key(tmp_path: Path) -> None:
    from llm.train.best_lr import resolve_lr

    cfg = tiny_config(tmp_path, "pretrain.lr=best").llm
    assert cfg.pretrain.lr == "best"
    with pytest.raises(StageInputError, match=r"^metadata\.llm\.pretrain\.lr: best: .*llmray sweep"):
        resolve_lr(cfg, "pretrain")
