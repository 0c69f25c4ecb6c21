"""Compression: quantize, prune, distil, evaluate and choose a variant (`llmray compress`); every variant
opens with the one loader, `llm.models.load`."""
