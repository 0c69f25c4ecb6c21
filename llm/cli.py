"""`llmray` / `python -m llm`: one subcommand per stage (from the registry, `llm.stages`) plus run, validate,
plan, status, report and config-schema.

Every command takes `[CONFIG] [KEY=VALUE ...]`: a cluster file (default `cluster/local.yaml`) and
dotted overrides of its `metadata.llm` section. Knobs live in the config tree, not in flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llm.config import LoadedConfig, PipelineConfig
from llm.configdoc import config_reference
from llm.console import log_path
from llm.errors import ConfigError, LLMRayError
from llm.loading import load_config
from llm.plan import build_plan
from llm.plan_text import format_plan
from llm.raycluster import connect
from llm.report import format_status, run_status, write_report
from llm.sizing import check_live, derive
from llm.stage import StageResult
from llm.stages import STAGES, by_name, run_stage, stages_to_run
from llm.tracking import pipeline_run


@dataclass(frozen=True)
class Command:
    help: str
    handler: Callable[[argparse.Namespace, LoadedConfig | None], int]
    needs_config: bool = True
    stage: bool = False


def _split_config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    config = None
    overrides = []
    for i, a in enumerate(args):
        if i == 0 and "=" not in a:
            config = a
        elif "=" in a:
            overrides.append(a)
        else:
            raise ConfigError(f"unexpected argument {a!r}: expected [CONFIG] [KEY=VALUE ...]")
    return config, overrides


def cmd_validate(ns: argparse.Namespace, loaded: LoadedConfig | None) -> int:
    assert loaded is not None
    stages = ", ".join(stages_to_run(loaded.llm))
    print(f"{loaded.path}: valid (Ray cluster config and metadata.llm); run {loaded.llm.run!r}, stages: {stages}")
    return 0


def cmd_plan(ns: argparse.Namespace, loaded: LoadedConfig | None) -> int:
    assert loaded is not None
    sizing = derive(loaded)
    plan = build_plan(loaded, sizing, {stage.name: stage.enabled(loaded.llm) for stage in STAGES})
    if ns.live:
        connect(loaded.llm)
        plan["shortfall"] = check_live(sizing)
    print(json.dumps(plan, indent=2, default=str) if ns.json else format_plan(plan))
    if ns.live and not ns.json:
        print("\n".join(["live cluster: enough resources"] if not plan["shortfall"]
                        else ["live cluster shortfall:", *("  " + m for m in plan["shortfall"])]))
    return 0


def cmd_status(ns: argparse.Namespace, loaded: LoadedConfig | None) -> int:
    assert loaded is not None
    print(f"run {loaded.llm.run!r} under {loaded.llm.storage} ({loaded.path})")
    print(format_status(run_status(loaded.llm)))
    return 0


def cmd_report(ns: argparse.Namespace, loaded: LoadedConfig | None) -> int:
    assert loaded is not None
    _write_report(loaded)
    return 0


def cmd_schema(ns: argparse.Namespace, loaded: LoadedConfig | None) -> int:
    if ns.markdown:
        print(config_reference())
    else:
        print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
    return 0


def _print_result(result: StageResult) -> None:
    if result.kept_aside:
        print(f"{result.stage}: the earlier output is kept at {result.kept_aside}")
    if result.skipped:
        print(f"{result.stage}: skipped, its manifest matches the config and inputs ({result.path}); --force reruns")


def cmd_stage(ns: argparse.Namespace, loaded: LoadedConfig | None) -> int:
    assert loaded is not None
    _print_result(run_stage(loaded.llm, ns.command, force=ns.force, verbose=ns.verbose, quiet=False))
    return 0


def cmd_run(ns: argparse.Namespace, loaded: LoadedConfig | None) -> int:
    assert loaded is not None
    t0 = time.perf_counter()
    results = []
    with pipeline_run(loaded.llm):  # one parent tracking run; the last report.html is logged to it
        for name in stages_to_run(loaded.llm):
            if by_name(name).foreground:  # it may hold the foreground until Ctrl-C: the report is written first
                _write_report(loaded)
            results.append(run_stage(loaded.llm, name, force=ns.force, verbose=ns.verbose, quiet=False))
            _print_result(results[-1])
            write_report(loaded)
    print(f"llmray run: {len(results)} stages in {time.perf_counter() - t0:.0f}s "
          f"({sum(r.skipped for r in results)} skipped); status: llmray status {loaded.path}")
    return 0


def _write_report(loaded: LoadedConfig) -> None:
    print(f"report: {write_report(loaded)}")


COMMANDS: dict[str, Command] = {
    "run": Command("run every enabled stage in order (the quickstart)", cmd_run, stage=True),
    **{stage.name: Command(f"{stage.name} stage: {stage.what}", cmd_stage, stage=True) for stage in STAGES},
    "validate": Command("validate a cluster file (both halves); exit 2 on a config error", cmd_validate),
    "plan": Command("derived sizing per stage; time, cost and memory per GPU estimates (before `ray up`)",
                    cmd_plan),
    "status": Command("each stage: done, stale, partial (resumable from a step) or not started", cmd_status),
    "report": Command("write <storage>/<run>/report.html: one file with every stage's figures", cmd_report),
    "config-schema": Command("print the JSON Schema of metadata.llm", cmd_schema, needs_config=False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if command.needs_config:
            p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]",
                           help="cluster file (default cluster/local.yaml) and dotted overrides")
        if command.stage:
            p.add_argument("--force", action="store_true", help="rerun even when the manifest matches "
                           "(the committed folder is kept aside)")
            p.add_argument("--verbose", action="store_true", help="show Ray's own output live (it always goes "
                           "to <storage>/<run>/logs/<stage>.log)")
            p.add_argument("--wait", action="store_true", help="when another run is writing a stage's folder, "
                           "wait for it instead of stopping (also LLMRAY_WAIT=1)")
        if name == "config-schema":
            p.add_argument("--markdown", action="store_true", help="the config reference table instead")
        if name == "plan":
            p.add_argument("--json", action="store_true", help="machine-readable output")
            p.add_argument("--live", action="store_true", help="connect to Ray and check resources now")
    return parser


def _internal_error(e: Exception, loaded: LoadedConfig | None) -> int:
    folder = log_path(loaded.llm, "error").parent if loaded else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "error.log"
    with log.open("a") as f:
        f.write("".join(traceback.format_exception(e)))
    first = (str(e).strip().splitlines() or [""])[0][:300]
    print(f"error: {type(e).__name__}: {first} (full trace: {log})", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    command = COMMANDS[ns.command]
    if getattr(ns, "wait", False):  # read by llm.lease where a stage takes its folder's lease
        os.environ["LLMRAY_WAIT"] = "1"
    try:
        loaded = None
        if command.needs_config:
            path, overrides = _split_config_and_overrides(ns.args)
            loaded = load_config(path, overrides)
        return command.handler(ns, loaded)
    except LLMRayError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a bug or a library failure: one line here, the trace in a log file
        return _internal_error(e, loaded)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
