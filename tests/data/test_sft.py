"""SFT rendering: the chat template, and labels that keep only the assistant's tokens."""

from __future__ import annotations

import gzip
import json

import pytest

from llm.data import sft
from llm.data.tokenizer import load_tokenizer, train_tokenizer
from llm.errors import ConfigError
from llm.eval.split import is_held_out
from llm.models.stops import end_of_turn_ids

TEXT = ["The user asks a question and the assistant answers it politely. " * 20,
        "What does the function return? It returns the sum of its arguments. " * 20]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXT, folder, vocab_size=400, min_frequency=1)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_tokenizer_has_special_tokens_and_template(tok):
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    assert 256 + 6 < len(tok) <= 400  # bytes + specials + the merges this tiny text allows
    assert tok.decode(tok("héllo wörld ✓", add_special_tokens=False)["input_ids"]) == "héllo wörld ✓"


def test_labels_mask_everything_but_assistant(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does it return?"},
            {"role": "assistant", "content": "The sum."}, {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "Nothing."}]
    rendered = sft.render_or_reason(tok, msgs, end_of_turn_ids(tok))
    assert not isinstance(rendered, str)
    ids, labels = rendered
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids == full and len(labels) == len(ids)
    kept = [i for i, x in enumerate(labels) if x != sft.IGNORE]
    assert all(labels[i] == ids[i] for i in kept)
    answer = tok.decode([ids[i] for i in kept])
    # Each answer up to its end-of-turn token, as fine-tuning renders and serving stops: not the newline after.
    assert answer == "The sum.<|end|>Nothing.<|end|>"
    assert "question" not in answer and "Be brief" not in answer


def test_prompt_response_and_invalid_records():
    assert sft.to_messages({"prompt": "q", "response": "a"}) == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert sft.to_messages({"messages": [{"role": "user", "content": "q"}]}) == "no_assistant"
    assert sft.to_messages({"messages": [{"role": "robot", "content": "q"}]}) == "bad_messages"
    assert sft.to_messages({"question": "q"}) == "missing_field"
    assert sft.to_messages([1]) == "not_an_object"


def test_unit_names_unreadable_files_keeps_lines_before(tok_dir, tmp_path):
    line = json.dumps({"prompt": "What is it?", "response": "The sum."}) + "\n"
    (tmp_path / "ok.jsonl").write_text(line * 3)
    blob = gzip.compress(line.encode() * 2000)
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    files = [{"path": str(tmp_path / "ok.jsonl"), "kind": "jsonl", "gz": False},
             {"path": str(tmp_path / "cut.jsonl.gz"), "kind": "jsonl", "gz": True}]
    out = sft.sft_unit({"unit": [0], "files": [json.dumps(files)]}, tokenizer_dir=str(tok_dir),
                       out_dir=str(tmp_path / "out"), max_len=64, val_fraction=0.0)
    assert json.loads(out["read_errors"][0]) == [
        {"file": str(tmp_path / "cut.jsonl.gz"),
         "error": "truncated gzip stream (Compressed file ended before the end-of-stream marker was reached)"}]
    counts = json.loads(out["counts"][0])
    assert counts["dropped_read_error"] == 1 and counts["train"] > 3  # lines before the cut are examples


def test_held_out_is_the_val_side_of_the_units_split(tok_dir, tmp_path):
    """`held_out` finds exactly the conversations `sft_unit` renders into val, skipping bad records."""
    lines = [json.dumps({"prompt": f"Question {i}?", "response": f"Answer number {i}."}) for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines + ["not json", json.dumps({"question": "q"})]) + "\n")
    blob = gzip.compress(("\n".join(lines) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[:12])
    sources = [str(tmp_path / "*.jsonl"), str(tmp_path / "*.jsonl.gz")]
    held = sft.held_out(sources, 0.3, "data.sft.sources")
    expected = [m for i in range(40) if is_held_out(m := sft.to_messages(json.loads(lines[i])), 0.3)]
    assert held == expected and 0 < len(held) < 40
    assert sft.held_out(sources, 0.3, limit=2) == expected[:2]
    assert sft.held_out(sources, 0.3, "k", limit=0) == [] and sft.held_out([], 0.3) == []
    files = [{"path": str(tmp_path / "chat.jsonl"), "kind": "jsonl", "gz": False}]
    out = sft.sft_unit({"unit": [0], "files": [json.dumps(files)]}, tokenizer_dir=str(tok_dir),
                       out_dir=str(tmp_path / "out"), max_len=256, val_fraction=0.3)
    assert json.loads(out["counts"][0])["val"] == len(expected)


def test_held_out_names_the_key_of_a_source_that_is_not_sft(tmp_path):
    (tmp_path / "notes.txt").write_text("plain text")
    with pytest.raises(ConfigError, match=r"^data\.sft\.sources: .*notes\.txt: SFT sources are JSONL"):
        sft.held_out([str(tmp_path / "notes.txt")], 0.5, "data.sft.sources", limit=0)
    assert sft.held_out([str(tmp_path / "notes.txt")], 0.5) == []  # compress: read as the data stage reads it


STRICT = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
          "{% endif %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}")


def test_template_that_refuses_a_record_drops_it_by_name(tok_dir, tmp_path):
    """A chat template that raises on one record (roles that do not alternate) killed the stage; now that
    record is dropped as `template_error`, named `file:line` with the template's message, the rest rendered."""
    strict = tmp_path / "tok"
    t = load_tokenizer(tok_dir)
    t.chat_template = STRICT
    t.save_pretrained(str(strict))
    good = {"prompt": "What is it?", "response": "The sum."}
    twice = {"messages": [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Hello?"},
                          {"role": "assistant", "content": "Hello."}]}
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good, twice, good)))
    files = [{"path": str(tmp_path / "chat.jsonl"), "kind": "jsonl", "gz": False}]
    out = sft.sft_unit({"unit": [0], "files": [json.dumps(files)]}, tokenizer_dir=str(strict),
                       out_dir=str(tmp_path / "out"), max_len=64, val_fraction=0.0)
    counts = json.loads(out["counts"][0])
    assert (counts["examples"], counts["dropped_template_error"]) == (2, 1)
    [named] = json.loads(out["dropped"][0])
    assert named["record"] == f"{tmp_path / 'chat.jsonl'}:2" and named["reason"] == "template_error"
    assert named["detail"] == ("TemplateError: Conversation roles must alternate "
                               "user/assistant/user/assistant/...")


def test_hostile_lines_are_bad_records_and_the_file_goes_on(tok_dir, tmp_path):
    """A line nested 100,000 deep (RecursionError) or with a 5,000-digit integer (ValueError, which ended the
    file as unreadable) is one `bad_json` record; a JSON string line is no record (it was taken for a reason)."""
    good = json.dumps({"prompt": "What is it?", "response": "The sum."})
    lines = [good, "[" * 100_000 + "]" * 100_000, '{"n": 1' + "0" * 5000 + "}", '"bad_messages"', good]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    files = [{"path": str(tmp_path / "chat.jsonl"), "kind": "jsonl", "gz": False}]
    out = sft.sft_unit({"unit": [0], "files": [json.dumps(files)]}, tokenizer_dir=str(tok_dir),
                       out_dir=str(tmp_path / "out"), max_len=64, val_fraction=0.0)
    counts = json.loads(out["counts"][0])
    assert (counts["examples"], counts["dropped_bad_json"], counts["dropped_not_an_object"]) == (2, 2, 1)
    assert "dropped_read_error" not in counts and json.loads(out["read_errors"][0]) == []
    assert [d["record"].rsplit(":", 1)[1] for d in json.loads(out["dropped"][0])] == ["2", "3", "4"]


def test_lone_surrogate_in_a_message_is_replaced_not_a_failure(tok_dir, tmp_path):
    """`\\ud800` is valid JSON, but the tokenizer refuses it (TypeError): replaced by U+FFFD, the record renders."""
    (tmp_path / "chat.jsonl").write_text('{"prompt": "What is \\ud800?", "response": "A lone surrogate."}\n')
    assert [rec for _, rec in sft.records(str(tmp_path / "chat.jsonl"), "jsonl", False)] == [
        {"prompt": "What is \ufffd?", "response": "A lone surrogate."}]
    files = [{"path": str(tmp_path / "chat.jsonl"), "kind": "jsonl", "gz": False}]
    out = sft.sft_unit({"unit": [0], "files": [json.dumps(files)]}, tokenizer_dir=str(tok_dir),
                       out_dir=str(tmp_path / "out"), max_len=64, val_fraction=0.0)
    assert json.loads(out["counts"][0])["examples"] == 1
