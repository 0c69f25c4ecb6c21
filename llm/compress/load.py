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

from llm import storage
from llm.config import PipelineConfig
from llm.errors import ConfigError, StageInputError
from llm.manifest import MANIFEST, read_manifest
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


def chosen_model_dir(cfg: PipelineConfig) -> Path | str:
    """The model to serve or evaluate by default: the variant `compress/chosen.json` names; without a
    committed compress stage, the fine-tuned model, else the pretrained one. With `storage` in an object
    store, its URI there (open it with `local_model`).

    Raises:
        StageInputError: no committed stage has a model yet.
    """
    if storage.is_remote(cfg.stage_dir("compress")):
        return _chosen_in_store(cfg)
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


def _chosen_in_store(cfg: PipelineConfig) -> str:
    """`chosen_model_dir` with the stage folders in an object store: a URI of a committed model folder."""
    compress = cfg.stage_dir("compress")
    manifest = read_manifest(compress)
    if manifest is not None and CHOSEN in manifest.files:
        chosen = json.loads(storage.read_bytes(storage.join(compress, CHOSEN)))
        where = str(chosen.get("path") or chosen["variant"])
        return where if storage.is_remote(where) or Path(where).is_absolute() else storage.join(compress, where)
    for stage in ("finetune", "pretrain"):
        manifest = read_manifest(cfg.stage_dir(stage))
        if manifest is not None and "model/config.json" in manifest.files:
            return storage.join(cfg.stage_dir(stage), "model")
    raise StageInputError(f"{cfg.stage_dir('')}: no committed compress, finetune or pretrain model; "
                          "run `llmray run` first or set serve.model=<directory>")


def committed_model(uri: str) -> tuple[str, str]:
    """(the committed stage folder, the model's path in it) of a model folder URI in an object store; a
    one-line error when no committed folder above it holds the model's config.json."""
    parts = uri.rstrip("/").split("/")
    for cut in range(len(parts) - 1, 2, -1):  # `s3:`, '', bucket: a stage folder is below the bucket
        stage, rel = "/".join(parts[:cut]), "/".join(parts[cut:])
        manifest = read_manifest(stage)
        if manifest is not None:
            if f"{rel}/config.json" not in manifest.files:
                raise StageInputError(f"{uri}: not a model folder committed in {stage} (no {rel}/config.json "
                                      "in its manifest)")
            return stage, rel
    raise StageInputError(f"{uri}: no committed stage folder (with {MANIFEST}) holds this model")


def local_model(path: str | Path) -> Path:
    """A model folder on this machine: a local path as is; from an object store, a cache copy of the model's
    committed files checked against the manifest (each Serve replica, on any node, makes its own)."""
    if not storage.is_remote(path):
        return Path(path).expanduser()
    from llm.stage import committed_copy

    stage, rel = committed_model(str(path))
    return committed_copy(stage, lambda name, meta: name.startswith(f"{rel}/")) / rel
