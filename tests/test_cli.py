"""The CLI: command table, exit codes, plan output, schema."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llm.cli import COMMANDS, build_parser, main
from llm.loading import load_config
from llm.stages import STAGES, stages_to_run

from .conftest import LOCAL_YAML, ROOT


def test_command_table_matches_parser() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    names = [stage.name for stage in STAGES]
    assert {"run", "validate", "plan", "config-schema", *names} <= set(COMMANDS)
    for name in names:
        assert COMMANDS[name].stage


def test_every_stage_has_one_job_script_of_the_same_shape() -> None:
    jobs = {p.stem: p.read_text() for p in (ROOT / "jobs").glob("*.py")}
    assert set(jobs) == {stage.name for stage in STAGES} | {"pipeline", "plan"}
    for name, text in jobs.items():
        verb = {"pipeline": "run"}.get(name, name)
        body = [line for line in text.splitlines()[1:] if line.strip()]
        assert len(body) <= 10, f"jobs/{name}.py: {len(body)} lines of code"
        assert f'raise SystemExit(main(["{verb}", *sys.argv[1:]' in text, f"jobs/{name}.py calls llm.cli.main"
        assert f"python jobs/{name}.py" in text.splitlines()[0], f"jobs/{name}.py: its docstring names it"


def test_validate_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(LOCAL_YAML)]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["validate", str(ROOT / "cluster" / "config.yaml")]) == 0
    capsys.readouterr()
    assert main(["validate", str(LOCAL_YAML), "pretrain.zero_stagee=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("ConfigError: metadata.llm.pretrain.zero_stagee: unknown key in ")
    assert err.endswith("local.yaml")


def test_validate_process_exit_code_and_no_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "llm", "validate", str(LOCAL_YAML), "pretrain.max_steps=-1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "metadata.llm.pretrain.max_steps" in out.stderr and "local.yaml" in out.stderr


def test_plan_json_train_workers_equal_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(ROOT / "cluster" / "config.yaml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # config.yaml: 2 p5.48xlarge workers x 8 GPUs
    assert plan["sizing"]["cluster_gpus"] == 16
    assert plan["sizing"]["pretrain"]["workers"] == 16 and plan["sizing"]["pretrain"]["use_gpu"]
    a = plan["pretrain"]
    assert a["global_batch_sequences"] == 16 * 4 * 16
    assert a["tokens_per_step"] == 1024 * 1024
    assert a["tokens"] == a["tokens_per_step"] * a["steps"]
    est = plan["estimate"]
    assert est["gpu"] == "H100"
    assert est["gpu_hours"] == pytest.approx(est["wall_hours"] * 16)
    assert est["wall_hours"] * 3600 == pytest.approx(a["total_flops"] / (16 * 989e12 * 0.4))


def test_plan_local_is_cpu_sized(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(LOCAL_YAML), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["sizing"]["pretrain"] == {"workers": 2, "cpus_per_worker": 1.0, "use_gpu": False,
                                         "placement_strategy": "PACK"}
    assert plan["estimate"] is None
    assert main(["plan", str(LOCAL_YAML)]) == 0
    assert "2 CPU workers x 1 CPU" in capsys.readouterr().out


def test_config_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert {"run", "storage", "data", "pretrain", "sweep", "finetune", "compress", "serve"} <= set(schema["properties"])


def test_validate_lists_the_stages_run_runs(capsys: pytest.CaptureFixture[str]) -> None:
    for path in (LOCAL_YAML, ROOT / "cluster" / "config.yaml"):
        assert main(["validate", str(path)]) == 0
        listed = capsys.readouterr().out.rsplit("stages: ", 1)[1].strip()
        assert listed == ", ".join(stages_to_run(load_config(path).llm))
