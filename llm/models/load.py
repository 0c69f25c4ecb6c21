"""The one model loader: any compress variant or local Hugging Face causal LM directory, model + tokenizer.

Compress, eval, fine-tuning and serve all open models here, so a new variant format is added once: write a
loader for it and register it in `_LOADERS` under the name `model_format` detects (an int8 variant is told
apart by the marker file its writer saves next to the weights). Nothing is downloaded.

Formats: `hf` (a `save_pretrained` directory: fp32 models, pruned and distilled variants, torchao GPU variants,
which `from_pretrained` reads back through their `quantization_config`) and `int8-dynamic` (the CPU int8
variant of `llm.compress.quantize`, told apart by its `quantization.json`, read by `llm.models.int8`).

Where the model to serve or evaluate is (`chosen_model_dir`) and a checked local copy of a model committed
in an object store (`local_model`) live here too: every stage that opens a model imports them downward.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm import storage
from llm.config import PipelineConfig
from llm.errors import ConfigError, StageInputError, StaleOutputError
from llm.manifest import MANIFEST, read_manifest
from llm.models.int8 import FORMAT, QUANT_FILE, load_int8
from llm.stage import changed_since, committed_folder

CHOSEN = "chosen.json"
"""The compress stage's record of the variant to serve (written by `llm.compress.choose.write_chosen`)."""
ORIGINAL = "original"
"""The name `chosen.json` gives the model that was compressed; its `path` is then that model's folder."""
_MODEL_CONFIG = "model/config.json"


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


def model_format(path: str | Path) -> str:
    """The variant format stored in `path` (a directory, or a folder in an object store): `int8-dynamic`
    (has `quantization.json`) or `hf`."""
    folder = storage.Folder(path)
    if not folder.exists("config.json"):
        raise ConfigError(f"{path}: not a model directory (no config.json)")
    return FORMAT if folder.exists(QUANT_FILE) else "hf"


def _load_hf(path: Path, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # bf16 matmuls are slow on most CPUs
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


def _load_int8(path: Path, device: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    model = load_int8(path, device)
    return model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# Format name -> loader(path, device) returning (model, tokenizer).
_LOADERS: dict[str, Callable[[Path, str], tuple[Any, Any]]] = {"hf": _load_hf, FORMAT: _load_int8}


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


def chosen_model_dir(cfg: PipelineConfig) -> str:
    """The model to serve or evaluate by default: the variant `compress/chosen.json` names; without a
    committed compress stage, the fine-tuned model, else the pretrained one. A path, or with `storage` in
    an object store a URI there (open it with `local_model`).

    Raises:
        StageInputError: no committed stage has a model yet.
        StaleOutputError: the committed compress stage is not current (its config, the files outside the
            run it names, or an input stage changed since): its choice is not served.
    """
    compress = cfg.stage_dir("compress")
    manifest = read_manifest(compress)
    if manifest is not None and CHOSEN in manifest.files:
        changed = changed_since(cfg, manifest)
        if changed:  # its choice was made for other models or another rule: serving it would mislead
            raise StaleOutputError(f"{compress}: the committed compress stage is stale (changed since: "
                                   f"{', '.join(changed)}); rerun `llmray compress`, or set serve.model=<directory>")
        chosen = json.loads(storage.read_bytes(storage.join(compress, CHOSEN)))
        # The original lives in another stage's folder (`path` names it, relative to compress/ when in the
        # run, absolute in chosen.json of an older llmray); a variant is a folder of compress/.
        if chosen["variant"] == ORIGINAL:
            where = str(chosen["path"])
            if where.startswith("../"):
                return storage.join(compress.rstrip("/").rsplit("/", 1)[0], where[3:])
            return where
        return storage.join(compress, str(chosen["variant"]))
    for stage in ("finetune", "pretrain"):
        manifest = read_manifest(cfg.stage_dir(stage))
        if manifest is not None and _MODEL_CONFIG in manifest.files:
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
    """A model folder on this machine: a path on a disk as is; from an object store, a cache copy of the
    model's committed files checked against the manifest (each Serve replica, on any node, makes its own)."""
    folder = storage.Folder(path)
    if folder.on_disk:  # any local model directory; only a store needs a committed manifest to check against
        return Path(path).expanduser()
    stage, rel = committed_model(folder.uri)
    return committed_folder(stage).fetch(*rel.split("/"))


def checked_model(path: str | Path, key: str) -> str:
    """Where the model at `path` is, checked before anything deploys it: a local directory (resolved) whose
    format is known, or a model folder committed in an object store (its URI).

    Raises:
        ConfigError: naming `key` when the directory is missing or no committed folder holds the model.
    """
    folder = storage.Folder(path)
    if not folder.on_disk:  # a store is not copied here just to look: its manifest lists the model's files
        try:
            committed_model(folder.uri)
        except StageInputError as e:
            raise ConfigError(f"{key}: {e}") from None
        return folder.uri
    local = Path(path).expanduser()
    if not local.is_dir():
        raise ConfigError(f"{key}: model directory {str(local)!r} not found")
    model_format(local)
    return str(local.resolve())


def is_int8_variant(path: str | Path) -> bool:
    """Whether the model at `path` is an int8-dynamic variant (its `quantization.json` marker), on this
    machine or in an object store (nothing is copied just to look)."""
    return model_format(path) == FORMAT
