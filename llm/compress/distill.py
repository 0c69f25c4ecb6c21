"""Distillation through the one train loop: the student learns the original's softened next-token distribution.

The loop is not changed: its `loss_hook` builds `kd_loss`, which loads the teacher (the original model,
frozen, fp32) once per worker and mixes KL(teacher || student) on temperature-softened logits with the plain
next-token loss, both over the label-carrying tokens only (every token of packed text; assistant tokens of
SFT rows). The teacher is held by the hook rather than attached to the model by `model_hook`: a submodule
would be wrapped, partitioned and checkpointed by DeepSpeed as if it were trained.

The student is the pruned model (`LoopSpec.model.path`) or one built from `compress.distill.student`; it runs
on Ray Train with DeepSpeed like every training stage, and the loop's export writes its Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm.config import PipelineConfig
from llm.models.chat import IGNORE
from llm.train import checkpoint as ckpt
from llm.train.loop import LoopSpec

DISTILL_ONLY = {"temperature", "alpha", "data", "student"}
"""`DistillConfig` fields that are not `TrainConfig` fields (the loop validates its `train` dict strictly)."""


def distill_loss(student_logits: Any, teacher_logits: Any, labels: Any, temperature: float, alpha: float) -> Any:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * cross-entropy, each a mean over the
    positions whose next-token label is not -100.

    Args:
        student_logits: (batch, seq, vocab) logits of the student, position t predicting token t + 1.
        teacher_logits: the teacher's logits for the same inputs.
        labels: (batch, seq) targets aligned with the inputs (-100 where nothing is learned).
        temperature: softens both distributions; T^2 keeps the KL gradients on the scale of the plain loss.
        alpha: weight of the KL term.
    """
    import torch.nn.functional as F

    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE
    vocab = student_logits.shape[-1]
    # float32: a bf16 student's log-softmax over the vocabulary would lose the small probabilities KL weighs.
    s = student_logits[:, :-1].reshape(-1, vocab)[keep].float()
    t = teacher_logits[:, :-1].reshape(-1, vocab)[keep].float().detach()
    if s.shape[0] == 0:  # a batch with no label token: nothing to learn, but keep the graph connected
        return student_logits.sum() * 0.0
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2
    ce = F.cross_entropy(s, targets[keep])
    return alpha * kl + (1.0 - alpha) * ce


def kd_loss(spec: LoopSpec) -> Any:
    """The loop's `loss_hook`: loads the teacher named in `spec.extra` and returns `loss_fn(engine, out, batch)`."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm import storage

    extra = spec.extra
    where = str(storage.cached_copy(extra["teacher"]))  # from a store: this node's checked cache copy
    teacher = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    temperature, alpha = float(extra["temperature"]), float(extra["alpha"])
    placed: dict[str, Any] = {}

    def loss_fn(engine: Any, outputs: Any, batch: dict[str, Any]) -> Any:
        device = outputs.logits.device
        if placed.get("device") != device:  # the hook does not know the worker's device until the first batch
            teacher.to(device)
            placed["device"] = device
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                               use_cache=False).logits
        return distill_loss(outputs.logits, t_logits, batch["labels"], temperature, alpha)

    return loss_fn


def use_sft(cfg: PipelineConfig, data: Path | str, from_finetune: bool) -> bool:
    """Whether distillation reads SFT rows (loss on assistant tokens) instead of packed text."""
    from llm.train.stage import data_shards

    has_sft = bool(data_shards(data, "train", "sft"))
    choice = cfg.compress.distill.data
    if choice == "sft" and not has_sft:
        from llm.errors import ConfigError

        raise ConfigError(f"metadata.llm.compress.distill.data: sft, but {data}/sft/train has no shards")
    return choice == "sft" or (choice == "auto" and from_finetune and has_sft)


def distill_spec(cfg: PipelineConfig, work: Path, data: Path | str, teacher: Path, student: dict[str, Any],
                 sft: bool, teacher_uri: str | None = None) -> LoopSpec:
    """The loop's plain-dict config: the student (`{"path": dir}` or `ModelConfig` fields), the teacher in
    `extra`, packed or SFT rows of the data stage, and the val split of the same kind for the loop's val loss.
    With `teacher_uri` (the teacher in an object store) the workers copy it from there, not from `teacher`."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from llm.config import ModelConfig
    from llm.manifest import manifest_hash
    from llm.train.stage import data_shards as shard_files

    dist = cfg.compress.distill
    tokenizer = AutoTokenizer.from_pretrained(str(teacher), local_files_only=True)
    kind = "sft" if sft else "packed"
    train_files = shard_files(data, "train", kind)
    first = pq.ParquetFile(train_files[0]).read_row_group(0, columns=["input_ids"]).column(0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LoopSpec(
        train=dist.model_dump(mode="json", exclude=DISTILL_ONLY),
        model=ModelConfig.model_validate(student).model_dump(mode="json"),
        vocab_size=len(tokenizer),
        seq_len=len(first[0]),
        train_files=train_files,
        columns=["input_ids", "labels"] if sft else ["input_ids"],
        pad_id=pad if sft else None,
        tokenizer_dir=teacher_uri or str(teacher),
        out_dir=str(work),
        stage="compress.distill",
        val_files=shard_files(data, "val", kind),  # the same kind as training: SFT rows carry labels
        data_id=manifest_hash(data) or "",
        loss_hook="llm.compress.distill:kd_loss",
        extra={"teacher": teacher_uri or str(teacher), "temperature": dist.temperature, "alpha": dist.alpha},
    )


def distill_sizing(cfg: PipelineConfig) -> Any:
    """Workers for distillation: derived from the node types like every training stage, `compress.sizing` on top."""
    from llm.sizing import planned

    return planned(cfg).compress


def distill(cfg: PipelineConfig, work: Path, data: Path | str, teacher: Path, student: dict[str, Any],
            sft: bool, store: str | None = None, teacher_uri: str | None = None) -> Path:
    """Train the student into `work/model` on Ray Train (or in this process with `compress.sizing.workers: 0`),
    resuming from the newest whole checkpoint under `work/ray`; returns the exported model folder.

    With `store` (the run's URI in an object store) the checkpoints and the export go there, written by the
    workers; the export is then copied into `work/model` here."""
    from llm import storage
    from llm.errors import ConfigError
    from llm.train import ds_config
    from llm.train.fit import fit_with_ray
    from llm.train.stage import to_store

    dist = cfg.compress.distill
    sizing = distill_sizing(cfg)
    ds_config.build(dist, max(1, sizing.workers), "compress.distill")  # a bad `deepspeed:` fails before workers
    spec = distill_spec(cfg, work, data, teacher, student, sft, teacher_uri)
    root: Path | str = work / "ray"
    if store is not None:
        if sizing.workers < 1:
            raise ConfigError(f"metadata.llm.compress.sizing.workers: 0 trains without Ray and needs a local "
                              f"`storage` (got {cfg.storage})")
        spec, root = to_store(spec, store), storage.join(store, "ray")
    choice = ckpt.choose(root, set_aside=True)
    if choice.path:
        print(f"compress: distillation resumes from step {choice.step}", flush=True)
    spec.resume_from = choice.path
    if sizing.workers < 1:
        from llm.train.loop import run_loop
        from llm.train.runtime import LocalRuntime

        run_loop(spec, LocalRuntime(checkpoint_root=str(root), keep=dist.keep_checkpoints))
    else:
        fit_with_ray(cfg, "compress", spec, sizing, root, dist.keep_checkpoints, dist.max_failures)
    if store is not None:
        return storage.download(storage.join(store, "model"), work / "model")
    return work / "model"
