"""Fine-tuning every family of the zoo, in process (no Ray): the base's own template renders the labels, which
end at its end-of-turn token; LoRA wraps the family's projections; the streamed merge equals base + adapter;
exports keep the family's config fields and stop where its turns end; a base is checked before Ray starts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llm.errors import ConfigError
from llm.models.chat import IGNORE
from llm.models.stops import end_of_turn_ids
from llm.train.sft import prepare_tokenizer, render_sources
from tests.models import conftest as zoo_fixtures
from tests.models.zoo import FAMILIES
from tests.train.test_finetune_helpers import finetune_config, sft_records, write_jsonl

MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say apple."},
         {"role": "assistant", "content": "apple"}, {"role": "user", "content": "And river?"},
         {"role": "assistant", "content": "river river"}]
ATTN_MLP = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TARGETS = {**dict.fromkeys(("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "olmo2"), ATTN_MLP),
           "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, "gpt2": {"c_attn", "c_proj", "c_fc"}}
FAMILY_NAMES = sorted(FAMILIES)
zoo = zoo_fixtures.zoo  # the zoo's session fixture, shared rather than redefined


@pytest.fixture(scope="module")
def prepared(zoo: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """`prepared(name)`: the family's tokenizer as fine-tuning saves it (pad token; a template where none)."""
    root = tmp_path_factory.mktemp("prepared")
    done: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in done:
            done[name] = prepare_tokenizer(zoo(name), root / name)
        return done[name]

    return get


def spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    cur: list[int] = []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_labels_are_the_answers_closed_by_the_families_end_of_turn(prepared, name):
    from llm.eval.turns import render_chat

    tok = prepared(name)
    family = FAMILIES[name]
    turn_end = family.turn_end or family.eos  # GPT-2 has no template: the generic one closes turns with eos
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok)) == [turn_end]
    ids, labels, merged = render_chat(tok, MULTI)
    assert merged == (name == "gemma2")  # Gemma 2's template refuses a system role: it joins the first turn
    got = spans(ids, labels)
    assert len(got) == 2
    for span, answer in zip(got, ("apple", "river river"), strict=True):
        assert tok.convert_ids_to_tokens(span[-1]) == turn_end  # the turn's close is learned, nothing after it
        assert tok.decode(span[:-1]).strip() == answer
    prompt_side = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    assert "Be brief." in prompt_side and "And river?" in prompt_side  # the system text is kept, not trained


def test_eval_prompts_with_a_system_message_render_for_gemma2(prepared):
    """The before/after evaluation prompts a Gemma 2 model as training rendered it: system text in the first
    user turn (the template itself would raise)."""
    from llm.eval.data import PromptPair
    from llm.eval.generate import encode_prompts

    tok = prepared("gemma2")
    [ids] = encode_prompts(tok, [PromptPair(MULTI[:4], "river river")])
    text = tok.decode(ids)
    assert "<start_of_turn>user\nBe brief.\n\nSay apple.<end_of_turn>" in text
    assert text.endswith("<start_of_turn>model\n")


@pytest.mark.parametrize("name", ["gemma2", "mistral"])
def test_template_refusals_are_merged_or_counted(prepared, name, tmp_path):
    """Gemma 2: records with a system prompt are kept (merged into the first user turn) and counted; it renders
    a later system turn as a turn of its own. Mistral's template folds a leading system message itself but
    refuses one mid-conversation: that record is dropped, named, with its reason, and the stage goes on."""
    tok = prepared(name)
    late_system = {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"},
                                {"role": "assistant", "content": "ok"}]}
    src = write_jsonl(tmp_path / "in.jsonl", [*sft_records(12), late_system])
    done = render_sources(tok, [str(src)], tmp_path / "sft", 128, 0.0, "metadata.llm.finetune.data")
    with_system = sum("messages" in r and r["messages"][0]["role"] == "system" for r in sft_records(12))
    assert done.counts["system_merged"] == (with_system if name == "gemma2" else 0)
    refused = [{"record": f"{src}:13", "reason": "template_error"}] if name == "mistral" else []
    assert done.dropped == refused and done.counts["examples"] == 13 - len(refused)


def _lora(base_dir: Path, out: Path) -> Any:
    """LoRA on the base with random (non-zero) B, exported through the stage's export hook."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm.config import ModelConfig, TrainConfig
    from llm.train.lora import apply, export_adapter
    from llm.train.spec import LoopSpec

    spec = LoopSpec(train=TrainConfig(), model=ModelConfig(path=str(base_dir)), vocab_size=0, seq_len=0,
                    out_dir=str(out), extra={"lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                                                      "target_modules": None}})
    model = apply(AutoModelForCausalLM.from_pretrained(str(base_dir)), spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "lora_B" in param_name:
                p.normal_(0, 0.2)
    export_adapter(SimpleNamespace(module=model), spec, None)
    return model


def _family_fields(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in ("transformers_version", "dtype", "torch_dtype")}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_lora_wraps_the_families_projections_and_the_merge_equals_base_plus_adapter(zoo, prepared, name,
                                                                                      tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llm.train.merge import merge_adapter

    base = zoo(name)
    tok = prepared(name)
    model = _lora(base, tmp_path)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == TARGETS[name]
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["fan_in_fan_out"] == (name == "gpt2")  # Conv1D weights are (in, out)
    merge_adapter(base, tmp_path / "adapter", tmp_path / "merged", tok.name_or_path)
    ids = torch.randint(0, len(tok), (2, 20))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)),
                                        str(tmp_path / "adapter")).eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(base)).eval()(input_ids=ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
        merged = merged_model(input_ids=ids).logits
    assert not torch.allclose(ref, plain, atol=1e-3)
    torch.testing.assert_close(merged, ref, atol=1e-4, rtol=1e-4)
    # The merged directory is the family's model: same class, every config field kept (soft-capping, sliding
    # windows, rope scaling, biases, tying), and it stops at the template's end of turn.
    assert type(merged_model).__name__ == type(plain_model := AutoModelForCausalLM.from_pretrained(str(base))).__name__
    assert _family_fields(tmp_path / "merged") == _family_fields(base)
    del plain_model
    eos = GenerationConfig.from_pretrained(str(tmp_path / "merged")).eos_token_id
    assert set(end_of_turn_ids(tok)) <= set(eos if isinstance(eos, list) else [eos])


@pytest.mark.parametrize("name", ["phi3", "gemma2", "qwen3"])
def test_full_export_keeps_the_family(zoo, prepared, name, tmp_path):
    """Full fine-tuning exports through `export_model`: it loads with `from_pretrained` as the same class with
    the same config fields and weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm.train.export import export_model

    base = zoo(name)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    out = export_model(SimpleNamespace(module=model), tmp_path / "model", prepared(name))
    assert out is not None
    again = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(again) is type(model)
    assert {k: v for k, v in _family_fields(out).items() if k != "use_cache"} == \
        {k: v for k, v in _family_fields(base).items() if k != "use_cache"}
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_a_base_is_checked_before_ray_starts(zoo, tmp_path, capsys):
    """The driver says what a base gets (family, template, end of turn) and refuses, in one line, a config
    transformers does not know, a tokenizer larger than the embedding, or max_len beyond the context."""
    import shutil

    from llm.train.finetune import base_dir

    cfg = finetune_config(tmp_path, f"finetune.base={zoo('qwen2')}").llm
    assert base_dir(cfg) == zoo("qwen2")
    assert "base qwen2 (a tested family), its own chat template, turns end at <|im_end|>, context 256" in \
        capsys.readouterr().out
    cfg = finetune_config(tmp_path, f"finetune.base={zoo('gpt2')}").llm
    base_dir(cfg)
    assert "base gpt2 (a tested family), no chat template: the generic one, turns end at eos" in capsys.readouterr().out

    long = finetune_config(tmp_path, f"finetune.base={zoo('gpt2')}", "finetune.max_len=512").llm
    with pytest.raises(ConfigError, match=r"^metadata\.llm\.finetune\.max_len: 512 tokens, but the base .* has 256 "
                                          r"learned positions"):
        base_dir(long)
    base_dir(finetune_config(tmp_path, f"finetune.base={zoo('llama')}", "finetune.max_len=512").llm)
    assert "context 256; metadata.llm.finetune.max_len=512 runs past it (rotary positions" in capsys.readouterr().out

    odd = tmp_path / "odd"
    shutil.copytree(zoo("llama"), odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "nosuchfamily"}))
    with pytest.raises(ConfigError, match=r"^metadata\.llm\.finetune\.base: .*config.json does not load") as e:
        base_dir(finetune_config(tmp_path, f"finetune.base={odd}").llm)
    assert "\n" not in str(e.value)
    remote = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "custom", "auto_map": remote}))
    with pytest.raises(ConfigError, match=r"custom code"):  # refused at once, no interactive prompt
        base_dir(finetune_config(tmp_path, f"finetune.base={odd}").llm)
    (odd / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    with pytest.raises(ConfigError, match=r"tokens but the model 100 embedding rows"):
        base_dir(finetune_config(tmp_path, f"finetune.base={odd}").llm)


def test_a_family_not_listed_gets_the_generic_lora_targets(zoo):
    """A model_type transformers knows but the project has not tested (here a Llama relabelled `granite`)
    takes the generic rule: every linear layer of its blocks."""
    from transformers import AutoModelForCausalLM

    from llm.train.lora import FAMILY_TARGETS, default_targets

    model = AutoModelForCausalLM.from_pretrained(str(zoo("llama")))
    model.config.model_type = "granite"
    assert "granite" not in FAMILY_TARGETS
    assert set(default_targets(model)) == ATTN_MLP
