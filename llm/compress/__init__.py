"""Compression: quantize, prune, distil, choose a variant; `load` opens any variant for eval and serving."""

from llm.compress.load import LoadedModel, chosen_model_dir, load_model, model_format

__all__ = ["LoadedModel", "chosen_model_dir", "load_model", "model_format"]
