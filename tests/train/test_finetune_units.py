"""Fine-tuning pieces without Ray: loss masks, re-rendering for another tokenizer, named bad records, a
`datasets` folder source, adapter verification, the streaming merge against base + adapter, base errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from llm.errors import ConfigError, DataError, TrainingError
from llm.models.chat import IGNORE, render
from llm.train.sft import check_vocab, prepare_tokenizer, render_sources
from tests.train.test_finetune_helpers import (
    finetune_config,
    our_tokenizer,
    sft_records,
    tiny_gpt2,
    tiny_llama,
    write_jsonl,
)

MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say apple."},
         {"role": "assistant", "content": "apple"}, {"role": "user", "content": "And river?"},
         {"role": "assistant", "content": "river river"}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft-units")
    tok = our_tokenizer(root / "tok")
    return {"root": root, "tok": root / "tok", "llama": tiny_llama(root / "llama", tok),
            "gpt2": tiny_gpt2(root / "gpt2")}


def labelled_spans(tok, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    spans, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE:
            assert lab == i  # a label is the token itself (the model shifts)
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_only_assistant_turns_carry_labels_multi_turn(dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dirs["tok"]))
    ids, labels = render(tok, MULTI)
    assert labelled_spans(tok, ids, labels) == ["apple<|end|>\n", "river river<|end|>\n"]
    # Everything else (system, user turns, role headers) is masked.
    masked = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    assert "Be brief." in masked and "Say apple." in masked and "And river?" in masked
    assert "river river" not in masked


def test_foreign_base_gets_its_own_ids_and_the_default_template(dirs, tmp_path):
    from transformers import AutoTokenizer

    tok = prepare_tokenizer(dirs["gpt2"], tmp_path / "tokenizer")
    assert AutoTokenizer.from_pretrained(str(dirs["gpt2"])).chat_template is None
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert saved.chat_template and saved.pad_token == saved.eos_token == "<eos>"
    from llm.eval.turns import render_chat

    ids, labels, _ = render_chat(saved, MULTI)
    assert max(ids) < len(tok) == 320
    # The generic template closes a turn with the base's own eos (the project's <|end|> would be plain text in
    # a foreign vocabulary, and serving would not stop at it): labels end there.
    assert labelled_spans(saved, ids, labels) == ["apple<eos>", "river river<eos>"]


def test_malformed_records_are_counted_and_named(dirs, tmp_path):
    tok = prepare_tokenizer(dirs["llama"], tmp_path / "tokenizer")
    src = write_jsonl(tmp_path / "in.jsonl", sft_records(40),
                      ("{oops", json.dumps({"messages": [{"role": "user", "content": "no answer"}]})))
    done = render_sources(tok, [str(src)], tmp_path / "sft", 128, 0.2, "metadata.llm.finetune.data")
    assert done.dropped == [{"record": f"{src}:3", "reason": "bad_json"},
                            {"record": f"{src}:5", "reason": "no_assistant"}]
    assert done.counts["examples"] == 40 and done.counts["train"] + done.counts["val"] == 40
    assert 0 < done.counts["val"] < 20 and len(done.val_records) == done.counts["val"]
    stats = json.loads((tmp_path / "sft" / "stats.json").read_text())
    assert stats["counts"]["dropped_bad_json"] == 1
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": 1}])
    with pytest.raises(DataError, match=rf"^metadata\.llm\.finetune\.data: no usable training example .*{only_bad}:1"):
        render_sources(tok, [str(only_bad)], tmp_path / "sft2", 128, 0.2, "metadata.llm.finetune.data")


def test_datasets_folder_is_a_source(dirs, tmp_path):
    import datasets
    import pyarrow.parquet as pq

    tok = prepare_tokenizer(dirs["llama"], tmp_path / "tokenizer")
    recs = [{"prompt": r["prompt"], "response": r["response"]} for r in sft_records(20) if "prompt" in r]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "hf"))
    done = render_sources(tok, [str(tmp_path / "hf")], tmp_path / "sft", 128, 0.0, "metadata.llm.finetune.data")
    assert done.counts["train"] == len(recs) and not done.dropped
    table = pq.read_table(next((tmp_path / "sft" / "train").glob("*.parquet")))
    first = table.to_pylist()[0]
    assert first["input_ids"] == render(tok, [{"role": "user", "content": recs[0]["prompt"]},
                                              {"role": "assistant", "content": recs[0]["response"]}])[0]


def test_ids_beyond_the_base_vocabulary_are_refused(dirs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"input_ids": pa.array([[1, 2, 383]], pa.list_(pa.int32()))}), shard)
    check_vocab([str(shard)], 384, "llama")
    with pytest.raises(DataError, match=rf"^{shard}: token id 383 but the base gpt2 has 320 embedding rows"):
        check_vocab([str(shard)], 320, "gpt2")


def _adapter(base_dir: Path, out: Path, targets: list[str] | None = None):
    """A LoRA on the base with random (non-zero) B, exported through the stage's export hook."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm.train.lora import apply, export_adapter

    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    from llm.config import ModelConfig, TrainConfig
    from llm.train.spec import LoopSpec

    spec = LoopSpec(train=TrainConfig(), model=ModelConfig(path=str(base_dir)), vocab_size=0, seq_len=0,
                    out_dir=str(out),
                    extra={"lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": targets}})
    model = apply(base, spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    export_adapter(SimpleNamespace(module=model), spec, None)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_model_matches_base_plus_adapter(dirs, tmp_path, arch):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from llm.train.merge import merge_adapter

    base_dir = dirs[arch]
    _adapter(base_dir, tmp_path)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in saved}
    expect = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
              "gpt2": {"c_attn", "c_proj", "c_fc"}}[arch]
    assert modules == expect  # every linear layer of attention and MLP, nothing else
    merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged", dirs["tok"])
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                        str(tmp_path / "adapter")).eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()(input_ids=ids).logits
    assert not torch.allclose(ref, plain, atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(merged, ref, atol=1e-4, rtol=1e-4)
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) == 3  # 2 blocks + the rest, streamed
    # The merged model is served with the fine-tuning template: its end-of-turn is among the eos ids.
    tok = AutoTokenizer.from_pretrained(str(dirs["tok"]))
    eos = GenerationConfig.from_pretrained(str(tmp_path / "merged")).eos_token_id
    assert {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")} <= set(eos)


def test_export_lists_the_templates_end_of_turn_among_eos(dirs, tmp_path):
    """The full-model export (pretrain, full fine-tuning, distillation) writes a generation config that stops
    at `<|end|>`, not only at eos as the model's own config says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from llm.train.export import export_model

    tok = AutoTokenizer.from_pretrained(str(dirs["tok"]))
    model = AutoModelForCausalLM.from_pretrained(str(dirs["llama"]))
    assert model.generation_config.eos_token_id == tok.eos_token_id  # what the base itself knows
    out = export_model(SimpleNamespace(module=model), tmp_path / "model", tok)
    assert out is not None
    eos = GenerationConfig.from_pretrained(str(out)).eos_token_id
    assert eos == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")})
    assert AutoModelForCausalLM.from_pretrained(str(out)).num_parameters() == model.num_parameters()


def test_empty_or_misshapen_adapter_is_an_error(dirs, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from llm.train.lora import ADAPTER_FILE, expected_shapes, verify_adapter

    model = _adapter(dirs["llama"], tmp_path, ["q_proj"])
    expected = expected_shapes(model)
    assert len(expected) == 4 and all(len(s) == 2 for s in expected.values())
    verify_adapter(tmp_path / "adapter", expected)
    state = load_file(str(tmp_path / "adapter" / ADAPTER_FILE))
    key = sorted(state)[0]
    state[key] = torch.empty(0)  # what a ZeRO-3 partition saved without gathering looks like
    save_file(state, str(tmp_path / "adapter" / ADAPTER_FILE))
    with pytest.raises(TrainingError, match=rf"{ADAPTER_FILE}: {key} has shape \(0,\), expected"):
        verify_adapter(tmp_path / "adapter", expected)


@pytest.mark.parametrize("remove, problem", [("model.safetensors", "has no weights"),
                                             ("tokenizer.json", "has no tokenizer"),
                                             ("config.json", "has no config.json")])
def test_base_without_weights_or_tokenizer_is_one_line(dirs, tmp_path, remove, problem):
    import shutil

    from llm.train.finetune import base_dir

    folder = tmp_path / "base"
    shutil.copytree(dirs["llama"], folder)
    (folder / remove).unlink()
    if remove == "tokenizer.json":
        (folder / "tokenizer_config.json").unlink()
    cfg = finetune_config(tmp_path, f"finetune.base={folder}").llm
    with pytest.raises(ConfigError, match=rf"^metadata\.llm\.finetune\.base: {folder} {problem}") as e:
        base_dir(cfg)
    assert "\n" not in str(e.value)
