"""Int8: every linear layer quantized, the file shrinks, one call reloads it with the very same logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig

from llm.compress.variants import build_int8
from llm.errors import ConfigError
from llm.eval import dir_bytes
from llm.models.int8 import QUANT_FILE, WEIGHTS_FILE
from llm.models.load import load_model, model_format
from tests.compress.conftest import gqa_llama, save, tiny_gpt2


def _int8(src: Path, out: Path, calib: Any) -> Path:
    return build_int8(src, out, calib, embeddings=True, device="cpu", gpu_config="int8_weight_only")


def test_llama_int8_shrinks_reloads_exactly_and_generates(tmp_path: Path, tok: Any, calib: Any) -> None:
    src = save(gqa_llama(tok), tok, tmp_path / "fp32")
    out = _int8(src, tmp_path / "int8", calib)
    layout = json.loads((out / QUANT_FILE).read_text())
    # 2 layers x 7 linears + the (tied) output head: every nn.Linear.
    assert len(layout["modules"]) == 15 and "lm_head" in layout["modules"]
    weights = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    assert weights(out) < 0.4 * weights(src)
    loaded = load_model(out)
    assert loaded.format == model_format(out) == "int8-dynamic"
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, torch.ao.nn.quantized.dynamic.Linear)
    ids = torch.as_tensor(calib[:2])
    with torch.inference_mode():
        got = loaded.model(input_ids=ids).logits
        ref = load_model(src).model(input_ids=ids).logits
    assert torch.equal(got, load_model(out).model(input_ids=ids).logits)  # deterministic reload
    assert 0 < float((got - ref).abs().max()) < 0.1 * float(ref.abs().max())  # quantized, yet close
    gen = loaded.model.generate(input_ids=ids[:1, :8], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 13)
    # The variant stops where the template ends a turn, not only at eos as its source's config says.
    assert GenerationConfig.from_pretrained(src).eos_token_id == tok.eos_token_id
    assert GenerationConfig.from_pretrained(out).eos_token_id == sorted({tok.eos_token_id,
                                                                        tok.convert_tokens_to_ids("<|end|>")})


def test_gpt2_conv1d_is_converted_then_quantized(tmp_path: Path, tok: Any, calib: Any) -> None:
    src = save(tiny_gpt2(tok), tok, tmp_path / "fp32")
    out = _int8(src, tmp_path / "int8", calib)
    layout = json.loads((out / QUANT_FILE).read_text())
    assert "transformer.h.0.attn.c_attn" in layout["conv1d_to_linear"]
    assert "transformer.h.1.mlp.c_proj" in layout["modules"]
    model = load_model(out).model
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.ao.nn.quantized.dynamic.Linear)
    assert dir_bytes(out) < dir_bytes(src)


@pytest.fixture
def int8_dir(tmp_path: Path, model_dir: Path, calib: Any) -> Path:
    return _int8(model_dir, tmp_path / "int8", calib)


def test_missing_weights_is_one_line_error_naming_the_file(int8_dir: Path) -> None:
    (int8_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(ConfigError, match=f"{WEIGHTS_FILE}: missing"):
        load_model(int8_dir)


def test_truncated_weights_is_a_clear_error(int8_dir: Path) -> None:
    path = int8_dir / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match="corrupt safetensors") as err:
        load_model(int8_dir)
    assert "\n" not in str(err.value)


def test_corrupt_layout_is_a_clear_error(int8_dir: Path) -> None:
    (int8_dir / QUANT_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=QUANT_FILE):
        load_model(int8_dir)


def test_layout_naming_a_module_without_weights_is_a_clear_error(int8_dir: Path) -> None:
    layout = json.loads((int8_dir / QUANT_FILE).read_text())
    layout["modules"].append("model.layers.0.mlp.extra_proj")
    (int8_dir / QUANT_FILE).write_text(json.dumps(layout))
    with pytest.raises(ConfigError, match="does not match"):
        load_model(int8_dir)


def test_hf_variant_with_corrupt_weights_is_a_clear_error(tmp_path: Path, model_dir: Path) -> None:
    import shutil

    bad = Path(shutil.copytree(model_dir, tmp_path / "bad"))
    weights = bad / "model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="cannot load"):
        load_model(bad)
    (bad / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(bad)
