"""Every family of the model zoo (tests/models/zoo.py: the real config class, tokenizer specials and chat
template of Llama 3, Qwen2/3, Mistral, Gemma 2/3, Phi-3, OLMo 2 and GPT-2) served side by side by one real
replica: chat renders exactly as the family's own template renders it, and an answer ends at the family's
end-of-turn token with `finish_reason: "stop"` (the token forced with `logit_bias`: the models are random)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import tiny_config
from tests.models.zoo import FAMILIES, write_family
from tests.serve.conftest import serve_overrides

pytestmark = pytest.mark.ray
ASK = [{"role": "user", "content": "What does the for statement do?"}]


@pytest.fixture(scope="module")
def family_url(ray_session, served, serve_port: int, tmp_path_factory: pytest.TempPathFactory):
    from ray import serve

    from llm.serve.app import build_application

    root = tmp_path_factory.mktemp("families")
    dirs = {name: write_family(name, root / name) for name in FAMILIES}
    first, *rest = dirs
    cfg = tiny_config(root, *serve_overrides(dirs[first], serve_port, f"serve.name={first}"),
                      f"serve.models={json.dumps({n: str(dirs[n]) for n in rest})}").llm
    serve.run(build_application(cfg, 4, 0), name="families", route_prefix="/families")
    yield f"http://127.0.0.1:{serve_port}/families", dirs
    serve.delete("families")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_chat_renders_its_template_and_ends_at_its_turn_end(family_url, family: str) -> None:
    from transformers import AutoTokenizer

    url, dirs = family_url
    tok = AutoTokenizer.from_pretrained(str(dirs[family]), local_files_only=True)
    spec = FAMILIES[family]
    if tok.chat_template:  # the server renders exactly what the family's own template renders
        want = tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        got = httpx.post(f"{url}/tokenize", json={"model": family, "messages": ASK}, timeout=30).json()["tokens"]
        assert got == list(want)
    end = spec.turn_end or spec.eos
    end_id = tok.convert_tokens_to_ids(end)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.chat.completions.create(model=family, messages=ASK, max_tokens=8, temperature=0,
                                         logit_bias={str(end_id): 100})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 1
    assert out.choices[0].message.content == ""


def test_a_system_turn_the_template_refuses_joins_the_first_user_turn_as_in_training(family_url) -> None:
    """Gemma 2's template raises on a system role; fine-tuning and the eval table put the system text at the
    head of the first user turn (`llm.eval.turns.fit_roles`), and so does serving: the model is asked what it
    was tuned on. Any other refusal (Mistral's of a system message after the first) is a 400 naming `messages`."""
    from transformers import AutoTokenizer

    url, dirs = family_url
    tok = AutoTokenizer.from_pretrained(str(dirs["gemma2"]), local_files_only=True)
    system = [{"role": "system", "content": "Be brief."}, *ASK]
    merged = [{"role": "user", "content": "Be brief.\n\n" + ASK[0]["content"]}]
    want = tok.apply_chat_template(merged, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    got = httpx.post(f"{url}/tokenize", json={"model": "gemma2", "messages": system}, timeout=30)
    assert got.status_code == 200 and got.json()["tokens"] == list(want)
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={"model": "gemma2", "max_tokens": 2,
                                                                    "messages": system})
    assert r.status_code == 200, r.text
    late_system = [*ASK, {"role": "system", "content": "Be brief."}]
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={"model": "mistral", "max_tokens": 2,
                                                                    "messages": late_system})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "chat template refused" in r.json()["error"]["message"]
