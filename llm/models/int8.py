"""The int8 variant's format on disk, and the one call that rebuilds the model from it.

A dynamically quantized module (`torch.ao`, int8 weights with one scale per output channel) holds packed
fbgemm weights that `save_pretrained` cannot write, so `llm.compress.quantize` writes the variant by hand:
the int8 values, scales and zero points of each quantized linear layer and the remaining float tensors in
one safetensors file (`WEIGHTS_FILE`), plus `QUANT_FILE` naming the quantized modules. `load_int8` builds
the model from `config.json`, swaps those modules for empty quantized ones and fills them: the reloaded
model computes exactly what the saved one did. The reader lives here, below eval, compress and serve, so
every one of them opens a variant through `llm.models.load` without importing the compress stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm.errors import ConfigError

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.int8.safetensors"
FORMAT = "int8-dynamic"


def silence_deprecation() -> None:
    """torch.ao prints a migration notice on import; the choice is deliberate (see `llm.compress.quantize`)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")


def set_module(model: Any, name: str, module: Any) -> None:
    """Replace the submodule called `name` (dotted) of `model` by `module`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def conv1d_to_linear(model: Any) -> list[str]:
    """Replace GPT-2's `Conv1D` layers (which dynamic quantization skips) by equal `nn.Linear`s; their names."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            nx, nf = module.weight.shape  # Conv1D computes x @ W + b with W of shape (in, out)
            linear = torch.nn.Linear(nx, nf, bias=True)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            set_module(model, name, linear)
            names.append(name)
    return names


def read_layout(folder: Path) -> dict[str, Any]:
    """`quantization.json` of an int8 variant, checked; a one-line error naming the file otherwise."""
    path = folder / QUANT_FILE
    try:
        layout = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable int8 layout ({type(e).__name__}: {e})") from None
    if not isinstance(layout, dict) or layout.get("format") != FORMAT or not isinstance(layout.get("modules"), list):
        raise ConfigError(f"{path}: not an llmray int8 layout (format {FORMAT!r} with a modules list expected)")
    return layout


def _read_tensors(folder: Path) -> dict[str, Any]:
    """The variant's saved tensors; a one-line error for a missing or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    if not path.exists():
        raise ConfigError(f"{path}: missing (the int8 weights of this variant)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0][:200]})") from None


def _fill(model: Any, tensors: dict[str, Any], layout: dict[str, Any], path: Path) -> None:
    """Load the float tensors into `model`, then put the quantized modules in place of their float twins."""
    import torch

    qlinear = torch.ao.nn.quantized.dynamic.Linear
    prefixes = tuple(f"{name}." for name in layout["modules"])
    if layout.get("embedding"):
        name = layout["embedding"]
        values, scale = tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.row_scales")
        tensors[f"{name}.weight"] = values.float() * scale[:, None]
    packed = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefixes)]}
    # Float tensors first, into the float model; quantized modules replace their float twins after.
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.startswith(prefixes)]
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not match config.json (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    for name in layout["modules"]:
        weight = torch._make_per_channel_quantized_tensor(
            packed[f"{name}.qweight"], packed[f"{name}.scales"], packed[f"{name}.zero_points"], 0)
        module = qlinear(weight.shape[1], weight.shape[0], dtype=torch.qint8)
        module.set_weight_bias(weight, packed.get(f"{name}.bias"))
        set_module(model, name, module)


def load_int8(folder: Path, device: str = "cpu") -> Any:
    """The model `llm.compress.quantize.save_int8` wrote, rebuilt with the same quantized modules and exactly
    the saved values.

    Raises:
        ConfigError: a device other than CPU, or a layout, weights file or config that do not match (one line).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    silence_deprecation()
    if device != "cpu":
        raise ConfigError(f"{folder}: an int8-dynamic variant runs on CPU only (asked for {device})")
    layout = read_layout(folder)
    tensors = _read_tensors(folder)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    conv1d_to_linear(model)
    path = folder / WEIGHTS_FILE
    try:
        _fill(model, tensors, layout, path)
    except (KeyError, RuntimeError, AttributeError) as e:
        raise ConfigError(f"{path}: does not match {QUANT_FILE} or config.json ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None
    return model.eval()
