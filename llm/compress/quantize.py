"""Int8 quantization of every linear layer, saved in int8 so the file shrinks, and rebuilt by one call.

CPU: `torch.ao` dynamic quantization (int8 weights with one scale per output channel, activations quantized
per batch on the fly). bench/compress.py measured it against torchao's int8 configs on this machine: torch.ao's
fbgemm/x86 kernels decoded ~3x faster than fp32, torchao's int8 configs slower than fp32 (they lower to
dequantize + matmul without a CPU int8 kernel). `torch.ao` eager quantization is deprecated but present;
when it goes, torchao's CPU kernels will have to beat fp32 here first.

A dynamically quantized module holds packed fbgemm weights that `save_pretrained` cannot write, so the
variant is written by hand: the int8 values, scales and zero points of each quantized linear layer and the
remaining float tensors in one safetensors file, plus `quantization.json` naming the quantized modules.
`llm.models.int8.load_int8` (the format's reader, below every user of it) builds the model from
`config.json`, swaps those modules for empty quantized ones and fills them: the reloaded model computes
exactly what the saved one did.

GPU: torchao's weight-only int8 or fp8 through `transformers`' `TorchAoConfig`, which `save_pretrained`
serializes and `from_pretrained` reads back (the plain `hf` loader opens it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm.errors import ConfigError
from llm.models.int8 import FORMAT, QUANT_FILE, WEIGHTS_FILE, conv1d_to_linear, silence_deprecation
from llm.models.stops import write_generation_config


def _row_int8(weight: Any) -> tuple[Any, Any]:
    """Symmetric int8 per row: (values, float32 scales) with weight ~= values * scale."""
    import torch

    scale = weight.detach().abs().amax(dim=1).clamp(min=1e-12) / 127.0
    values = torch.clamp(torch.round(weight.detach() / scale[:, None]), -127, 127).to(torch.int8)
    return values, scale.float()


def quantize_dynamic_int8(model: Any, embeddings: bool = True) -> dict[str, Any]:
    """Quantize `model` in place for CPU inference; returns the layout `save_int8` records.

    Every `nn.Linear` (GPT-2's `Conv1D` converted first) becomes a `torch.ao` dynamic int8 linear with one
    scale per output channel. With `embeddings`, the token embedding is rounded to int8 rows as well (kept
    as float in memory: lookups need no kernel), so the saved file is int8 throughout.
    """
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    silence_deprecation()
    model.eval()
    converted = conv1d_to_linear(model)
    embed_name = None
    if embeddings:
        embed = model.get_input_embeddings()
        values, scale = _row_int8(embed.weight)
        with torch.no_grad():  # tied output head: quantized below from these very rounded rows
            embed.weight.copy_(values.float() * scale[:, None])
        embed_name = next(n for n, m in model.named_modules() if m is embed)
    quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    if not modules:
        raise ConfigError(f"{type(model).__name__}: no linear layer to quantize")
    return {"format": FORMAT, "modules": modules, "conv1d_to_linear": converted, "embedding": embed_name,
            "scheme": "torch.ao dynamic, qint8 weights per output channel, activations per batch",
            "torch": torch.__version__}


def save_int8(model: Any, tokenizer: Any, folder: str | Path, layout: dict[str, Any]) -> Path:
    """Write a model quantized by `quantize_dynamic_int8`: config, generation config (with the template's
    end-of-turn among the eos ids), tokenizer, int8 safetensors, layout json."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    quantized = list(layout["modules"])
    for name in layout["modules"]:
        weight, bias = model.get_submodule(name)._weight_bias()
        tensors[f"{name}.qweight"] = weight.int_repr().contiguous()
        tensors[f"{name}.scales"] = weight.q_per_channel_scales().contiguous()
        tensors[f"{name}.zero_points"] = weight.q_per_channel_zero_points().contiguous()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    embed_key = f"{layout['embedding']}.weight" if layout.get("embedding") else None
    prefixes = tuple(f"{name}." for name in quantized)
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):  # packed params and their buffers: written above as plain int8
            continue
        if key == embed_key:
            values, scale = _row_int8(value)
            tensors[f"{layout['embedding']}.qweight"], tensors[f"{layout['embedding']}.row_scales"] = values, scale
            continue
        tensors[key] = value.detach().contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "llmray": FORMAT})
    model.config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        write_generation_config(out, model, tokenizer)
    elif getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    (out / QUANT_FILE).write_text(json.dumps(layout, indent=2) + "\n")
    return out


def quantize_torchao_gpu(base: str | Path, folder: str | Path, config_name: str) -> Path:
    """GPU int8/fp8 through `transformers`' TorchAoConfig: quantized while loading, saved by `save_pretrained`."""
    import torch
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    configs = {"int8_weight_only": Int8WeightOnlyConfig, "float8_weight_only": Float8WeightOnlyConfig,
               "float8_dynamic": Float8DynamicActivationFloat8WeightConfig}
    quant = TorchAoConfig(quant_type=configs[config_name]())
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.bfloat16,
                                                 device_map="cuda", quantization_config=quant)
    out = Path(folder)
    # torchao tensor subclasses are saved with torch's pickle-free-of-code format (safetensors does not
    # carry their layouts for every config); `from_pretrained` reads the quantization_config back.
    model.save_pretrained(str(out), safe_serialization=False)
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    tokenizer.save_pretrained(str(out))
    write_generation_config(out, model, tokenizer)
    return out
