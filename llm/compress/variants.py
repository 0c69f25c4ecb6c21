"""Building each variant folder from the original: int8, pruned, distilled (and int8 of the distilled).

Each builder writes a complete folder the one loader opens, and a variant is marked done (`.done`, written
last) only after it was re-opened and checked, so an interrupted stage rebuilds exactly the unfinished ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from llm import storage
from llm.compress.prune import prune_model
from llm.compress.quantize import quantize_dynamic_int8, quantize_torchao_gpu, save_int8
from llm.errors import ConfigError, StageInputError
from llm.models.load import load_model
from llm.models.stops import write_generation_config
from llm.train.data import data_shards

DONE = ".done"
# Variant -> the variant it is built from (None: the original).
SOURCE: dict[str, str | None] = {"int8": None, "pruned": None, "pruned-distilled": "pruned",
                                 "student-distilled": None, "pruned-distilled-int8": "pruned-distilled"}


def _fresh(folder: Path) -> Path:
    """An empty folder (a half-written one from an interrupted run is replaced)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def calibration_rows(data: storage.Folder, rows: int) -> Any:
    """The first `rows` packed train sequences of the data stage's folder `data` (the tokens pruning ranks
    channels on and checks are run on)."""
    import numpy as np
    import pyarrow.parquet as pq

    files = data_shards(data, "train")  # local, or read straight from an object store
    if not files:
        raise StageInputError(f"{data.uri}/packed/train: no parquet shards for calibration; rerun `llmray data`")
    out: list[Any] = []
    for f in files:
        out += pq.read_table(f, columns=["input_ids"]).column(0).to_pylist()[: rows - len(out)]
        if len(out) >= rows:
            break
    return np.asarray(out, dtype=np.int64)


def build_int8(source: Path, folder: Path, calib: Any, embeddings: bool, device: str, gpu_config: str) -> Path:
    """Int8 of `source` into `folder`, re-opened with the one loader and checked to give the same logits."""
    import torch

    _fresh(folder)
    if device == "cuda":
        quantize_torchao_gpu(source, folder, gpu_config)
        load_model(folder, device)  # it must open with the one loader
        return folder
    loaded = load_model(source, "cpu")
    layout = quantize_dynamic_int8(loaded.model, embeddings)
    probe = torch.as_tensor(calib[:2])
    with torch.inference_mode():
        before = loaded.model(input_ids=probe).logits
    save_int8(loaded.model, loaded.tokenizer, folder, layout)
    again = load_model(folder, "cpu")
    with torch.inference_mode():
        after = again.model(input_ids=probe).logits
    if not torch.equal(before, after):
        raise ConfigError(f"{folder}: the reloaded int8 model's logits differ from the saved one's "
                          f"(max {float((before - after).abs().max()):.3g})")
    return folder


def build_pruned(source: Path, folder: Path, calib: Any, mlp_ratio: float, head_ratio: float, multiple: int) -> Path:
    """A structurally pruned `source` saved with `save_pretrained` (+ tokenizer, and the generation config
    with the template's end-of-turn among the eos ids) into `folder`."""
    loaded = load_model(source, "cpu")
    smaller = prune_model(loaded.model, calib, mlp_ratio, head_ratio, multiple)
    _fresh(folder)
    smaller.save_pretrained(str(folder), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(folder))
    write_generation_config(folder, smaller, loaded.tokenizer)
    load_model(folder, "cpu")
    return folder


def place_export(exported: Path, folder: Path) -> Path:
    """Move the training loop's exported `model/` into the variant's folder."""
    if not (exported / "config.json").exists():
        raise ConfigError(f"{exported}: distillation finished without an exported model")
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(exported), str(folder))
    load_model(folder, "cpu")
    return folder
