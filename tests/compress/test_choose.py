"""The choice rule: smallest passing variant, every limit checked, the original when nothing passes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llm.compress.choose import choose, failures, write_chosen
from llm.config.compress import ChooseConfig
from llm.errors import ConfigError

RULE = ChooseConfig(max_ppl_increase=0.05, max_rouge_drop=0.02)


def row(name: str, disk: float, val: float | None, rouge: float | None, sft: float | None = None,
        params: int = 100, tok_s: float | None = 10.0, tok_s_b1: float = 10.0) -> dict[str, Any]:
    return {"model": name, "disk_mb": disk, "val_ppl": val, "sft_ppl": sft, "rouge_l": rouge, "params": params,
            "tok_s_b1": tok_s_b1, "tok_s_serve": tok_s}


ORIGINAL = row("original", 100.0, 20.0, 0.50, sft=10.0, tok_s=5.0)


def test_smallest_passing_variant_is_chosen() -> None:
    rows = [ORIGINAL, row("int8", 30.0, 20.5, 0.49, sft=10.2), row("pruned", 50.0, 20.9, 0.50, sft=10.0),
            row("tiny", 5.0, 40.0, 0.10, sft=30.0)]
    choice = choose(rows, RULE)
    assert choice["variant"] == "int8"
    assert "disk_mb 30" in choice["reason"] and "2 passing" in choice["reason"]
    assert choice["checks"]["int8"] == [] and any("val_ppl" in w for w in choice["checks"]["tiny"])


@pytest.mark.parametrize(("variant", "needle"), [
    (row("v", 1.0, 21.01, 0.50, sft=10.0), "val_ppl 21.010 > 20.000"),  # 5.05 % > 5 %
    (row("v", 1.0, 20.0, 0.50, sft=10.6), "sft_ppl"),
    (row("v", 1.0, 20.0, 0.47, sft=10.0), "rouge_l 0.470 dropped 0.030"),
    (row("v", 1.0, 20.0, None, sft=10.0), "rouge_l not measured"),
    (row("v", 1.0, 20.0, 0.50, sft=None), "sft_ppl not measured"),
])
def test_each_limit_fails_a_variant(variant: dict[str, Any], needle: str) -> None:
    assert any(needle in why for why in failures(variant, ORIGINAL, RULE))
    choice = choose([ORIGINAL, variant], RULE)
    assert choice["variant"] == "original" and "no variant passed" in choice["reason"] and needle in choice["reason"]


def test_exactly_at_the_limits_passes() -> None:
    assert failures(row("v", 1.0, 21.0, 0.48, sft=10.5), ORIGINAL, RULE) == []


def test_limits_the_original_lacks_are_not_applied() -> None:
    bare = row("original", 100.0, 20.0, None)
    assert choose([bare, row("v", 10.0, 20.0, None)], RULE)["variant"] == "v"


@pytest.mark.parametrize(("prefer", "expected"), [("smallest_disk", "a"), ("fewest_params", "b"), ("fastest", "c")])
def test_prefer(prefer: str, expected: str) -> None:
    rows = [ORIGINAL, row("a", 10.0, 20.0, 0.5, sft=10.0, params=90, tok_s=5.0),
            row("b", 20.0, 20.0, 0.5, sft=10.0, params=50, tok_s=6.0),
            row("c", 30.0, 20.0, 0.5, sft=10.0, params=80, tok_s=9.0)]
    assert choose(rows, ChooseConfig(prefer=prefer))["variant"] == expected  # type: ignore[arg-type]


def test_no_original_row_is_an_error() -> None:
    with pytest.raises(ConfigError, match="original"):
        choose([row("int8", 1.0, 1.0, 1.0)], RULE)


def test_chosen_json_is_read_by_serve(tmp_path: Path) -> None:
    """serve's `chosen_model_dir` opens the folder named in chosen.json (variant, or the original's path)."""
    from llm.manifest import write_manifest
    from llm.models.load import chosen_model_dir
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path).llm
    folder = Path(cfg.stage_dir("compress"))
    folder.mkdir(parents=True)
    original = tmp_path / "orig"
    write_chosen(folder, {"variant": "int8", "reason": "r"}, original)
    write_manifest(folder, "compress", "h", {}, {})
    assert Path(chosen_model_dir(cfg)) == folder / "int8"
    write_chosen(folder, {"variant": "original", "reason": "r"}, original)
    write_manifest(folder, "compress", "h", {}, {})  # the manifest checks the files it lists
    assert json.loads((folder / "chosen.json").read_text())["path"] == str(original.resolve())
    assert Path(chosen_model_dir(cfg)) == original.resolve()


def test_a_smaller_variant_that_serves_slower_is_not_chosen() -> None:
    """The quickstart's case: int8 is the smallest file and within the quality limits, but generates slower than
    the original at the serving batch; the default rule picks the smallest variant that is not slower, and
    chosen.json says why in numbers."""
    original = row("original", 100.0, 20.0, 0.50, sft=10.0, tok_s=1103.0)
    int8 = row("int8", 30.0, 20.2, 0.50, sft=10.1, tok_s=916.0)
    pruned = row("pruned", 55.0, 20.9, 0.49, sft=10.4, tok_s=1540.0)
    choice = choose([original, int8, pruned], ChooseConfig(), serve_batch=16)
    assert choice["variant"] == "pruned" and choice["serve_batch"] == 16
    assert choice["checks"]["int8"] == ["tok_s_serve 916.0 < 1103.0 x 1 (slower to serve)"]
    reason = choice["reason"]
    assert "serving tokens/s at batch 16 >= 1 x the original's" in reason
    assert "disk_mb 55 (original 100), tok_s_serve 1540 (original 1103)" in reason
    assert "left out: int8: tok_s_serve 916.0 < 1103.0 x 1 (slower to serve)" in reason
    # Only int8: the original is served, and the reason names the speed.
    alone = choose([original, int8], ChooseConfig(), serve_batch=16)
    assert alone["variant"] == "original" and "slower to serve" in alone["reason"]
    # The speed limit can be relaxed or turned off.
    assert choose([original, int8, pruned], ChooseConfig(min_speed_ratio=0.8))["variant"] == "int8"
    assert choose([original, int8, pruned], ChooseConfig(min_speed_ratio=0))["variant"] == "int8"


def test_fastest_weighs_the_serving_batch_not_batch_one() -> None:
    original = row("original", 100.0, 20.0, 0.50, sft=10.0, tok_s=100.0)
    quick_alone = row("quick-alone", 40.0, 20.0, 0.50, sft=10.0, tok_s=110.0, tok_s_b1=90.0)
    quick_batched = row("quick-batched", 50.0, 20.0, 0.50, sft=10.0, tok_s=180.0, tok_s_b1=40.0)
    choice = choose([original, quick_alone, quick_batched], ChooseConfig(prefer="fastest"), serve_batch=8)
    assert choice["variant"] == "quick-batched" and choice["reason"].startswith("fastest of 2 passing")
    assert "tok_s_serve 180 (original 100)" in choice["reason"]


def test_an_unmeasured_serving_speed_fails_a_variant() -> None:
    original = row("original", 100.0, 20.0, 0.50, sft=10.0, tok_s=100.0)
    why = failures(row("v", 1.0, 20.0, 0.50, sft=10.0, tok_s=None), original, ChooseConfig())
    assert why == ["tok_s_serve not measured"]


def test_serve_batch_defaults_to_serves_batch(tmp_path: Path) -> None:
    from tests.conftest import tiny_config

    assert tiny_config(tmp_path, "serve.max_batch_size=12").llm.compress.eval.serve_batch == 12
    assert tiny_config(tmp_path, "serve.max_batch_size=12",
                       "compress.eval.serve_batch=3").llm.compress.eval.serve_batch == 3


def test_lm_eval_task_scores_gate_the_choice() -> None:
    rule = ChooseConfig(max_ppl_increase=0.05, max_rouge_drop=0.02, min_task_scores={"llmray_cloze/acc": 0.5})
    original = {**ORIGINAL, "llmray_cloze/acc": 0.75}
    small = {**row("small", 10.0, 20.0, 0.50, sft=10.0), "llmray_cloze/acc": 0.25}
    larger = {**row("larger", 50.0, 20.0, 0.50, sft=10.0), "llmray_cloze/acc": 0.5}  # exactly at the least: passes
    unscored = row("unscored", 1.0, 20.0, 0.50, sft=10.0)
    choice = choose([original, small, larger, unscored], rule)
    assert choice["variant"] == "larger" and "llmray_cloze/acc >= 0.5" in choice["reason"]
    assert choice["checks"]["small"] == ["llmray_cloze/acc 0.25 < 0.5"]
    assert choice["checks"]["unscored"] == ["llmray_cloze/acc not measured"]


def test_a_task_gate_must_name_a_task_that_runs(tmp_path: Path) -> None:
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match=r"min_task_scores: 'llmray_cloze/acc': name a column .* \(none\)"):
        tiny_config(tmp_path, "compress.eval.lm_eval.tasks=[]",
                    "compress.choose.min_task_scores={llmray_cloze/acc: 0.3}")
    cfg = tiny_config(tmp_path, "compress.eval.lm_eval.tasks=[llmray_cloze]",
                      "compress.choose.min_task_scores={llmray_cloze/acc: 0.3}").llm
    assert cfg.compress.choose.min_task_scores == {"llmray_cloze/acc": 0.3}
