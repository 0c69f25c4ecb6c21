"""A brought base fully fine-tuned on Ray Train + DeepSpeed with 2 CPU workers: Gemma 2 (soft-capping, sliding
windows, a template that refuses system roles), among the most unlike the project's own Llama and GPT-2 (tested
in test_finetune_ray.py), under ZeRO-3 (partitioned weights gathered for the export) with the before/after
evaluation. Full fine-tuning under ZeRO-2 exports as pretraining does (tests/train/test_pretrain_ray.py).
The other families' rendering, LoRA targets, merge and export are checked in process by
test_finetune_families.py, and every family's LoRA fine-tune on Ray by tests/test_families_route.py (Phi-3's
with 2 workers under ZeRO-3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm.train.finetune import run
from tests.models import conftest as zoo_fixtures
from tests.train.test_finetune_helpers import finetune_config, label_ends, sft_records, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.slow]
zoo = zoo_fixtures.zoo


def _finetune(zoo, tmp: Path, name: str, *overrides: str):
    data = write_jsonl(tmp / "chat.jsonl", sft_records())
    loaded = finetune_config(tmp, f"finetune.base={zoo(name)}", f"finetune.data=[{data}]", *overrides)
    return run(loaded.llm)


def test_gemma2_full_zero3_with_system_prompts(ray_session, zoo, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    result = _finetune(zoo, tmp_path, "gemma2", "finetune.method=full", "finetune.zero_stage=3")
    folder = Path(result.path)
    m = result.metrics
    with_system = sum("messages" in r for r in sft_records())
    assert m["data"]["system_merged"] == with_system and not m["data"]["dropped"]  # kept, not dropped
    tok = AutoTokenizer.from_pretrained(str(folder / "model"))
    assert label_ends(folder) == {tok.convert_tokens_to_ids("<end_of_turn>")}
    config = AutoConfig.from_pretrained(str(folder / "model"))
    assert (config.model_type, config.attn_logit_softcapping, config.final_logit_softcapping,
            config.sliding_window) == ("gemma2", 50.0, 30.0, 32)
    assert type(AutoModelForCausalLM.from_pretrained(str(folder / "model"))).__name__ == "Gemma2ForCausalLM"
    assert m["trainable_params"] == m["params"] and not (folder / "adapter").exists()
    from safetensors.torch import load_file

    tuned = load_file(str(folder / "model" / "model.safetensors"))
    base = load_file(str(Path(zoo("gemma2")) / "model.safetensors"))
    assert tuned.keys() == base.keys() and all(tuned[k].shape == base[k].shape for k in base)
    assert sum(not (tuned[k] == base[k]).all() for k in base) > len(base) // 2  # fully trained, not an adapter
    rows = json.loads((folder / "eval.json").read_text())
    assert [r["prompts"] for r in rows] == [4, 4]  # held-out prompts with system messages answered by both
    assert rows[1]["sft_loss"] < rows[0]["sft_loss"]
