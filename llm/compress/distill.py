"""Distillation through the one train loop: the student learns the original's softened next-token distribution.

The loop is not changed: its `loss_hook` builds `kd_loss`, which loads the teacher (the original model,
frozen, fp32) once per worker and mixes KL(teacher || student) on temperature-softened logits with the plain
next-token loss, both over the label-carrying tokens only (every token of packed text; assistant tokens of
SFT rows). The teacher is held by the hook rather than attached to the model by `model_hook`: a submodule
would be wrapped, partitioned and checkpointed by DeepSpeed as if it were trained.

The student is the pruned model (`DistillJob.student.path`) or one built from `compress.distill.student`; it
runs through the one training recipe (`llm.train.recipe`) like every training stage, on Ray Train with
DeepSpeed, and the loop's export writes its Hugging Face folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm import storage
from llm.config import ModelConfig, PipelineConfig
from llm.manifest import manifest_hash
from llm.models.chat import IGNORE
from llm.sizing import planned
from llm.train import recipe
from llm.train.data import data_shards
from llm.train.fit import TrainJob
from llm.train.spec import LoopSpec, train_fields


@dataclass(frozen=True)
class DistillJob:
    """One distillation: where it trains, what it reads, who teaches and who learns."""

    work: storage.Folder
    """Its folder: checkpoints under `ray/`, `metrics.jsonl`, the exported `model/`."""
    data: storage.Folder
    """The folder holding the tokens (`llm.compress.tokens`: the data stage's, finetune's, or chat records
    rendered under compress/_work); packed or SFT shards are read from there (an object store included)."""
    teacher: Path
    """The original on this machine (its tokenizer is the student's)."""
    teacher_uri: str
    """Where workers on any node read the teacher: the same folder on a disk, or its store URI."""
    student: ModelConfig
    """The student: `path` of the pruned model, or `compress.distill.student` built from scratch."""
    sft: bool
    """Train on SFT rows (loss on assistant tokens) instead of packed text."""


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

    extra = spec.extra
    where = str(storage.fetch(extra["teacher"]))  # from a store: this node's checked cache copy
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


def distill_spec(cfg: PipelineConfig, job: DistillJob) -> LoopSpec:
    """The loop's spec: the student, the teacher in `extra`, packed or SFT rows of the data stage, and the val
    split of the same kind for the loop's val loss. Workers read the teacher from `job.teacher_uri`."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    dist = cfg.compress.distill
    tokenizer = AutoTokenizer.from_pretrained(str(job.teacher), local_files_only=True)
    kind = "sft" if job.sft else "packed"
    train_files = data_shards(job.data, "train", kind)
    first = pq.ParquetFile(train_files[0]).read_row_group(0, columns=["input_ids"]).column(0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    spec = LoopSpec(
        train=train_fields(dist),
        model=job.student,
        vocab_size=len(tokenizer),
        seq_len=len(first[0]),
        train_files=train_files,
        columns=["input_ids", "labels"] if job.sft else ["input_ids"],
        pad_id=pad if job.sft else None,
        tokenizer_dir=job.teacher_uri,
        out_dir=job.work.uri,
        stage="compress.distill",
        val_files=data_shards(job.data, "val", kind),  # the same kind as training: SFT rows carry labels
        data_id=manifest_hash(job.data.uri) or "",
        loss_hook=kd_loss,
        extra={"teacher": job.teacher_uri, "temperature": dist.temperature, "alpha": dist.alpha},
    )
    return recipe.to_store(spec, job.work)


def distill(cfg: PipelineConfig, job: DistillJob) -> Path:
    """Train the student into `job.work` through the one recipe (Ray Train, or this process with
    `compress.sizing.workers: 0`), resuming from the newest whole checkpoint under its `ray/`; returns the
    exported model folder on this machine (copied from an object store, where the workers wrote it)."""
    train = TrainJob("compress", "compress.distill", cfg.compress.distill, planned(cfg).compress)
    recipe.fit(cfg, train, distill_spec(cfg, job), job.work)
    return job.work.pull("model")
