"""The typed config: loading, overrides, one-line errors naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm.config import PipelineConfig
from llm.errors import ConfigError
from llm.loading import apply_override, load_config

from .conftest import LOCAL_YAML, ROOT, tiny_config

CLUSTER_FILES = sorted((ROOT / "cluster").glob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_shipped_cluster_file_loads(path: Path) -> None:
    loaded = load_config(path)
    assert loaded.llm.run
    assert loaded.cluster["provider"]["type"] in {"aws", "local", "gcp", "azure", "kuberay"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_files_pass_rays_own_validation(path: Path) -> None:
    # The same two calls `ray up` makes before talking to the cloud provider.
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load(path.read_text())
    validate_config(prepare_config(cluster))


def test_ray_half_error_names_key_and_file(tmp_path: Path) -> None:
    data = yaml.safe_load(LOCAL_YAML.read_text())
    data["not_a_ray_key"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"Ray cluster config.*not_a_ray_key.*bad\.yaml"):
        load_config(bad)


def test_overrides_are_typed_by_the_model(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "pretrain.max_steps=7", "data.min_chars=50", "pretrain.lr.kind=wsd",
                      "data.sources=[a.txt, b.txt]", "metadata.llm.pretrain.precision=fp32").llm
    assert cfg.pretrain.max_steps == 7 and isinstance(cfg.pretrain.max_steps, int)
    assert cfg.data.min_chars == 50
    assert cfg.pretrain.lr.kind == "wsd"
    assert cfg.data.sources == ["a.txt", "b.txt"]
    assert cfg.pretrain.precision == "fp32"
    assert cfg.storage == str((tmp_path / "runs").resolve())


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("pretrain.max_stepz=3", r"^metadata\.llm\.pretrain\.max_stepz: unknown key in .*local\.yaml$"),
        ("pretrain.max_steps=abc", r"^metadata\.llm\.pretrain\.max_steps: must be an integer \(got 'abc'\) in .*yaml$"),
        ("pretrain.micro_batch_size=0", r"^metadata\.llm\.pretrain\.micro_batch_size: .*>= 1 \(got 0\)"),
        ("pretrain.zero_stage=5", r"^metadata\.llm\.pretrain\.zero_stage: must be 0, 1, 2 or 3 \(got 5\)"),
        ("data.dedup.fuzzy.threshold=1.5", r"^metadata\.llm\.data\.dedup\.fuzzy\.threshold: "),
        ("pretrain.offload_params=true", r"offload_params needs zero_stage 3"),
        ("pretrain.model.n_heads=5", r"n_heads \(5\) must divide d_model \(64\)"),
        ("pretrain.model.context=64", r"context \(64\) must be >= data.seq_len \(128\)"),
        ("pretrain.max_steps.x=1", r"metadata\.llm\.pretrain\.max_steps: is a value, not a section"),
        ("nonsense", r"expected KEY=VALUE"),
        ("run=has space", r"^metadata\.llm\.run: "),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path: Path, override: str, pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path, override)
    message = str(info.value)
    assert "\n" not in message
    assert __import__("re").search(pattern, message), message


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("metadata:\n  llm: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+.*broken\.yaml"):
        load_config(broken)
    no_llm = tmp_path / "nollm.yaml"
    no_llm.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(LOCAL_YAML.read_text()).items()
                                      if k != "metadata"}))
    with pytest.raises(ConfigError, match=r"metadata\.llm: missing"):
        load_config(no_llm)


def test_global_batch_cross_check(tmp_path: Path) -> None:
    # local.yaml: 2 workers; 8 x 1 x 2 = 16
    assert tiny_config(tmp_path, "pretrain.global_batch_size=16").llm.pretrain.global_batch_size == 16
    with pytest.raises(ConfigError, match=r"global_batch_size: 10 != micro_batch_size 8 x grad_accum 1 x workers 2"):
        tiny_config(tmp_path, "pretrain.global_batch_size=10")


def test_gpus_asked_must_exist() -> None:
    with pytest.raises(ConfigError, match=r"pretrain\.sizing\.workers: 32 GPU workers asked.*16 GPUs"):
        load_config(ROOT / "cluster" / "config.yaml", ["pretrain.sizing.workers=32", "pretrain.global_batch_size=null"])


def test_apply_override_builds_nested_sections() -> None:
    tree: dict = {}
    apply_override(tree, "pretrain.lr.peak=1e-3")
    apply_override(tree, "data.sources=[x]")
    assert tree == {"pretrain": {"lr": {"peak": 1e-3}}, "data": {"sources": ["x"]}}


def test_every_field_is_described() -> None:
    """Editors show these descriptions; the schema is the config reference."""
    schema = PipelineConfig.model_json_schema()
    undocumented = []
    for name, model in {"PipelineConfig": schema, **schema["$defs"]}.items():
        for field, spec in model.get("properties", {}).items():
            if not spec.get("description"):
                undocumented.append(f"{name}.{field}")
    assert undocumented == []


def test_stage_dir_layout(local_cfg) -> None:
    assert local_cfg.llm.stage_dir("data").endswith("/runs/local-tiny/data")


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.min_chars=500", "data.max_chars=100"],
     r"^metadata\.llm\.data: min_chars \(500\) must be <= max_chars \(100\): no document could pass in "),
    (["data.quality.min_words=50", "data.quality.max_words=10"],
     r"^metadata\.llm\.data\.quality: min_words \(50\) must be <= max_words \(10\)"),
    (["data.quality.min_mean_word_len=12"],
     r"^metadata\.llm\.data\.quality: min_mean_word_len \(12\) must be <= max_mean_word_len \(10\)"),
])
def test_data_ranges_that_admit_nothing_name_both_keys(tmp_path: Path, overrides: list[str], message: str) -> None:
    """`min_chars > max_chars` validated, then dropped every document as too_short or too_long."""
    with pytest.raises(ConfigError, match=message + r".*local\.yaml$"):
        tiny_config(tmp_path, *overrides)
    assert tiny_config(tmp_path, "data.min_chars=100", "data.max_chars=100").llm.data.max_chars == 100


def test_duplicate_yaml_key_names_key_line_and_file(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys without a word: the first `min_chars` was silently undone."""
    text = LOCAL_YAML.read_text()
    assert "      min_chars: 200\n" in text
    bad = tmp_path / "dup.yaml"
    bad.write_text(text.replace("      min_chars: 200\n", "      min_chars: 200\n      seq_len: 64\n"
                                                        "      min_chars: 5\n"))
    line = text.splitlines().index("      min_chars: 200") + 3
    with pytest.raises(ConfigError, match=rf"^invalid YAML at line {line}, column 7: duplicate key 'min_chars' "
                                          rf"\(first given at line {line - 2}\) in .*dup\.yaml$"):
        load_config(bad)
    flow = tmp_path / "flow.yaml"
    flow.write_text(text.replace("tokenizer: {vocab_size: 4096}", "tokenizer: {vocab_size: 4096, vocab_size: 512}"))
    with pytest.raises(ConfigError, match=r"duplicate key 'vocab_size'"):
        load_config(flow)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    """`<<: *anchor` then a key of the anchor is YAML's own override, not a duplicate."""
    text = LOCAL_YAML.read_text().replace("      tokenizer: {vocab_size: 4096}\n",
                                          "      tokenizer:\n        <<: &tok {vocab_size: 4096, min_frequency: 3}\n"
                                          "        vocab_size: 1024\n")
    merged = tmp_path / "merged.yaml"
    merged.write_text(text)
    tok = load_config(merged).llm.data.tokenizer
    assert (tok.vocab_size, tok.min_frequency) == (1024, 3)
