"""`chosen.json` names the original relative to the compress folder, and serve refuses a compress stage that
is not current (issue 20, part 3). Manifests written by hand, no Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llm.compress.choose import write_chosen
from llm.errors import StaleOutputError
from llm.manifest import manifest_hash, write_manifest
from llm.models.load import chosen_model_dir
from llm.stage import config_hash, hashed_config

from ..conftest import tiny_config


def _commit_compress(cfg, variant: str, original: Path, inputs: dict[str, str]) -> Path:
    folder = Path(cfg.stage_dir("compress"))
    folder.mkdir(parents=True, exist_ok=True)
    write_chosen(folder, {"variant": variant, "reason": "r"}, original, str(folder))
    write_manifest(folder, "compress", config_hash(cfg, "compress"), inputs, {},
                   config=hashed_config(cfg, "compress"))
    return folder


def _commit_finetune(cfg, text: str) -> Path:
    model = Path(cfg.stage_dir("finetune")) / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(text)
    write_manifest(model.parent, "finetune", "h", {}, {})
    return model


def test_the_original_is_named_relative_to_compress(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path).llm
    original = _commit_finetune(cfg, "{}")
    folder = _commit_compress(cfg, "original", original, {"finetune": manifest_hash(original.parent) or ""})
    assert json.loads((folder / "chosen.json").read_text())["path"] == "../finetune/model"
    assert Path(chosen_model_dir(cfg)) == original

    # the run folder moved elsewhere still names its own model
    shutil.copytree(tmp_path / "runs", tmp_path / "moved")
    shutil.rmtree(tmp_path / "runs")
    moved = tiny_config(tmp_path, f"storage={tmp_path / 'moved'}").llm
    assert Path(chosen_model_dir(moved)) == tmp_path / "moved" / cfg.run / "finetune" / "model"


def test_a_stale_compress_stage_is_not_served(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path).llm
    _commit_compress(cfg, "int8", tmp_path / "elsewhere", {})
    assert Path(chosen_model_dir(cfg)) == Path(cfg.stage_dir("compress")) / "int8"

    edited = tiny_config(tmp_path, "compress.choose.max_ppl_increase=0.5").llm
    with pytest.raises(StaleOutputError, match=r"compress stage is stale \(changed since: "
                                               r"compress.choose.max_ppl_increase\); rerun `llmray compress`") as e:
        chosen_model_dir(edited)
    assert "\n" not in str(e.value)


def test_an_input_committed_again_makes_compress_stale(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path).llm
    original = _commit_finetune(cfg, "{}")
    _commit_compress(cfg, "int8", original, {"finetune": manifest_hash(original.parent) or ""})
    assert Path(chosen_model_dir(cfg)).name == "int8"
    _commit_finetune(cfg, '{"retrained": true}')
    with pytest.raises(StaleOutputError, match="input finetune"):
        chosen_model_dir(cfg)
