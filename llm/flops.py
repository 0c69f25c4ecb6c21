"""The one training-FLOPs formula, from a model's shapes: what `llmray plan` estimates and what the loop's MFU
divides by (`llm.train.model.flops_per_token` counts the shapes of a loaded model and calls this)."""

from __future__ import annotations

FLOPS_PER_PARAM = {"full": 6.0, "lora": 4.0}
"""Training FLOPs per matmul weight and token: forward 2, backward 4; LoRA's frozen base skips the weight
gradients (2 of the 4), its adapters are too small to count."""


def training_flops_per_token(matmul_params: int, n_layers: int, d_model: int, seq_len: int,
                             method: str = "full") -> float:
    """Training FLOPs per token: 6N (4N for LoRA) over the matmul weights N, plus the attention term
    12 x layers x d_model x seq_len (PaLM, appendix B).

    Args:
        matmul_params: every matmul weight, the output projection included even when tied, and no embedding
            lookups (Kaplan et al. 2020).
        n_layers: transformer blocks.
        d_model: the residual width.
        seq_len: tokens per sequence (the attention scores grow with it).
        method: `full` or `lora`.
    """
    return FLOPS_PER_PARAM[method] * matmul_params + 12.0 * n_layers * d_model * seq_len
