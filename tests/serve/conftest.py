"""Fixtures for serving tests: a tiny 2-layer, 64-wide Llama with a BPE tokenizer trained here on Python's
help topics, saved with `save_pretrained` once per session (no network, no model hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

VOCAB = 384
CONTEXT = 128


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Train a byte-level BPE, build a tiny llama from `ModelConfig`, save both to `folder`."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llm.config import ModelConfig
    from llm.train.model import build_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    spec = ModelConfig(arch="llama", n_layers=2, d_model=64, n_heads=4, context=CONTEXT)
    model = build_model(spec, VOCAB, seed=seed, tokenizer=fast)
    model.save_pretrained(str(folder), safe_serialization=True)
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny causal LM directory shared by the whole session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_overrides(model_dir: Path, port: int, *extra: str) -> list[str]:
    """Dotted overrides that serve `model_dir` as `tiny` on `port`, one replica, never in the foreground."""
    return [f"serve.model={model_dir}", "serve.name=tiny", f"serve.port={port}", "serve.min_replicas=1",
            "serve.max_replicas=1", "serve.foreground=false", *extra]


@pytest.fixture(scope="session")
def serve_port() -> int:
    """The port of this session's Serve proxy (free, so parallel sessions on one machine do not clash)."""
    return free_port()


@pytest.fixture(scope="package")  # Serve is shut down after tests/serve: its replicas hold CPUs others need
def served(ray_session, tiny_model_dir: Path, serve_port: int, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model deployed by the serve stage itself (`llm.serve.stage.run`); yields the stage result."""
    from ray import serve

    from llm.serve.stage import run
    from tests.conftest import tiny_config

    loaded = tiny_config(tmp_path_factory.mktemp("serve"), *serve_overrides(tiny_model_dir, serve_port))
    result = run(loaded.llm)
    yield result
    serve.shutdown()


@pytest.fixture(scope="package")
def base_url(served) -> str:
    return str(served.metrics["url"])


@pytest.fixture
def client(base_url: str):
    import openai

    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


CHAT = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello there"}]


def teach_to_answer(folder: Path, messages: list[dict[str, str]] = CHAT, steps: int = 120) -> Path:
    """Overfit the model in `folder` on one conversation (loss on the assistant turn, its end-of-turn token
    included), in place: a model that really emits its template's end-of-turn token, made on purpose. Its
    `generation_config.json` keeps only end-of-text as eos, as base checkpoints do."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from llm.models.chat import render

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    ids, labels = render(tok, messages)
    x, y = torch.tensor([ids]), torch.tensor([labels])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two models taught to answer one conversation: this project's template (turns end with `<|end|>`) and
    a Qwen2 base with ChatML (`<|im_end|>`); neither lists its end-of-turn token as eos."""
    from tests.models.zoo import write_family

    own = tmp_path_factory.mktemp("own-chat")
    build_own_chat_model(own)
    chatml = write_family("qwen2", tmp_path_factory.mktemp("qwen2-chat"))
    return {"own": teach_to_answer(own), "chatml": teach_to_answer(chatml)}


def build_own_chat_model(folder: Path) -> Path:
    """The tiny llama with the tokenizer the data stage trains (this project's special tokens and template)."""
    from pydoc_data.topics import topics

    from llm.config import ModelConfig
    from llm.data.tokenizer import train_tokenizer
    from llm.train.model import build_model

    fast = train_tokenizer([topics[k] for k in sorted(topics)], folder, vocab_size=VOCAB, min_frequency=2)
    model = build_model(ModelConfig(arch="llama", n_layers=2, d_model=64, n_heads=4, context=CONTEXT), VOCAB,
                        seed=0, tokenizer=fast)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder
