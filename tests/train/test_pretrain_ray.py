"""Pretraining under Ray Train + DeepSpeed with 2 CPU workers: ZeRO 0/2/3, bf16/fp32, accumulation,
resume after an interruption, export. One baseline run (ZeRO-2, bf16) is shared by the comparisons."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llm.errors import ConfigError, TrainingError
from llm.manifest import read_manifest
from llm.train.pretrain import run
from tests.train.conftest import build_data_stage, train_config

pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.slow]


def records(result) -> list[dict]:
    path = Path(result.path) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(result) -> list[float]:
    return [r["loss"] for r in records(result)]


def ranks(result) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(result.path) / "ranks").glob("rank*.json"))]


def train(tmp_path: Path, *overrides: str, **extra):
    loaded = train_config(tmp_path, *overrides)
    build_data_stage(loaded)
    return loaded, run(loaded.llm, **extra)


@pytest.fixture(scope="module")
def baseline(ray_session, tmp_path_factory):
    """ZeRO-2, bf16, 2 workers x micro 4, 6 steps, checkpoints at 3 and 6."""
    return train(tmp_path_factory.mktemp("baseline"))


def test_zero2_bf16_trains_evaluates_and_exports(baseline):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded, result = baseline
    recs = records(result)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.2, "loss did not fall"
    assert recs[-1]["tokens"] == 6 * 2 * 4 * 32  # steps x workers x micro x seq_len
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [3, 6]
    assert vals[-1]["val_ppl"] == pytest.approx(math.exp(vals[-1]["val_loss"]))
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0 for r in recs)
    assert [r["lr"] for r in recs[:2]] == pytest.approx([1.5e-3, 3e-3])  # warmup 2 steps to peak 3e-3
    assert {r["rank"] for r in ranks(result)} == {0, 1}
    assert all(r["step"] == 6 for r in ranks(result))
    manifest = read_manifest(result.path)
    assert manifest is not None and manifest.metrics["val_ppl"] == pytest.approx(vals[-1]["val_ppl"])

    model_dir = Path(result.path) / "model"
    assert (model_dir / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("def main():", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 8
    assert model.config.vocab_size == len(tok)
    # The export reproduces the loop's last held-out loss: the same 2 global batches of 2 x 4 rows, each
    # rank's mean averaged (the loop computed in bf16, the export is fp32: close, not equal).
    from llm.train.data import parquet_batches, shard_files

    data = Path(loaded.llm.stage_dir("data"))
    batches = [b for _, b in zip(range(2), parquet_batches(shard_files(data, "val"), 8), strict=False)]
    assert len(batches) == 2
    with torch.no_grad():
        per_rank = [float(model(input_ids=b[r * 4:(r + 1) * 4], labels=b[r * 4:(r + 1) * 4]).loss)
                    for r in (0, 1) for b in batches]
    assert sum(per_rank) / len(per_rank) == pytest.approx(vals[-1]["val_loss"], abs=0.05)


def test_last_checkpoint_converts_with_zero_to_fp32(baseline):
    import torch
    from safetensors.torch import load_file

    from llm.train.checkpoint import consolidate_fp32

    _, result = baseline
    ckpts = sorted(p for p in (Path(result.path) / "ray").glob("attempt-*/checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2  # keep_checkpoints default
    last = max(ckpts, key=lambda p: json.loads((p / "loop_state.json").read_text())["step"])
    assert json.loads((last / "loop_state.json").read_text())["step"] == 6
    assert (last / "zero_to_fp32.py").exists()
    fp32 = consolidate_fp32(last)
    exported = load_file(str(Path(result.path) / "model" / "model.safetensors"))
    # Every exported tensor is the fp32 master weight, bit for bit (not the bf16 compute copy upcast);
    # a tied lm_head is stored once by both.
    assert set(exported) <= set(fp32) and set(fp32) - set(exported) <= {"lm_head.weight"}
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, fp32[name]), name


def test_rerun_is_skipped(baseline):
    loaded, first = baseline
    again = run(loaded.llm)
    assert again.skipped and again.metrics["final_loss"] == first.metrics["final_loss"]


def test_grad_accum_2_x_micro_2_matches_micro_4(baseline, tmp_path):
    _, accum = train(tmp_path, "pretrain.micro_batch_size=2", "pretrain.grad_accum=2")
    # bf16 activations: different batch shapes round differently; fp32 master weights keep them close.
    assert losses(accum) == pytest.approx(losses(baseline[1]), abs=3e-2)
    assert records(accum)[-1]["tokens"] == records(baseline[1])[-1]["tokens"]


def test_interrupted_run_resumes_with_the_same_losses(baseline, tmp_path):
    loaded = train_config(tmp_path)
    build_data_stage(loaded)
    with pytest.raises(TrainingError, match="simulated interruption after step 4") as failed:
        run(loaded.llm, fail_at_step=4)  # checkpoint at 3, dies after step 4
    # One line for the user, the worker's whole traceback in the stage's log file.
    assert "\n" not in str(failed.value) and failed.value.log and str(failed.value.log) in str(failed.value)
    assert "Traceback" in Path(failed.value.log).read_text()
    folder = Path(loaded.llm.stage_dir("pretrain"))
    assert read_manifest(folder) is None and (folder / "ray").exists()
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 4.')  # a line cut by the kill: the resumed run and the summary cope
    result = run(loaded.llm, fail_at_step=4)  # the same command again: continues from step 3
    assert not result.skipped
    assert [r["resumed_at"] for r in ranks(result)] == [3, 3]
    assert [r["step"] for r in records(result)] == [1, 2, 3, 4, 5, 6]
    assert losses(result) == pytest.approx(losses(baseline[1]), abs=2e-3)


def test_zero0_fp32(ray_session, tmp_path):
    _, result = train(tmp_path, "pretrain.zero_stage=0", "pretrain.precision=fp32")
    recs = records(result)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.2
    assert "val_ppl" in recs[-1]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(Path(result.path) / "model").num_parameters() > 0


def test_zero3_bf16_matches_zero2(baseline, tmp_path):
    import torch
    from safetensors.torch import load_file

    _, result = train(tmp_path, "pretrain.zero_stage=3")
    assert losses(result) == pytest.approx(losses(baseline[1]), abs=3e-2)
    a = load_file(str(Path(result.path) / "model" / "model.safetensors"))
    b = load_file(str(Path(baseline[1].path) / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:  # gathered from ZeRO-3 partitions: full shapes, close to the ZeRO-2 weights
        assert a[name].shape == b[name].shape
        assert torch.allclose(a[name], b[name], atol=5e-2), name


def test_bad_deepspeed_override_fails_before_training(ray_session, tmp_path):
    loaded = train_config(tmp_path, "pretrain.deepspeed={zero_optimization: {stage: 2, bucket: 1}}")
    build_data_stage(loaded)
    with pytest.raises(ConfigError, match=r"^metadata\.llm\.pretrain\.deepspeed\.zero_optimization\.bucket: "):
        run(loaded.llm)


def test_damaged_checkpoint_is_named_then_the_run_completes_and_continues_on_purpose(
        ray_session, tmp_path, capsys):
    from llm.train import checkpoint as ckpt

    loaded = train_config(tmp_path, "pretrain.max_steps=8", "pretrain.checkpoint_every=2")
    build_data_stage(loaded)
    with pytest.raises(TrainingError) as died:
        run(loaded.llm, kill_at_step=5)  # checkpoints at 2 and 4, then a worker is SIGKILLed after step 5
    folder = Path(loaded.llm.stage_dir("pretrain"))
    assert "\n" not in str(died.value) and (folder / ".killed_once").exists()  # the worker did die
    newest = Path(ckpt.candidates(folder / "ray")[0])
    assert ckpt.step_of(newest) == 4
    victim = next((newest / ckpt.TAG).glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:-64])  # truncated
    capsys.readouterr()
    result = run(loaded.llm, kill_at_step=5)  # the same command again (a worker dies once)
    out = capsys.readouterr().out
    assert f"damaged checkpoint {newest}.damaged: ds/{victim.name}" in out and "resuming from step 2" in out
    assert Path(f"{newest}.damaged").is_dir()
    assert [r["resumed_at"] for r in ranks(result)] == [2, 2]
    assert [r["step"] for r in records(result)] == list(range(1, 9))
    finished = records(result)

    # Raising max_steps alone would rerun from scratch (the old folder kept aside); init_from continues, here
    # on 1 worker: the 2-worker ZeRO-2 checkpoint is converted to DeepSpeed's universal form inside the new
    # stage folder, and the source (the finished run's commit) stays byte-identical.
    from tests.train.conftest import tree_digest

    source = Path(ckpt.choose(folder / "ray").path)
    before = tree_digest(source)
    more = train_config(tmp_path, "pretrain.max_steps=10", "pretrain.checkpoint_every=2", "pretrain.sizing.workers=1",
                        f"pretrain.init_from={folder}")
    cont = run(more.llm)
    assert cont.kept_aside and read_manifest(cont.kept_aside) is not None  # the finished run is kept
    assert tree_digest(Path(cont.kept_aside) / source.relative_to(folder)) == before
    assert [r["resumed_at"] for r in ranks(cont)] == [8]
    assert [r["step"] for r in records(cont)] == [9, 10]
    assert records(cont)[0]["tokens"] == finished[-1]["tokens"] + 1 * 4 * 32
    assert records(cont)[-1]["loss"] < finished[0]["loss"] - 0.2
    manifest = read_manifest(cont.path)
    assert manifest is not None and not [f for f in manifest.files if f.startswith("_work/")]
