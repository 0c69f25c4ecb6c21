"""A model directory is checked against the data stage's tokenizer before training reads ids into it."""

from __future__ import annotations

import json

import pytest

from llm.data.tokenizer import check_model_vocab, load_tokenizer, train_tokenizer
from llm.errors import ConfigError

TEXT = ["The river runs past the quiet town where people walk and talk. " * 30]
KEY = "metadata.llm.pretrain.model.path"


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """Two tokenizers of different vocabularies, trained on the same text."""
    root = tmp_path_factory.mktemp("toks")
    train_tokenizer(TEXT, root / "a", vocab_size=300, min_frequency=1)
    train_tokenizer([t.upper() for t in TEXT], root / "b", vocab_size=300, min_frequency=1)
    return load_tokenizer(root / "a"), load_tokenizer(root / "b")


def model_dir(path, vocab_size, tokenizer=None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size}))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def test_model_with_fewer_embeddings_than_tokens_is_refused(toks, tmp_path):
    tok, _ = toks
    small = model_dir(tmp_path / "small", len(tok) - 1)
    with pytest.raises(ConfigError, match=rf"^{KEY}: the model in .*small has {len(tok) - 1} token embeddings but "
                                          rf"the data stage's tokenizer has {len(tok)} tokens; use a model made"):
        check_model_vocab(small, tok, KEY)
    check_model_vocab(model_dir(tmp_path / "padded", len(tok) + 64), tok, KEY)  # padded embeddings are fine


def test_model_made_with_another_tokenizer_is_refused(toks, tmp_path):
    tok, other = toks
    with pytest.raises(ConfigError, match=rf"^{KEY}: the model in .*other was made with another tokenizer"):
        check_model_vocab(model_dir(tmp_path / "other", 1000, other), tok, KEY)
    check_model_vocab(model_dir(tmp_path / "same", len(tok), tok), tok, KEY)
