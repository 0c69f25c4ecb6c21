"""Building a Hugging Face causal LM from `ModelConfig`, or loading one from a local directory.

Nothing is downloaded: a model is either built from a `transformers` config object made here (any family in
`llm.config.train.FAMILIES`, through that family's own config class, or from a local `config.json`), or read
from a directory that `from_pretrained` loads with `local_files_only=True`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm.config import LLM_PREFIX, ModelConfig
from llm.config.train import FAMILIES, SHAPE_NAMES, hf_model_type
from llm.errors import ConfigError
from llm.flops import training_flops_per_token

KEY = f"{LLM_PREFIX}.pretrain.model"
_DROPOUTS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop")


def hf_config(model: ModelConfig, vocab_size: int, bos_id: int | None = None, eos_id: int | None = None,
              pad_id: int | None = None, key: str = KEY) -> Any:
    """The `transformers` config object a `ModelConfig` describes, made by the family's own config class.

    The shape fields are set under the names that class takes (`SHAPE_NAMES`), and a family with an
    explicit `head_dim` (and Gemma's `query_pre_attn_scalar`) gets `d_model / n_heads`; with `config_file`
    the file gives all of that instead. `config` goes over either. The vocabulary and special token ids are
    the tokenizer's, whatever a file says (None ids stay None: a family's defaults, such as Phi-3's pad id
    32000, may lie outside a small vocabulary).

    Raises:
        ConfigError: naming `key` for an unreadable `config_file`, a family not in `FAMILIES`, or a
            `config` field its class does not take (one line).
    """
    from transformers import CONFIG_MAPPING

    fields: dict[str, Any] = {}
    model_type = hf_model_type(model.family)
    if model.config_file is not None:
        fields = _read_config_file(model.config_file, f"{key}.config_file")
        model_type = str(fields.pop("model_type", ""))
        if model_type not in {hf_model_type(f) for f in FAMILIES}:
            raise ConfigError(f"{key}.config_file: model_type {model_type!r} is not a family built here "
                              f"({', '.join(FAMILIES)})")
        if model.type is not None and hf_model_type(model.type) != model_type:
            raise ConfigError(f"{key}.type: {model.type} disagrees with {model.config_file} ({model_type})")
    cls = CONFIG_MAPPING[model_type]
    own, accepted = _accepted(cls)
    if model.config_file is None:
        shape = {"d_model": model.d_model, "n_layers": model.n_layers, "n_heads": model.n_heads,
                 "n_kv_heads": model.n_kv_heads or model.n_heads, "d_ff": model.ff_width(),
                 "context": model.context, "tie_embeddings": model.tie_embeddings}
        for field, value in shape.items():  # GPT-2 takes n_embd (hidden_size is only its alias)
            name = next((n for n in SHAPE_NAMES[field] if n in own), None)
            if name is not None:
                fields[name] = value
        head_dim = model.config.get("head_dim", model.d_model // model.n_heads)
        fields.update({n: head_dim for n in ("head_dim", "query_pre_attn_scalar") if n in own})
        fields.update({n: model.dropout for n in _DROPOUTS if n in own})
    for name in model.config:
        if name not in accepted:
            raise ConfigError(f"{key}.config.{name}: not a field of {cls.__name__} ({model_type})")
    fields.update(model.config)
    fields.update(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                  use_cache=False)
    return cls(**fields)


def _accepted(cls: Any) -> tuple[set[str], set[str]]:
    """(the fields a `transformers` config class declares, those plus its aliases and the rope spellings it
    converts into `rope_parameters`)."""
    import inspect

    own = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    names = own | set(cls.attribute_map)
    if "rope_parameters" in own:
        names |= {"rope_theta", "rope_scaling", "partial_rotary_factor"}
    return own, names


def _read_config_file(path: str, key: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "config.json"
    try:
        fields = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read {file} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{key}: {file} is not a config object")
    for name in ("architectures", "auto_map", "quantization_config", "_name_or_path", "transformers_version"):
        fields.pop(name, None)  # what the file's model was, not what is built here
    return fields


def check_build(model: ModelConfig, key: str = KEY) -> ModelConfig:
    """`model` with `config_file` made absolute, after building its `transformers` config once: a bad file,
    family or `config` field is one line on the driver, not a worker's traceback after Ray started."""
    if model.config_file is not None:
        file = Path(model.config_file).expanduser().resolve()
        model = model.model_copy(update={"config_file": str(file)})
    hf_config(model, 256, key=key)
    return model


def check_model_dir(path: str, key: str) -> Path:
    """`path` as an absolute Hugging Face model directory (config and weights), else a one-line error naming
    `key`. Run on the driver: a worker's cwd differs, and its failure would cost a cluster start to find."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is not a directory")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {folder} has no config.json (not a Hugging Face model directory)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ConfigError(f"{key}: {folder} has no weights (*.safetensors or *.bin)")
    return folder


def build_model(model: ModelConfig, vocab_size: int, seed: int, tokenizer: Any = None) -> Any:
    """A freshly initialised causal LM (same seed, same weights on every rank), or a local one.

    Args:
        model: the typed model section; `path` loads instead of building.
        vocab_size: vocabulary of the data stage's tokenizer.
        seed: init seed.
        tokenizer: supplies bos/eos/pad ids for the saved generation config.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if model.path is not None:
        try:
            return AutoModelForCausalLM.from_pretrained(model.path, local_files_only=True, dtype=torch.float32)
        except OSError as e:
            raise ConfigError(f"metadata.llm.pretrain.model.path: cannot load {model.path!r}: {e}") from None
    ids: dict[str, Any] = {}
    if tokenizer is not None:
        ids = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config(model, vocab_size, **ids), dtype=torch.float32)


def flops_per_token(hf_model: Any, seq_len: int) -> float:
    """Training FLOPs per token of a loaded model (`llm.flops.training_flops_per_token` from its shapes).

    N counts every matmul weight, the output projection included even when tied, and no embedding or
    position lookups: for models built from a `ModelConfig` the same figure as `llm.plan.flops_per_token`.
    """
    embed = hf_model.get_input_embeddings().weight
    out = hf_model.get_output_embeddings()
    positions = [m.weight for name, m in hf_model.named_modules() if name.endswith(("wpe", "position_embeddings"))]
    skip = {id(embed), *(id(p) for p in positions)}
    n = sum(p.numel() for p in hf_model.parameters() if id(p) not in skip and p.dim() >= 2)
    if out is not None and id(out.weight) == id(embed):
        n += embed.numel()  # tied: the output projection still costs a matmul
    cfg = hf_model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    width = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return training_flops_per_token(n, layers, width, seq_len)
