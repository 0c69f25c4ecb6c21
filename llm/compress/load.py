"""The one model loader: any compress variant or local Hugging Face causal LM directory, model + tokenizer.

Compress, eval and serve all open models here, so a new variant format is added once: write a loader
for it and register it in `_LOADERS` under the name `model_format` detects (an int8 variant will be
told apart by a marker file its writer saves next to the weights). Nothing is downloaded.

Formats: `hf` (a `save_pretrained` directory: fp32 models, pruned and distilled variants, torchao GPU variants,
which `from_pretrained` reads back through their `quantization_config`) and `int8-dynamic` (the CPU int8
variant of `llm.compress.quantize`, told apart by its `quantization.json`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.config import PipelineConfig
from llm.errors import ConfigError, StageInputError
from llm.manifest import read_manifest
from llm.stage import local_dir

CHOSEN = "chosen.json"


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    path: Path
    format: str

    @property
    def context(self) -> int:
        """Maximum positions the model accepts."""
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 0) or 2048)


def model_format(path: Path) -> str:
    """The variant format stored in `path`: `int8-dynamic` (has `quantization.json`) or `hf`."""
    from llm.compress.quantize import FORMAT, QUANT_FILE

    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: not a model directory (no config.json)")
    return FORMAT if (path / QUANT_FILE).exists() else "hf"


def _load_hf(path: Path, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # bf16 matmuls are slow on most CPUs
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


def _load_int8(path: Path, device: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from llm.compress.quantize import load_int8

    model = load_int8(path, device)
    return model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# Format name -> loader(path, device) returning (model, tokenizer). Compress registers its variants here.
_LOADERS: dict[str, Callable[[Path, str], tuple[Any, Any]]] = {"hf": _load_hf, "int8-dynamic": _load_int8}


def load_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Open a model directory for inference (eval mode, no gradients).

    Args:
        path: a compress variant folder or any local Hugging Face causal LM directory with its tokenizer.
        device: torch device to place the model on.

    Raises:
        ConfigError: the folder is missing, of an unknown format, or does not load (one line).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{folder}: model directory not found")
    from safetensors import SafetensorError

    fmt = model_format(folder)
    try:
        model, tokenizer = _LOADERS[fmt](folder, device)
    except (OSError, ValueError, SafetensorError) as e:  # a truncated or corrupt weights file included
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{folder}: cannot load the model or its tokenizer: {first}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, folder, fmt)


def chosen_model_dir(cfg: PipelineConfig) -> Path:
    """The model to serve or evaluate by default: the variant `compress/chosen.json` names; without a
    committed compress stage, the fine-tuned model, else the pretrained one.

    Raises:
        StageInputError: no committed stage has a model yet.
    """
    compress = local_dir(cfg.stage_dir("compress"))
    if read_manifest(compress) is not None and (compress / CHOSEN).exists():
        chosen = json.loads((compress / CHOSEN).read_text())
        # `path` when the writer gives one, else the variant's folder under compress/.
        target = Path(chosen["path"]) if chosen.get("path") else compress / str(chosen["variant"])
        return target if target.is_absolute() else compress / target
    for stage in ("finetune", "pretrain"):
        folder = local_dir(cfg.stage_dir(stage))
        if read_manifest(folder) is not None and (folder / "model" / "config.json").exists():
            return folder / "model"
    raise StageInputError(f"{local_dir(cfg.stage_dir(''))}: no committed compress, finetune or pretrain model; "
                          "run `llmray run` first or set serve.model=<directory>")
