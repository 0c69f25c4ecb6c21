"""Merging a LoRA adapter into its base on CPU, one transformer block at a time.

`peft`'s `merge_and_unload` needs the whole base in memory and then a second copy to save; for a large
base on a small head node that is two models at once. Here the base's tensors are read lazily from its
safetensors files (`safe_open`), a block's weights get W + (alpha / r) * B @ A, and the block is written as
its own shard of a standard sharded Hugging Face checkpoint (`model.safetensors.index.json`): at most one
block plus the adapter is held at a time. The result loads with `from_pretrained` like any model.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from llm.errors import ConfigError, TrainingError
from llm.models.stops import write_generation_config
from llm.train.lora import ADAPTER_FILE

INDEX = "model.safetensors.index.json"
_BLOCK = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")


class _Tensors:
    """Lazy access to a model directory's weights by name: safetensors (one file or sharded), else .bin."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors"))
        self.where: dict[str, Any] = {}
        if files:
            for f in files:
                handle = stack.enter_context(safe_open(str(f), framework="pt"))
                self.where.update(dict.fromkeys(handle.keys(), handle))
            return
        import torch

        bins = sorted(folder.glob("*.bin"))
        if not bins:
            raise ConfigError(f"{folder}: no *.safetensors or *.bin weights to merge into")
        for f in bins:  # memory-mapped: tensors are paged in as they are read, not all at once
            state = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
            self.where.update({k: _Loaded(v) for k, v in state.items()})

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> Any:
        return self.where[name].get_tensor(name)


class _Loaded:
    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor

    def get_tensor(self, _name: str) -> Any:
        return self.tensor


def _groups(names: list[str]) -> Iterator[tuple[str, list[str]]]:
    """Tensor names grouped by transformer block (in block order), then everything else."""
    blocks: dict[int, list[str]] = {}
    rest = []
    for name in names:
        m = _BLOCK.search(name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(name)
        else:
            rest.append(name)
    for i in sorted(blocks):
        yield f"block {i}", sorted(blocks[i])
    if rest:
        yield "other", sorted(rest)


def _deltas(adapter_dir: Path) -> tuple[dict[str, tuple[Any, Any]], float, bool]:
    """module path -> (A, B), the scale alpha / r, and whether weights are stored (in, out) (Conv1D)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / ADAPTER_FILE))
    pairs: dict[str, tuple[Any, Any]] = {}
    for key, t in tensors.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise TrainingError(f"{adapter_dir / ADAPTER_FILE}: {key} has no lora_B partner")
            pairs[module] = (t, b)
    if not pairs:
        raise TrainingError(f"{adapter_dir / ADAPTER_FILE}: no LoRA tensors to merge")
    return pairs, scale, bool(cfg.get("fan_in_fan_out"))


def _base_name(module: str, names: set[str]) -> str | None:
    for candidate in (f"{module}.weight", f"{module.split('.', 1)[-1]}.weight"):  # GPT-2 files may omit the root
        if candidate in names:
            return candidate
    return None


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  tokenizer_dir: str | Path | None = None) -> Path:
    """Write base + adapter as a plain Hugging Face model into `out_dir`, streaming block by block.

    Args:
        base_dir: the base model directory the adapter was trained on.
        adapter_dir: a peft LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`).
        out_dir: where the merged model goes (sharded safetensors, config, generation config with the
            template's end-of-turn among the eos ids, tokenizer).
        tokenizer_dir: the tokenizer to copy (with its chat template); default: the adapter's, else the base's.

    Raises:
        TrainingError: an adapter tensor whose base weight is missing or of another shape.
    """
    from safetensors.torch import save_file

    base, adapter, out = Path(base_dir), Path(adapter_dir), Path(out_dir)
    pairs, scale, fan_in_fan_out = _deltas(adapter)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    with ExitStack() as stack:
        tensors = _Tensors(base, stack)
        names = set(tensors.names())
        targets = {}
        for module in pairs:
            name = _base_name(module, names)
            if name is None:
                raise TrainingError(f"{adapter / ADAPTER_FILE}: adapted module {module} has no weight in {base}")
            targets[name] = module
        groups = list(_groups(sorted(names)))
        total = 0
        for n, (_label, group) in enumerate(groups, 1):
            shard = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
            block = {}
            for name in group:
                w = tensors.get(name)
                if name in targets:
                    a, b = pairs[targets[name]]
                    delta = (b.float() @ a.float()) * scale
                    delta = delta.T if fan_in_fan_out else delta
                    if delta.shape != w.shape:
                        raise TrainingError(f"{adapter / ADAPTER_FILE}: {targets[name]} update is "
                                            f"{tuple(delta.shape)}, the base weight {name} is {tuple(w.shape)}")
                    w = (w.float() + delta).to(w.dtype)
                block[name] = w.contiguous()
                weight_map[name] = shard
                total += w.numel() * w.element_size()
            save_file(block, str(out / shard), metadata={"format": "pt"})
            del block
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for name in ("config.json", "generation_config.json"):
        if (base / name).exists():
            shutil.copy2(base / name, out / name)
    _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else adapter, base, out)
    _write_stops(out)
    return out


def _write_stops(out: Path) -> None:
    """The base's generation config (copied above) extended with the tokenizer's end-of-turn token: the merged
    model is served with the fine-tuning template, whose turns a base's eos may not end."""
    from transformers import AutoTokenizer

    if not any((out / name).exists() for name in ("tokenizer_config.json", "tokenizer.json")):
        return  # no tokenizer came with the base or the adapter: the base's generation config stands
    write_generation_config(out, None, AutoTokenizer.from_pretrained(str(out), local_files_only=True))


def _copy_tokenizer(first: Path, fallback: Path, out: Path) -> None:
    src = first if (first / "tokenizer_config.json").exists() else fallback
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
