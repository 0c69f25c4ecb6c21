"""LoRA through `peft`: the model hook that wraps the base before `deepspeed.initialize`, and the adapter
export that gathers the trained adapter from ZeRO partitions, saves it and checks what was saved.

Why gather by hand: under ZeRO-3 a parameter on a rank is an empty placeholder (its data is partitioned),
so `PeftModel.save_pretrained` on a wrapped engine writes zero-element tensors without complaint. The fp32
masters are read through DeepSpeed's `safe_get_full_fp32_param` (a collective: every rank calls it, in the
same order), and the written file is read back and compared with the shapes the adapter must have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm.errors import TrainingError
from llm.train.export import gathered
from llm.train.spec import LoopSpec

ADAPTER_FILE = "adapter_model.safetensors"


_ATTN_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2"), _ATTN_MLP),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # fused q/k/v and gate/up (Phi-3, 3.5, 4-mini)
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # Conv1D, weights stored (in, out)
}
"""`model_type` -> the LoRA targets of the families tested here: every projection of attention and MLP."""


def _linear_leaves(model: Any) -> dict[str, Any]:
    """Leaf name -> one module of that name, for every linear layer (`nn.Linear`, GPT-2's `Conv1D`) but the
    output head."""
    import torch
    from transformers.pytorch_utils import Conv1D

    out_head = model.get_output_embeddings()
    return {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not out_head}


def default_targets(model: Any) -> list[str]:
    """The LoRA targets of `model`: its family's (`FAMILY_TARGETS`), checked to be there; for a family not
    listed, the generic rule: leaf names of every linear layer (attention and MLP), the embeddings and the
    output head left alone.

    Raises:
        TrainingError: a listed family whose checkpoint lacks one of its family's projections.
    """
    leaves = _linear_leaves(model)
    family = FAMILY_TARGETS.get(str(getattr(model.config, "model_type", "")))
    if family is None:
        return sorted(leaves)
    missing = [name for name in family if name not in leaves]
    if missing:
        raise TrainingError(f"{model.config.model_type}: the model has no {', '.join(missing)} layers its family "
                            f"has (linear layers: {', '.join(sorted(leaves))}); set "
                            "metadata.llm.finetune.lora.target_modules")
    return sorted(family)


def lora_config(model: Any, settings: dict[str, Any]) -> Any:
    """The `peft.LoraConfig` of `finetune.lora` for this model."""
    from peft import LoraConfig, TaskType
    from transformers.pytorch_utils import Conv1D

    targets = settings.get("target_modules") or default_targets(model)
    # Conv1D (GPT-2) stores weights as (in, out); peft must know, and the merge reads the flag back.
    leaves = _linear_leaves(model)
    fan_in_fan_out = any(isinstance(leaves.get(name), Conv1D) for name in targets)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=int(settings["rank"]), lora_alpha=settings["alpha"],
                      lora_dropout=float(settings["dropout"]), target_modules=targets, fan_in_fan_out=fan_in_fan_out)


def apply(model: Any, spec: LoopSpec) -> Any:
    """`LoopSpec.model_hook`: the base frozen, LoRA adapters added (settings in `spec.extra["lora"]`)."""
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, lora_config(model, spec.extra["lora"]))
    except ValueError as e:  # e.g. a target module name the model does not have
        raise TrainingError(f"metadata.llm.finetune.lora.target_modules: {e}") from None
    if spec.train.gradient_checkpointing:
        peft_model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    return peft_model


def saved_key(name: str) -> str:
    """The key peft saves a parameter under: its name without the adapter's name (`default`)."""
    return name.replace(".default.", ".")


def expected_shapes(module: Any) -> dict[str, tuple[int, ...]]:
    """Saved key -> full shape of every trainable adapter tensor (ZeRO-3 keeps the full shape in `ds_shape`)."""
    return {saved_key(name): tuple(getattr(p, "ds_shape", p.shape))
            for name, p in module.named_parameters() if p.requires_grad}


def gather_adapter(module: Any) -> dict[str, Any] | None:
    """Saved key -> the trainable tensors' fp32 masters, full size, on rank 0 (None elsewhere).

    Every rank must call it: under ZeRO the gathers are collective.
    """
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for name, param in module.named_parameters():  # the same order on every rank: the gathers line up
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        if full is None:
            full = gathered(param)
        if rank == 0:
            out[saved_key(name)] = full.detach().to("cpu").float().clone()
    return out if rank == 0 else None


def verify_adapter(folder: str | Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Read the saved adapter back: every expected tensor present, non-empty, of its shape, finite.

    Raises:
        TrainingError: naming the file and the first tensor that is wrong.
    """
    import torch
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise TrainingError(f"{path}: the adapter was not written")
    saved = load_file(str(path))
    if not expected:
        raise TrainingError(f"{path}: the model has no trainable adapter tensors to save")
    for key, shape in expected.items():
        t = saved.get(key)
        if t is None:
            raise TrainingError(f"{path}: {key} is missing")
        if t.numel() == 0 or tuple(t.shape) != shape:
            raise TrainingError(f"{path}: {key} has shape {tuple(t.shape)}, expected {shape} (a ZeRO-3 partition "
                                "saved without gathering?)")
        if not bool(torch.isfinite(t).all()):
            raise TrainingError(f"{path}: {key} holds non-finite values")


def export_adapter(engine: Any, spec: LoopSpec, tokenizer: Any) -> Path | None:
    """`LoopSpec.export_hook` for LoRA: gather, save `<out_dir>/adapter/` on rank 0, verify it there."""
    from safetensors.torch import save_file

    module = engine.module
    expected = expected_shapes(module)
    full = gather_adapter(module)
    if full is None:
        return None
    out = Path(str(spec.out_dir)) / "adapter"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in full.items()}
    save_file(state, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    config = module.peft_config["default"]
    config.base_model_name_or_path = spec.model.path
    config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    verify_adapter(out, expected)
    return out
