"""The distillation loss against a KL and cross-entropy computed by hand on a fixed batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llm.compress.distill import distill_loss

# batch 1, 4 positions, vocabulary 3. Position t predicts label t+1; label 2 is -100, so the pairs scored are
# (student/teacher at 0, label 2->?) ... spelled out below.
STUDENT = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, -1.0, 0.0], [0.0, 0.0, 0.0]]])
TEACHER = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]])
LABELS = torch.tensor([[0, 1, -100, 2]])


def _softmax(xs: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def _by_hand(temperature: float, alpha: float) -> float:
    # Scored: position 0 -> label 1, position 2 -> label 2 (position 1's label -100; the last has no next).
    pairs = [(0, 1), (2, 2)]
    kl = ce = 0.0
    for pos, target in pairs:
        s, t = STUDENT[0, pos].tolist(), TEACHER[0, pos].tolist()
        p_t, p_s = _softmax(t, temperature), _softmax(s, temperature)
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s, strict=True))
        ce -= math.log(_softmax(s, 1.0)[target])
    return alpha * temperature**2 * kl / len(pairs) + (1 - alpha) * ce / len(pairs)


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 1.0), (2.0, 0.5), (4.0, 0.0), (0.5, 0.9)])
def test_loss_equals_hand_computed_kl_and_ce(temperature: float, alpha: float) -> None:
    got = float(distill_loss(STUDENT, TEACHER, LABELS, temperature, alpha))
    assert got == pytest.approx(_by_hand(temperature, alpha), rel=1e-6)


def test_masked_positions_do_not_count() -> None:
    """Changing logits at a position whose next label is -100 changes nothing; at a scored one it does."""
    base = float(distill_loss(STUDENT, TEACHER, LABELS, 2.0, 0.5))
    masked = STUDENT.clone()
    masked[0, 1] += torch.tensor([5.0, -5.0, 1.0])
    assert float(distill_loss(masked, TEACHER, LABELS, 2.0, 0.5)) == pytest.approx(base, rel=1e-7)
    scored = STUDENT.clone()
    scored[0, 0] += torch.tensor([5.0, -5.0, 1.0])
    assert float(distill_loss(scored, TEACHER, LABELS, 2.0, 0.5)) != pytest.approx(base, rel=1e-3)


def test_student_equal_to_teacher_has_zero_kl_and_gradient_flows() -> None:
    student = TEACHER.clone().requires_grad_(True)
    assert float(distill_loss(student, TEACHER, LABELS, 2.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    loss = distill_loss(STUDENT.clone().requires_grad_(True), TEACHER, LABELS, 2.0, 1.0)
    loss.backward()


def test_plain_part_is_the_models_own_loss(tok) -> None:  # tok: the session tokenizer fixture
    from tests.compress.conftest import gqa_llama

    model = gqa_llama(tok)
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(input_ids=ids, labels=labels)
    assert float(distill_loss(out.logits, out.logits, labels, 2.0, 0.0)) == pytest.approx(float(out.loss), rel=1e-5)


def test_the_loop_gets_the_train_fields_of_the_distill_section_only() -> None:
    from llm.config import TrainConfig
    from llm.config.compress import DistillConfig
    from llm.train.spec import train_fields

    assert set(DistillConfig.model_fields) - set(TrainConfig.model_fields) == {"temperature", "alpha", "data",
                                                                                "student"}
    dist = DistillConfig(max_steps=7, temperature=3.0)
    assert type(train_fields(dist)) is TrainConfig and train_fields(dist).max_steps == 7


@pytest.mark.parametrize("sft", [False, True])
def test_spec_reads_train_and_val_of_the_same_kind(sft: bool, model_dir, tmp_path) -> None:
    """Distilling a fine-tuned model trains on SFT rows: its val rows must carry labels too (the loop's
    padded evaluation reads them), not the packed val split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm import storage
    from llm.compress.distill import DistillJob, distill_spec
    from llm.config import ModelConfig
    from tests.conftest import tiny_config

    data = tmp_path / "data"
    for kind in ("packed", "sft"):
        for split in ("train", "val"):
            (data / kind / split).mkdir(parents=True)
            cols = {"input_ids": pa.array([[1, 2, 3, 4]] * 4, type=pa.list_(pa.int32()))}
            if kind == "sft":
                cols["labels"] = pa.array([[-100, 2, 3, 4]] * 4, type=pa.list_(pa.int32()))
            pq.write_table(pa.table(cols), data / kind / split / "part-00000.parquet")
    cfg = tiny_config(tmp_path).llm
    job = DistillJob(work=storage.Folder(tmp_path / "work"), data=storage.Folder(data), teacher=model_dir,
                     teacher_uri=str(model_dir), student=ModelConfig(path=str(model_dir)), sft=sft)
    spec = distill_spec(cfg, job)
    kind = "sft" if sft else "packed"
    assert [Path(f).parent.parent.name for f in spec.train_files + spec.val_files] == [kind, kind]
    assert spec.columns == (["input_ids", "labels"] if sft else ["input_ids"])
    for f in spec.val_files:
        assert set(spec.columns) <= set(pq.ParquetFile(f).schema_arrow.names)
