"""Where checkpoints are written and read, without a Ray run: each rank commits only its own files; under Ray
Train on a disk each rank writes straight into the checkpoint's final folder and reports it without an upload
(Ray's own check accepts it); a rank reads a checkpoint on a disk in place; an `init_from` checkpoint saved by
another world size is converted into the continuing stage's folder, its source left byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm.train import checkpoint as ckpt
from tests.train.conftest import fake_checkpoint, ray_runtime, tree_digest


def test_each_rank_commits_only_its_own_files(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "c", world=2)
    parts = [json.loads((folder / ckpt.COMMIT.format(rank=r)).read_text())["files"] for r in (0, 1)]
    # In one shared folder a rank's commit never lists (or hashes, half-written) another rank's files.
    assert sorted(parts[1]) == ["ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.json", "rng_rank1.pt"]
    assert sorted(parts[0]) == ["ds/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/mp_rank_00_model_states.pt",
                                "latest", "loop_state.json", "rng_rank0.json", "rng_rank0.pt", "zero_to_fp32.py"]
    assert ckpt.verify(folder) is None


def test_a_checkpoint_on_a_disk_is_read_in_place(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "c", world=2)
    with ckpt.reading(str(folder), rank=1, world_size=2, under=tmp_path / "scratch") as local:
        assert local == folder
    assert not (tmp_path / "scratch").exists()


def test_ray_checkpoints_on_a_disk_are_written_in_place_and_reported_without_upload(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.train
    from ray.train.v2._internal.execution.context import is_managed_checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    run = StorageContext(str(tmp_path / "ray"), "attempt-1")
    rt = ray_runtime(run, tmp_path / "scratch")
    reports: list[dict] = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: reports.append(kw))
    final = Path(run.experiment_fs_path) / "checkpoint_00000003"
    (final / ckpt.TAG).mkdir(parents=True)
    (final / "_COMMIT_rank1.json").write_text("{}")  # left by a worker group that died writing step 3
    with rt.checkpoint_folder(3) as folder:
        assert folder == str(final) and not final.exists()  # the stale part is gone before anyone writes
        fake_checkpoint(final, world=1)
        rt.report({"step": 3}, folder)
    (kw,) = reports
    assert kw["checkpoint_upload_mode"] == ray.train.CheckpointUploadMode.NO_UPLOAD
    assert kw["checkpoint_dir_name"] == "checkpoint_00000003" and kw["checkpoint"].path == str(final)
    assert is_managed_checkpoint(run, kw["checkpoint"])  # what Ray Train checks before it registers it
    assert ckpt.candidates(tmp_path / "ray") == [str(final)] and ckpt.verify(final) is None
    assert not (tmp_path / "scratch").exists()


def test_init_from_at_another_world_size_converts_into_the_stage_never_into_the_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_cfg) -> None:
    from llm.config import ModelConfig
    from llm.train import loop
    from llm.train.runtime import LocalRuntime
    from llm.train.spec import LoopSpec, train_fields
    from llm.train.state import LoopState

    source = fake_checkpoint(tmp_path / "other-run" / "checkpoint_00000003", world=2)
    before = tree_digest(source)
    converted: list[tuple[Path, Path]] = []
    loaded: list[tuple[str, str] | None] = []

    def convert(folder: Path, target: Path) -> None:
        (target / "zero").mkdir(parents=True)
        converted.append((folder, target))

    monkeypatch.setattr(ckpt, "_convert", convert)
    monkeypatch.setattr(ckpt, "load", lambda engine, folder, rank, src=None: loaded.append(src) or LoopState(step=3))
    stage = tmp_path / "runs" / "pretrain"
    spec = LoopSpec(train=train_fields(local_cfg.llm.pretrain), model=ModelConfig(), vocab_size=8, seq_len=4,
                    out_dir=str(stage), init_checkpoint=str(source))
    start = loop.Start(str(source), ckpt.read_state(source), on_purpose=True)
    assert loop.deepspeed_config(spec.train, 1, "pretrain", start)["checkpoint"]["load_universal"]
    assert loop._loaded_state(None, LocalRuntime(device="cpu"), spec, start, universal=True).step == 3
    into = stage / "_work" / "init_universal"
    assert converted == [(source, into / ckpt.UNIVERSAL)] and loaded == [(str(into), ckpt.UNIVERSAL)]
    assert tree_digest(source) == before and not (source / ckpt.UNIVERSAL).exists()
    assert not (stage / "_work").exists()  # removed once loaded: the stage's commit never lists it
