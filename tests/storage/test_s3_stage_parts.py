"""The object-store paths of finetune, compress, serve and the sweep without Ray, on moto's S3 server: a variant
published to the bucket (its `.done` last) and brought back by a rerun; a model folder in the bucket resolved to
its committed stage and copied into the cache checked against the manifest; serve's model list from the bucket;
the sweep's ASHA replaying ended trials from the bucket, its curves read from there, its record committed there
and `lr: best` reading best.json from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llm import storage
from llm.compress import stage as comp
from llm.errors import ConfigError, StageInputError, StorageError
from llm.loading import load_config
from llm.manifest import read_manifest, write_manifest
from llm.models.load import chosen_model_dir, committed_model, load_model, local_model
from llm.serve.app import model_dirs
from tests.conftest import LOCAL_YAML


def test_a_checked_variant_is_published_done_last_and_restored_by_a_rerun(s3_prefix: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMRAY_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_prefix}/run/compress"
    folder = storage.open_for_writing(uri)
    assert not comp._done_before(folder, "int8")
    (folder.local / "int8").mkdir()
    (folder.local / "int8" / "model.pt").write_bytes(b"w" * 100)
    comp._publish(folder, "int8")
    assert storage.list_files(f"{uri}/int8") == {"model.pt": 100, ".done": 0}
    again = storage.open_for_writing(uri)  # a rerun's fresh staging folder: the variant comes back from the bucket
    assert not (again.local / "int8").exists()
    assert comp._done_before(again, "int8")
    assert (again.local / "int8" / "model.pt").read_bytes() == b"w" * 100
    storage.remove_file(f"{uri}/int8/.done")  # uploaded but never marked: built again
    assert not comp._done_before(again, "pruned") and not comp._done_before(storage.open_for_writing(uri), "int8")


def _commit_model(tmp_path: Path, stage_uri: str, rel: str) -> None:
    """A committed stage folder in the bucket holding a tiny saved model (with its tokenizer) under `rel`."""
    from tests.train.test_finetune_helpers import our_tokenizer, tiny_llama

    local = tiny_llama(tmp_path / "model", our_tokenizer(tmp_path / "tok"))
    storage.upload(local, storage.join(stage_uri, rel))
    write_manifest(stage_uri, "finetune", "h", {}, {})


def test_a_model_in_the_bucket_is_served_from_a_checked_cache_copy(s3_prefix: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMRAY_CACHE", str(tmp_path / "cache"))
    cfg = load_config(LOCAL_YAML, [f"storage={s3_prefix}"]).llm
    with pytest.raises(StageInputError, match="no committed compress"):
        chosen_model_dir(cfg)
    ft = cfg.stage_dir("finetune")
    _commit_model(tmp_path, ft, "model")
    assert chosen_model_dir(cfg) == f"{ft}/model"
    assert committed_model(f"{ft}/model") == (ft, "model")
    with pytest.raises(StageInputError, match="not a model folder"):
        committed_model(f"{ft}/adapter")
    assert model_dirs(cfg) == {cfg.run: f"{ft}/model"}
    monkeypatch.setattr(cfg.serve, "model", f"{s3_prefix}/elsewhere/model")
    with pytest.raises(ConfigError, match="serve.model: .*no committed stage folder"):
        model_dirs(cfg)

    local = local_model(f"{ft}/model")
    assert local.is_relative_to(tmp_path / "cache") and (local / "config.json").exists()
    assert load_model(local).model.config.num_hidden_layers == 2
    # A changed object in the bucket never reaches a replica: the copy is checked against the manifest.
    shutil.rmtree(tmp_path / "cache")
    blob = storage.read_bytes(f"{ft}/model/config.json")
    storage.write_bytes(f"{ft}/model/config.json", blob.replace(b"{", b" ", 1))  # same size, other bytes
    with pytest.raises(OSError, match="differs from the committed one"):
        local_model(f"{ft}/model")
    storage.write_text(f"{ft}/model/config.json", json.dumps({"changed": True}))  # another size: a damaged commit
    with pytest.raises(StorageError, match=r"finetune/_MANIFEST.json: lists model/config.json at \d+ bytes, but it "
                                           "has 17 now"):
        local_model(f"{ft}/model")


def _put_curve(trials: str, trial_id: str, curve: dict[int, float]) -> None:
    """A trial's metrics.jsonl in the bucket as its rank 0 uploads it (a validation loss every 4 steps)."""
    lines = [{"step": s, "loss": v + 0.1, **({"val_loss": v} if s % 4 == 0 else {})} for s, v in curve.items()]
    storage.write_text(f"{trials}/{trial_id}/metrics.jsonl", "".join(json.dumps(x) + "\n" for x in lines))


def test_a_restored_asha_replays_ended_trials_from_the_bucket(s3_prefix: str) -> None:
    from types import SimpleNamespace

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from llm.config import SweepConfig
    from llm.tune import space

    trials = f"{s3_prefix}/run/sweep/trials"
    sched = space.scheduler(SweepConfig(enabled=True, max_steps=12, eval_every=2, grace_period=4,
                                        reduction_factor=2), trials)
    sched.set_search_properties(space.METRIC, space.MODE)
    for i, base in enumerate((5.0, 5.2)):  # two trials an interrupted sweep finished, their records in the bucket
        _put_curve(trials, f"t{i}", {s: base - 0.01 * s for s in range(1, 13)})
        sched.on_trial_add(None, SimpleNamespace(trial_id=f"t{i}", status=Trial.TERMINATED))
    assert dict(sched.rungs())[4] == {"t0": -4.96, "t1": -5.16}
    worse = SimpleNamespace(trial_id="new", status=Trial.PENDING)
    sched.on_trial_add(None, worse)
    assert sched.on_trial_result(None, worse, {"step": 4, "val_loss": 5.5}) == TrialScheduler.STOP


def test_the_sweep_record_is_committed_in_the_bucket_and_lr_best_reads_it(s3_prefix: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.tune import Result

    from llm.config import ModelConfig, TrainConfig
    from llm.stage import execute
    from llm.stages import by_name
    from llm.train.best_lr import apply_best
    from llm.train.spec import LoopSpec
    from llm.tune.results import choose_best, trial_rows
    from llm.tune.stage import trials_dir, write_record
    from llm.tune.trial import trial_spec

    monkeypatch.setenv("LLMRAY_CACHE", str(tmp_path / "cache"))
    cfg = load_config(LOCAL_YAML, [f"storage={s3_prefix}", "sweep.enabled=true", "sweep.max_steps=12",
                                   "pretrain.lr=best", "pretrain.max_steps=100"]).llm
    values = {"kind": "cosine", "warmup_fraction": 0.25, "floor": 0.1}
    seen: dict[str, object] = {}

    def body(folder: storage.Folder) -> dict[str, object]:
        trials = trials_dir(folder)
        seen["trials"] = trials
        base = LoopSpec(train=TrainConfig(max_steps=12), model=ModelConfig(), vocab_size=64, seq_len=8,
                        upload_to="x")
        seen["spec"] = trial_spec(base, {**values, "peak": 1e-3}, f"{trials}/a")
        # Tune kept no dataframe for these trials: the curves come from each trial's metrics.jsonl in the bucket
        grid = []
        for trial_id, base, peak in (("a", 5.0, 1e-3), ("b", 4.0, 3e-3)):
            _put_curve(trials, trial_id, {s: base - 0.01 * s for s in range(1, 13)})
            grid.append(Result(metrics={"trial_id": trial_id, "step": 12, "config": {**values, "peak": peak}},
                               checkpoint=None, error=None, path=f"somewhere/tune/{trial_id}"))
        rows = trial_rows(grid, trials, 12)
        seen["curves"] = [r.curve for r in rows]
        best = choose_best(rows)
        assert best is not None
        write_record(folder, rows, best, cfg.sweep)
        return {"trials": len(rows)}

    result = execute(cfg, by_name("sweep"), body, inputs=())
    uri = cfg.stage_dir("sweep")
    assert result.path == uri and seen["trials"] == f"{uri}/trials"
    spec = seen["spec"]
    assert isinstance(spec, LoopSpec) and spec.upload_to == f"{uri}/trials/a" and spec.publish_each
    assert Path(str(spec.out_dir)).is_relative_to(tmp_path / "cache")
    assert seen["curves"] == [[(4, 4.96), (8, 4.92), (12, 4.88)], [(4, 3.96), (8, 3.92), (12, 3.88)]]
    manifest = read_manifest(uri, verify=True)
    assert manifest is not None and {"trials.csv", "best.json", "curves.png"} <= set(manifest.files)
    assert storage.read_text(f"{uri}/trials.csv").splitlines()[2].startswith("b,cosine,0.003,")
    assert storage.read_bytes(f"{uri}/curves.png")[:4] == b"\x89PNG"
    assert not list((tmp_path / "cache" / "staging").glob("*/*"))

    tuned, source = apply_best(cfg, "pretrain")  # best.json from the bucket, through a checked cache copy
    assert source is not None and source["sweep"] == uri and source["trial_id"] == "b"
    assert tuned.pretrain.lr.peak == 3e-3 and tuned.pretrain.lr.warmup_steps == 25
    storage.write_text(f"{uri}/best.json", "{}")  # not the committed object: never read, and named
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(StorageError, match=r"sweep/_MANIFEST.json: lists best.json at \d+ bytes, but it has 2 now"):
        apply_best(cfg, "pretrain")
