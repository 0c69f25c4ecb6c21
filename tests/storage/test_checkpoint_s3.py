"""Checkpoints in an S3 bucket (moto's server), without a Ray run: a rank resuming from the bucket downloads
only what it loads (its own ZeRO partition and the shared files; every rank's partitions when another world
size converts the checkpoint), checks that copy against the commit lists, and removes it after; a checkpoint
written for the bucket is staged on the worker's disk, not in /tmp, and removed once Ray Train took it."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm import storage
from llm.errors import TrainingError
from llm.train import checkpoint as ckpt
from tests.train.conftest import fake_checkpoint, ray_runtime

SHARED = ["_COMMIT_rank0.json", "_COMMIT_rank1.json", "ds/mp_rank_00_model_states.pt", "latest", "loop_state.json"]


def _in_bucket(s3_prefix: str, tmp_path: Path) -> str:
    uri = f"{s3_prefix}/pretrain/ray/attempt-1/checkpoint_00000003"
    storage.upload(fake_checkpoint(tmp_path / "written", world=2), uri)
    return uri


def test_a_rank_downloads_only_its_own_part(s3_prefix: str, tmp_path: Path) -> None:
    uri = _in_bucket(s3_prefix, tmp_path)
    scratch = tmp_path / "rank1-checkpoints"
    with ckpt.reading(uri, rank=1, world_size=2, under=scratch) as local:
        assert local.is_relative_to(scratch)
        got = sorted(storage.list_files(local))
        assert got == sorted([*SHARED, "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.json",
                              "rng_rank1.pt"])
        # What this rank reads is whole; the rest of the checkpoint is not here to be checked.
        assert ckpt.verify(local, reads=ckpt.reads(1, convert=False)) is None
    assert not list(scratch.iterdir())  # the copy is gone after the block


def test_another_world_size_downloads_every_partition_for_the_conversion(s3_prefix: str, tmp_path: Path) -> None:
    uri = _in_bucket(s3_prefix, tmp_path)
    with ckpt.reading(uri, rank=0, world_size=1, under=tmp_path / "scratch") as local:
        assert sorted(storage.list_files(local)) == sorted(
            [*SHARED, "ds/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank0.json", "rng_rank0.pt"])


def test_a_damaged_download_names_the_file(s3_prefix: str, tmp_path: Path) -> None:
    uri = _in_bucket(s3_prefix, tmp_path)
    mine = "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    storage.write_bytes(f"{uri}/{mine}", b"\xff" * 1000)  # same size, other bytes
    with pytest.raises(TrainingError, match=rf"rank 1's download of the checkpoint: {mine}: checksum differs"):
        with ckpt.reading(uri, rank=1, world_size=2, under=tmp_path / "scratch"):
            pass
    with ckpt.reading(uri, rank=0, world_size=2, under=tmp_path / "scratch"):  # rank 0 never reads that file
        pass


def test_a_checkpoint_for_the_bucket_is_staged_on_the_worker_disk_and_removed(
        s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.train
    from ray.train.v2._internal.execution.storage import StorageContext

    path, fs = storage.ray_storage(f"{s3_prefix}/pretrain/ray")
    rt = ray_runtime(StorageContext(path, "attempt-1", fs), tmp_path / "rank0-checkpoints")
    reports: list[dict] = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: reports.append(kw))
    with rt.checkpoint_folder(3) as folder:
        assert Path(folder).parent == tmp_path / "rank0-checkpoints"
        fake_checkpoint(Path(folder), world=1)
        rt.report({"step": 3}, folder)
        (kw,) = reports  # Ray Train uploads it (SYNC, its default) before the report returns
        assert kw["checkpoint"].path == folder and "checkpoint_upload_mode" not in kw
    assert not list((tmp_path / "rank0-checkpoints").iterdir())
