"""The object-store paths of finetune, compress and serve without Ray, on moto's S3 server: a variant published
to the bucket (its `.done` last) and brought back by a rerun; a model folder in the bucket resolved to its
committed stage and copied into the cache checked against the manifest; serve's model list from the bucket."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llm import storage
from llm.errors import ConfigError, StageInputError
from llm.manifest import write_manifest


def test_a_checked_variant_is_published_done_last_and_restored_by_a_rerun(s3_prefix: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from llm.compress import stage as comp
    from llm.stage import _STAGING, _staging

    monkeypatch.setenv("LLMRAY_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_prefix}/run/compress"
    folder = _staging(uri)
    try:
        variant = folder / "int8"
        assert not comp._done_before(folder, variant)
        variant.mkdir()
        (variant / "model.pt").write_bytes(b"w" * 100)
        comp._publish(folder, variant)
        assert storage.list_files(f"{uri}/int8") == {"model.pt": 100, ".done": 0}
        assert (variant / ".done").exists()
    finally:
        _STAGING.pop(folder, None)
    again = _staging(uri)  # a rerun's fresh staging folder: the variant comes back from the bucket
    try:
        assert not (again / "int8").exists()
        assert comp._done_before(again, again / "int8")
        assert (again / "int8" / "model.pt").read_bytes() == b"w" * 100
        storage.remove_file(f"{uri}/int8/.done")  # uploaded but never marked: built again
        assert not comp._done_before(again, again / "pruned") and not comp._done_before(_fresh(again), again / "int8")
    finally:
        _STAGING.pop(again, None)


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder / "int8", ignore_errors=True)
    return folder


def _commit_model(tmp_path: Path, stage_uri: str, rel: str) -> None:
    """A committed stage folder in the bucket holding a tiny saved model (with its tokenizer) under `rel`."""
    from tests.train.test_finetune_helpers import our_tokenizer, tiny_llama

    local = tiny_llama(tmp_path / "model", our_tokenizer(tmp_path / "tok"))
    storage.upload(local, storage.join(stage_uri, rel))
    write_manifest(stage_uri, "finetune", "h", {}, {})


def test_a_model_in_the_bucket_is_served_from_a_checked_cache_copy(s3_prefix: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from llm.compress.load import chosen_model_dir, committed_model, load_model, local_model
    from llm.config import load_config
    from llm.serve.app import model_dirs
    from tests.conftest import LOCAL_YAML

    monkeypatch.setenv("LLMRAY_CACHE", str(tmp_path / "cache"))
    cfg = load_config(LOCAL_YAML, [f"storage={s3_prefix}"]).llm
    with pytest.raises(StageInputError, match="no committed compress"):
        chosen_model_dir(cfg)
    ft = cfg.stage_dir("finetune")
    _commit_model(tmp_path, ft, "model")
    assert chosen_model_dir(cfg) == f"{ft}/model"
    assert committed_model(f"{ft}/model") == (ft, "model")
    with pytest.raises(StageInputError, match="not a model folder"):
        committed_model(f"{ft}/adapter")
    assert model_dirs(cfg) == {cfg.run: f"{ft}/model"}
    monkeypatch.setattr(cfg.serve, "model", f"{s3_prefix}/elsewhere/model")
    with pytest.raises(ConfigError, match="serve.model: .*no committed stage folder"):
        model_dirs(cfg)

    local = local_model(f"{ft}/model")
    assert local.is_relative_to(tmp_path / "cache") and (local / "config.json").exists()
    assert load_model(local).model.config.num_hidden_layers == 2
    # A changed object in the bucket never reaches a replica: the copy is checked against the manifest.
    shutil.rmtree(tmp_path / "cache")
    blob = storage.read_bytes(f"{ft}/model/config.json")
    storage.write_bytes(f"{ft}/model/config.json", blob.replace(b"{", b" ", 1))  # same size, other bytes
    with pytest.raises(OSError, match="differs from the committed one"):
        local_model(f"{ft}/model")
    storage.write_text(f"{ft}/model/config.json", json.dumps({"changed": True}))  # another size: not committed
    with pytest.raises(StageInputError, match="no committed stage folder"):
        local_model(f"{ft}/model")


def test_the_sweep_still_stops_in_one_line_naming_storage(s3_prefix: str) -> None:
    from llm.config import load_config
    from llm.tune.stage import run
    from tests.conftest import LOCAL_YAML

    cfg = load_config(LOCAL_YAML, [f"storage={s3_prefix}", "sweep.enabled=true"]).llm
    with pytest.raises(StageInputError, match=r"storage .*the sweep stage does not run with `storage` in an object"):
        run(cfg)
    assert not storage.exists(cfg.stage_dir("sweep"))
