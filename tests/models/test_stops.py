"""The stop rule: the end-of-turn token read from each family's template (and this project's), the union with
eos that eval and serve share, and the `generation_config.json` that carries it to any engine."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llm.models.chat import END
from llm.models.stops import end_of_turn_ids, stop_token_ids, write_generation_config
from tests.eval import conftest as eval_fixtures
from tests.models.zoo import FAMILIES

tok = eval_fixtures.tok  # the data stage's own tokenizer and template, shared with the eval tests


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _shipped(folder: Path) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(folder), local_files_only=True)


def _shipped_eos(folder: Path) -> list[int]:
    eos = _shipped(folder).eos_token_id
    return eos if isinstance(eos, list) else [eos]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_end_of_turn_is_read_from_each_family_template(zoo: Callable[[str], Path], name: str) -> None:
    family, tokenizer = FAMILIES[name], _tokenizer(zoo(name))
    expected = [tokenizer.convert_tokens_to_ids(family.turn_end)] if family.turn_end else []
    assert end_of_turn_ids(tokenizer) == expected
    stops = stop_token_ids(tokenizer, _shipped(zoo(name)))
    assert set(expected) <= set(stops) and tokenizer.eos_token_id in stops
    assert set(_shipped_eos(zoo(name))) <= set(stops) and stops == sorted(set(stops))


def test_the_end_of_turn_is_what_eos_alone_misses(zoo: Callable[[str], Path]) -> None:
    # What real base checkpoints ship: eos is end-of-text only, so stopping on eos runs past the turn.
    missed = [n for n, f in FAMILIES.items()
              if f.turn_end and _tokenizer(zoo(n)).convert_tokens_to_ids(f.turn_end) not in _shipped_eos(zoo(n))]
    assert sorted(missed) == ["gemma2", "gemma3", "llama", "qwen2", "qwen3"]


def test_this_projects_template_ends_at_end(tok: Any) -> None:
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(END)]
    assert stop_token_ids(tok) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids(END)})


def test_generation_config_eos_may_be_an_int_or_a_list(tok: Any) -> None:
    from transformers import GenerationConfig

    end = tok.convert_tokens_to_ids(END)
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=7)) == sorted({7, tok.eos_token_id, end})
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[9, 7])) == sorted({7, 9, tok.eos_token_id, end})


@pytest.mark.parametrize("template", [
    "{{ raise_exception('no') }}",  # refuses every conversation
    "{% for m in messages %}{{ m['content'] + '\\n\\n' }}{% endfor %}",  # turns end in plain text
    "{% for m in messages %}{{ m['role'] }}{% endfor %}<|end|>",  # the content is never rendered
    "{% for m in messages %}{{ m['content'] }} done{{ eos_token }}{% endfor %}",  # text before the control token
    "{% for m in messages %}{{ m.content",  # not even valid jinja
])
def test_odd_templates_give_no_end_of_turn_and_never_raise(tok: Any, template: str) -> None:
    odd = copy.deepcopy(tok)
    odd.chat_template = template
    assert end_of_turn_ids(odd) == []
    assert stop_token_ids(odd) == [tok.eos_token_id]


def test_written_generation_config_lists_the_stops_and_keeps_the_rest(zoo: Callable[[str], Path],
                                                                       tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = tmp_path / "llama"
    shutil.copytree(zoo("llama"), folder)
    tokenizer = _tokenizer(folder)
    eos, eot = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    path = write_generation_config(folder, model, tokenizer)
    gen = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    assert path == folder / "generation_config.json"
    assert gen.eos_token_id == sorted([eos, eot])
    assert (gen.do_sample, gen.temperature, gen.top_p) == (True, 0.6, 0.9)  # the family's sampling defaults
    assert gen.bos_token_id == tokenizer.bos_token_id and gen.pad_token_id == eos  # no pad token: eos pads
    # Without a model object the folder's own file is extended; without either, config.json gives the ids.
    (folder / "generation_config.json").write_text('{"eos_token_id": 3, "top_k": 7}')
    write_generation_config(folder, None, tokenizer)
    gen = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    assert gen.eos_token_id == sorted([3, eos, eot]) and gen.top_k == 7
    (folder / "generation_config.json").unlink()
    write_generation_config(folder, None, tokenizer)
    assert GenerationConfig.from_pretrained(str(folder)).eos_token_id == sorted([eos, eot])


def test_an_eos_stopping_engine_ends_the_turn_once_the_config_is_written(zoo: Callable[[str], Path],
                                                                         tmp_path: Path) -> None:
    """A model that answers `<|im_end|>` runs on to the token limit under the shipped config (eos only), and
    stops after it under the written one: what a serving engine that stops on eos does."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = tmp_path / "qwen2"
    shutil.copytree(zoo("qwen2"), folder)
    tokenizer = _tokenizer(folder)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    head = torch.nn.Linear(64, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[im_end] = 10.0
    model.lm_head = head  # answers <|im_end|> whatever it is asked
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.as_tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])

    def new_tokens() -> int:
        config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
        config.update(do_sample=False, max_new_tokens=8)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return int(out.shape[1] - ids.shape[1])

    assert new_tokens() == 8
    write_generation_config(folder, model, tokenizer)
    assert new_tokens() == 1
