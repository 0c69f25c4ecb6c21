"""Every route through a real local Serve with the real `openai` client: models, completions, chat,
streaming, stop, seed, logprobs with echo, usage, 16 concurrent requests."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

pytestmark = pytest.mark.ray

PROMPT = "The for statement is used to iterate over"


def test_stage_records_the_endpoint(served) -> None:
    endpoint = json.loads((Path(served.path) / "endpoint.json").read_text())
    assert endpoint["url"].startswith("http://127.0.0.1:")
    assert list(endpoint["models"]) == ["tiny"]
    assert (Path(served.path) / "_MANIFEST.json").exists()


def test_models_lists_the_served_model(client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_usage_and_length_finish(client, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert out.usage.prompt_tokens == len(tok(PROMPT)["input_ids"])
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].text == tok.decode(_greedy(tiny_model_dir, tok(PROMPT)["input_ids"], 7))


def _greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    """Reference greedy tokens straight from transformers, no server in between."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=1,
                         eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_streaming_matches_the_whole_completion(client, base_url: str) -> None:
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    with httpx.stream("POST", f"{base_url}/completions", timeout=30,
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_chat_and_chat_streaming(client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 10 and whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_cuts_the_text(client) -> None:
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = full[: full.index(stop)]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_seed_makes_sampling_reproducible(client) -> None:
    def draw(seed: int) -> str:
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.95,
                                         seed=seed).choices[0].text

    assert draw(7) == draw(7)
    assert len({draw(s) for s in (1, 2, 3, 4)}) > 1


def test_echo_logprobs_match_the_model(client, tiny_model_dir: Path) -> None:
    """What lm-evaluation-harness's `local-completions` asks for loglikelihood: echo + logprobs, 1 token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = tok(PROMPT)["input_ids"]
    assert out.choices[0].text.startswith(PROMPT)
    assert "".join(lp.tokens[: len(ids)]) == PROMPT and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    expected = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1: len(ids)] == pytest.approx(expected, abs=1e-4)
    pairs = zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True)
    assert all(max(top.values()) >= chosen - 1e-6 for top, chosen in pairs)
    assert lp.text_offset[: 2] == [0, len(lp.tokens[0])]


def test_chat_logprobs(client) -> None:
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         logprobs=True, top_logprobs=3, temperature=0)
    content = out.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy: the top one


def test_sixteen_concurrent_requests_all_answered(client) -> None:
    def one(i: int) -> tuple[int, str | None]:
        out = client.completions.create(model="tiny", prompt=f"{PROMPT} {i}", max_tokens=24, temperature=0)
        return out.usage.completion_tokens, out.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert results == [(24, "length")] * 16


def test_several_prompts_give_several_choices(client) -> None:
    out = client.completions.create(model="tiny", prompt=["a", "b c"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 6
